"""Go-style durations ("5m", "24h", "1h30m", "90s") as used in step-ca's ca.json."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str) -> timedelta:
    """Parse a Go duration string; raise ValueError with the offending text otherwise."""
    s = text.strip()
    sign = 1
    if s and s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return timedelta(0)
    pos = 0
    total = 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"invalid duration {text!r} (use forms like 5m, 24h, 1h30m)")
    try:
        return timedelta(seconds=sign * total)
    except OverflowError:
        raise ValueError(f"duration {text[:40]!r} is out of range") from None


def format_duration(value: timedelta) -> str:
    """Format a timedelta as a Go duration string, e.g. 24h0m0s -> "24h"."""
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    out = ""
    if h:
        out += f"{h}h"
    if m:
        out += f"{m}m"
    if s:
        out += f"{s}s"
    return sign + out


class Duration(str):
    """A duration as ca.json spells it ("24h", "1h30m"), parsed once: `value` is the timedelta.

    It stays the operator's text (a str), so a ca.json that is read and written back keeps its
    spelling; the code reads `value` and never parses it again.
    """

    value: timedelta

    def __new__(cls, text: str) -> Duration:
        parsed = parse_duration(text)
        obj = super().__new__(cls, text)
        obj.value = parsed
        return obj
