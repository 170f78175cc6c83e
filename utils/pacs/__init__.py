"""Results back into the hospital: the DICOM Structured Report and Secondary Capture of a prediction
(`objects`), and their durable C-STORE to a PACS (`sender`)."""
