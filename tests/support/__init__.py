"""Helpers the tests import (plain functions, classes and constants; fixtures stay in the conftest files):
`checkpoints`, tiny random GPT-2s as Hugging Face directories in every layout; `stores`, the HTTP tests'
store; `live`, the app on uvicorn in a thread; `finetune`, running and inspecting fine-tuning runs;
`raw_http`, one HTTP exchange over a raw socket. The tiny models themselves are reliability.stores'."""
