"""The prediction pipeline: `service` (one prediction end to end, and the reads), `model_pool` (both models and
the female fallback), `batching` (micro-batched model passes), `heatmap` (overlay PNGs), `draft` (a prediction
before it is stored), `recovery` (start-up clean-up after a crash)."""
