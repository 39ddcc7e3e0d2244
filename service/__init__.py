"""The GPT-2 inference service: the model runtime (`service.model`), the generation engine
(`service.engine`), the served model's lifecycle (`service.serving`), and the HTTP API (`service.api`,
wired in `service.app`; `python -m service` runs it)."""
