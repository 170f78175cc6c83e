"""The HTTP layer: `routes` (thin), `deps` (service, settings, API keys), `schemas` (responses), `errors` (domain
errors to statuses), `health`, `cors`."""
