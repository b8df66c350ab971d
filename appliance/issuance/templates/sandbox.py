"""The sandbox certificate templates run in, and the functions they may call.

Jinja2's immutable sandbox with no loader, no `_` attributes, no `self`, and undefined names as
errors; `*`, `+` and `**` are bounded so one expression cannot eat memory. A template may call
`toJson` (also as the filters `toJson` and `tojson`, JSON not HTML-escaped) and `fail("...")`,
which refuses the request with that message, as step-ca's templates do.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any, NoReturn

from jinja2 import StrictUndefined, Undefined, nodes
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "MAX_VALUE_SIZE",
    "TemplateEnvironment",
    "TemplateFailure",
    "ValueTooLarge",
    "environment",
    "static_refusal",
    "template_line",
]

# Bounds a single `*`, `+` or `**` in a template: a string or list of at most this many items, an
# integer of at most this many bits. Without it one expression could allocate gigabytes.
MAX_VALUE_SIZE = 64 * 1024


class TemplateFailure(Exception):
    """Raised by `fail("...")` in a template: the message is for the requester."""


class ValueTooLarge(Exception):
    """A `*`, `+` or `**` result would exceed MAX_VALUE_SIZE; the message names the operator."""


def _to_json(value: Any) -> str:
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    return json.dumps(value, ensure_ascii=False, allow_nan=False, default=_not_json)


def _not_json(value: Any) -> NoReturn:
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    raise TypeError(f"toJson cannot encode a {type(value).__name__}")


def _fail(message: Any = "the template refused the request") -> NoReturn:
    raise TemplateFailure(str(message))


def _size_of(value: Any) -> int:
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return value.bit_length()
    if isinstance(value, str | bytes | list | tuple):
        return len(value)
    return 0


class TemplateEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with `*`, `+` and `**` bounded so one expression cannot eat memory."""

    intercepted_binops = frozenset({"*", "+", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and (
                    max(left.bit_length(), 1) * right > MAX_VALUE_SIZE):
                raise ValueTooLarge(operator)
            return left**right
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                size = left.bit_length() + right.bit_length()
            elif isinstance(right, int):
                size = _size_of(left) * right
            elif isinstance(left, int):
                size = _size_of(right) * left
            else:
                size = 0
            if size > MAX_VALUE_SIZE:
                raise ValueTooLarge(operator)
            return left * right
        if _size_of(left) + _size_of(right) > MAX_VALUE_SIZE:
            raise ValueTooLarge(operator)
        return left + right


def environment() -> TemplateEnvironment:
    """A fresh sandbox with the template functions and without lipsum."""
    env = TemplateEnvironment(undefined=StrictUndefined, autoescape=False)
    env.globals.pop("lipsum", None)  # lipsum(n) is an unbounded text generator and no use here
    env.globals["toJson"] = _to_json
    env.globals["fail"] = _fail
    env.filters["toJson"] = _to_json
    env.filters["tojson"] = _to_json  # JSON, not HTML-escaped JSON: the output is not a page
    return env


def static_refusal(tree: nodes.Template) -> tuple[int, str] | None:
    """Refuse at compile time what the sandbox would only stop at render time, with a line."""
    for include in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        return include.lineno, ("extends, include and import are not available: a template "
                                "is self-contained")
    for name in tree.find_all(nodes.Name):
        if name.name == "self":
            return name.lineno, "'self' is not available in certificate templates"
    for getattr_node in tree.find_all(nodes.Getattr):
        if getattr_node.attr.startswith("_"):
            return getattr_node.lineno, f"attribute {getattr_node.attr!r} is not accessible"
    for getitem in tree.find_all(nodes.Getitem):
        if (isinstance(getitem.arg, nodes.Const) and isinstance(getitem.arg.value, str)
                and getitem.arg.value.startswith("_")):
            return getitem.lineno, f"item {getitem.arg.value!r} is not accessible"
    for filter_node in tree.find_all(nodes.Filter):
        if filter_node.name == "attr" and any(
                isinstance(a, nodes.Const) and str(a.value).startswith("_")
                for a in filter_node.args):
            return filter_node.lineno, "attributes starting with '_' are not accessible"
    return None


def template_line(tb: TracebackType | None, filename: str) -> int | None:
    """The template line an exception came from; Jinja rewrites tracebacks to carry it."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
