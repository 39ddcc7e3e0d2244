"""The GPT-2 inference service: runtime (`service.model`), and later the engine and HTTP API."""
