"""The prediction pipeline: `service` (one prediction end to end, and the reads), `models` (what it needs of the
models, wherever they run), `model_pool` (both models in this process and the female fallback), `batching`
(micro-batched model passes), `heatmap` (overlay PNGs), `draft` (a prediction before it is stored), `recovery`
(clean-up after a crash: at start-up, and by every live process for what a crashed one left), `erasure` (a
patient's data removed on request)."""
