"""The bundled default model's data: a public-domain English corpus from Debian's archive, its GPT-2-style
tokenizer and a unigram baseline (`python -m model_store.default_model prepare`). Not imported by the
service; outputs go to build/default_model/, never into git."""
