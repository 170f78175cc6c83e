"""MLflow tracking of predictions: `mlflow_runs` wraps the client, `worker` completes runs off the request path."""
