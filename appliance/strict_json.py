"""JSON as untrusted input: a key given twice, or NaN/Infinity, is an error, not a guess."""

from __future__ import annotations

import json
from typing import Any, NoReturn


class StrictJsonError(ValueError):
    """Valid to Python's json module, but not to a strict reader."""


class DuplicateKey(StrictJsonError):
    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate member {key[:80]!r}")
        self.key = key


class NonJsonConstant(StrictJsonError):
    def __init__(self, name: str) -> None:
        super().__init__(f"{name} is not JSON")
        self.name = name


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def _constant(name: str) -> NoReturn:
    raise NonJsonConstant(name)


def loads(text: str) -> Any:
    """json.loads that refuses duplicate keys and NaN/Infinity (StrictJsonError); malformed text
    still raises json.JSONDecodeError, and deep nesting RecursionError."""
    return json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
