"""Model names, aliases and references (`name`, `name@3`, `name@prod`, `name@latest`).

Owns the syntax only: whether a reference exists is the registry's business. Names and aliases become
directory and file names, so anything that could escape the store root is refused here.
"""

import re
from dataclasses import dataclass

from .errors import InvalidReferenceError

LATEST = "latest"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
_NAME_RULE = "1-100 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
_ALIAS_RULE = "1-64 characters of letters, digits, '.', '_' or '-', starting with a letter"


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: `selector` is a version number as text, an alias, or `latest`."""

    name: str
    selector: str = LATEST

    @property
    def version(self) -> int | None:
        return int(self.selector) if self.selector.isdigit() else None

    def __str__(self) -> str:
        return f"{self.name}@{self.selector}"


def validate_name(name: str) -> str:
    if not name:
        raise InvalidReferenceError("model name is empty")
    if not _NAME_RE.fullmatch(name):
        raise InvalidReferenceError(f"invalid model name {name!r}: use {_NAME_RULE}")
    return name


def validate_alias(alias: str) -> str:
    if not alias:
        raise InvalidReferenceError("alias is empty")
    if alias == LATEST:
        raise InvalidReferenceError("'latest' is implicit (the highest version) and cannot be assigned")
    if not _ALIAS_RE.fullmatch(alias):
        raise InvalidReferenceError(f"invalid alias {alias!r}: use {_ALIAS_RULE}")
    return alias


def parse_ref(text: str) -> ModelRef:
    """Parse `name`, `name@<version>`, `name@<alias>` or `name@latest`."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidReferenceError("model reference is empty; expected NAME, NAME@VERSION or NAME@ALIAS")
    name, sep, selector = text.strip().partition("@")
    validate_name(name)
    if not sep:
        return ModelRef(name)
    if not selector:
        raise InvalidReferenceError(f"reference {text!r} has nothing after '@'; expected a version or alias")
    if selector.isdigit():  # also true of non-ASCII digits (²: int() fails; ١: would mean 1)
        if not selector.isascii() or len(selector) > 18:
            raise InvalidReferenceError(f"reference {text[:120]!r}: a version is a number of at most 18 digits")
        version = int(selector)
        if version < 1:
            raise InvalidReferenceError(f"reference {text!r}: versions start at 1")
        return ModelRef(name, str(version))
    if selector != LATEST:
        validate_alias(selector)
    return ModelRef(name, selector)
