"""The HTTP API: FastAPI routes per endpoint family (completions, chat, score, system), request schemas,
OpenAI-shaped errors, and SSE streaming. Routes parse and check requests, submit plain `EngineRequest`s
to the served model's engine (`service.engine`, through its public surface only), and format what comes
back; they never touch tensors or the scheduler."""
