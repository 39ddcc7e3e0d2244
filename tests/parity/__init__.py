"""Parity of the runtime GPT-2 with Hugging Face's GPT2LMHeadModel."""
