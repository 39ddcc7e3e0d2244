"""GPT-2 runtime: the network with explicit positions and a KV cache, and loading it from the store."""

from .attention import BatchLayout, KVCache
from .gpt2 import GPT2
from .loader import LoadedModel, load_model

__all__ = ["GPT2", "BatchLayout", "KVCache", "LoadedModel", "load_model"]
