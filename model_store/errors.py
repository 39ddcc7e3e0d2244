"""The store's user-facing errors: each carries one clear line for a person to read.

The CLI prints them without a traceback; the service maps them to HTTP statuses by class.
"""


class StoreError(Exception):
    """Any failure the user can act on (bad name, missing version, corrupt file, unsupported model)."""


class InvalidReferenceError(StoreError):
    """A model name, alias or reference that is not well-formed."""


class NotFoundError(StoreError):
    """A well-formed reference to a model, version or alias that does not exist."""


class IntegrityError(StoreError):
    """A stored file whose size or sha256 does not match its manifest."""


class UnsupportedModelError(StoreError):
    """A source that is not a GPT-2 model, or uses a GPT-2 feature the runtime does not implement."""
