"""Patient file storage: `storage/patients/{patient_id}/{prediction_id}/`. The package holds the code; the
`patients/` folder beside it holds the data (not in git)."""
