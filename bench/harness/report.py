"""The results of a level, the table, the throughput target's verdict and the database check."""

from __future__ import annotations

import contextlib
import os
import platform
import sqlite3
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from harness.common import SPLIT_FROM, say
from harness.raw_sign import RawRates

TARGET_RATE = 1000.0  # certificates/s at concurrency 32 ...
TARGET_P99_MS = 50.0  # ... with p99 below this
LATER_TARGET_RATE = 3000.0


@dataclass
class LevelResult:
    concurrency: int
    load_processes: int
    requests: int  # answered 201 in the timed window
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    ok_total: int  # every 201 of the level, warm-up and stragglers included
    elapsed: float
    server_cores: float
    loadgen_cores: float
    other_cores: float
    exhausted: bool
    stolen_cores: float = 0.0  # taken by the hypervisor for other guests (host contention)
    error_samples: dict[str, int] = field(default_factory=dict)
    server_us_per_cert: dict[str, float] = field(default_factory=dict)  # CPU by thread role
    # Requests in flight when the load generator stopped (wrk does not wait for them): the
    # server still issues and records them, but nobody counts their 201.
    abandoned_max: int = 0



def softhsm_version() -> str:
    try:
        out = subprocess.run(["softhsm2-util", "--version"], capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def code_revision() -> str:
    """The product code measured: commit, and whether the working tree differs from it."""
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine_description() -> str:
    distro = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    return (f"{os.cpu_count()} cores, {distro}, Python {platform.python_version()}, "
            f"SoftHSM2 {softhsm_version()}")



def count_issued(db_path: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as db:
        rows = db.execute("SELECT status, count(*) FROM certificates "
                          "WHERE provisioner != 'appliance-tls' GROUP BY status").fetchall()
    return {str(status): int(n) for status, n in rows}


def meets_target(r: LevelResult) -> bool:
    return r.rate >= TARGET_RATE and r.p99_ms < TARGET_P99_MS and r.errors == 0


def target_verdict(runs: list[LevelResult]) -> str:
    """The concurrency-32 target, judged on one run, or on the median of repeated runs."""
    what = (f"target (>= {TARGET_RATE:,.0f} certificates/s at concurrency 32, p99 < "
            f"{TARGET_P99_MS:.0f} ms)")
    rate = statistics.median(r.rate for r in runs)
    p99 = statistics.median(r.p99_ms for r in runs)
    met = rate >= TARGET_RATE and p99 < TARGET_P99_MS and not any(r.errors for r in runs)
    later = "met" if rate >= LATER_TARGET_RATE else "not met"
    if len(runs) == 1:
        measured = f"({rate:,.0f}/s, p99 {p99:.1f} ms)"
    else:
        measured = (f"(median of {len(runs)} runs: {rate:,.0f}/s, p99 {p99:.1f} ms; "
                    f"{sum(meets_target(r) for r in runs)} of {len(runs)} runs meet it alone)")
    return (f"{what}: {'MET' if met else 'NOT MET'} {measured}; later target "
            f"{LATER_TARGET_RATE:,.0f}/s: {later}")


def print_table(levels: list[LevelResult], raw: RawRates, client: str) -> None:
    say("\n(b) POST /1.0/sign over HTTPS keep-alive; (b)/(a) = certificates/s / raw 1-process "
        f"signatures/s ({raw.on_thread_1:,.0f}/s)")
    header = (f"{'conc':>5} {'load':>9} {'certs':>7} {'certs/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'max ms':>7} {'errors':>6} {'(b)/(a)':>8}   "
              "cores: server / loadgen / other / stolen")
    say(header)
    say("-" * len(header))
    for r in levels:
        load = f"{r.load_processes}x{r.concurrency // r.load_processes}" + (
            "" if r.concurrency % r.load_processes == 0 else "+")
        say(f"{r.concurrency:>5} {load:>9} {r.requests:>7} {r.rate:>9,.0f} {r.p50_ms:>7.1f} "
            f"{r.p99_ms:>7.1f} {r.max_ms:>7.1f} {r.errors:>6} {r.rate / raw.on_thread_1:>8.3f}"
            f"   {r.server_cores:.2f} / {r.loadgen_cores:.2f} / {r.other_cores:.2f}"
            f" / {r.stolen_cores:.2f}"
            + ("   TOKENS RAN OUT: raise --max-rate" if r.exhausted else ""))
    if client == "wrk":
        say("load: 'TxC' = wrk threads x connections each (wrk, in C, shares the "
            f"{os.cpu_count()}-core machine with the server; one body, one token per request).")
    else:
        say(f"load: 'PxC' = P load-generator processes x C connections each (two processes "
            f"from concurrency {SPLIT_FROM} on, because the load generator shares the "
            f"{os.cpu_count()}-core machine with the server).")
    say("cores: CPU used during the timed window by the server (supervisor + workers), by the "
        "load generator, and by everything else on the machine (noise); stolen: CPU the "
        "hypervisor gave other guests while this machine wanted it (the host's contention, "
        "which slows every figure here).")
