"""HTTP API tests against a live server (uvicorn in a thread) over a store of tiny random GPT-2s."""
