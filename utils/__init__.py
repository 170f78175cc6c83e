"""Service code: settings, upload validation, the prediction pipeline, heatmaps, tracking, API schemas."""
