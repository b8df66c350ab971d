"""Paths, constants and small helpers every part of the benchmarks uses."""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin: applianctl and py-spy live next to python
APPLIANCTL = BIN / "applianctl"
PY_SPY = BIN / "py-spy"
TOKEN_LIFETIME = 600  # seconds; tokens are minted before each level, so they outlive it
SPLIT_FROM = 8  # from this concurrency on the load generator runs in two processes
READY_TIMEOUT = 120.0


def say(*parts: object) -> None:
    print(*parts, flush=True)


def write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
