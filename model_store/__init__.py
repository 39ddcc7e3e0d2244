"""The offline model store: versioned, hash-verified GPT-2 artifacts that the service loads by reference.

Light to import (no torch): the service uses the registry and manifest; `import_hf` is imported on use.
"""

from importlib import metadata

from .errors import IntegrityError, InvalidReferenceError, NotFoundError, StoreError, UnsupportedModelError
from .manifest import ArchConfig, Lineage, Manifest, TokenizerInfo
from .refs import ModelRef, parse_ref
from .registry import ModelStore, StoredVersion, default_root, store_root

try:
    __version__ = metadata.version("gpt2-serve")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = [
    "ArchConfig",
    "IntegrityError",
    "InvalidReferenceError",
    "Lineage",
    "Manifest",
    "ModelRef",
    "ModelStore",
    "NotFoundError",
    "StoreError",
    "StoredVersion",
    "TokenizerInfo",
    "UnsupportedModelError",
    "default_root",
    "parse_ref",
    "store_root",
]
