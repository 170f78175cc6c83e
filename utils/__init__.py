"""The service around the models, one room per concern:

- `api/`: HTTP routes, dependencies, response schemas, error-to-status mapping, health;
- `pipeline/`: one prediction end to end, the model pool and its batcher, heatmaps, start-up recovery;
- `imaging/`: upload validation and decoding (PNG, JPEG, TIFF, DICOM);
- `tracking/`: MLflow runs completed off the request path;
- `report/`: the clinical report against chronological age, its reference table and the patient's chart;
- `viewer/`: the web page at `/` that uses the API;
- `config.py` (settings), `errors.py` (service errors), `memory.py` (malloc arenas): the ground floor.
"""
