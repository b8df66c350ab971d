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
    # dict() in C, and a Python loop only to name the duplicate: every token and ACME request
    # passes through here, and a member-by-member loop was a measurable part of each.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return out


def _constant(name: str) -> NoReturn:
    raise NonJsonConstant(name)


def loads(text: str) -> Any:
    """json.loads that refuses duplicate keys and NaN/Infinity (StrictJsonError); malformed text
    still raises json.JSONDecodeError, and deep nesting RecursionError."""
    return json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
