"""Issuance benchmark: certificates/s through POST /1.0/sign against the token's raw signing rate.

    .venv/bin/python bench/issuance.py [--duration 10] [--concurrency 1,8,32] [--workers 2] [--keep]

1. Creates a throwaway CA (random PINs in 0600 files, tokens in a private SoftHSM2 directory) in a
   temporary directory and starts `applianctl serve --workers N` on a free port.
2. (a) Measures the issuer key's raw signing rate through the KeyStore (key.sign(): SHA-256 here,
   CKM_ECDSA in the token), in one process and in two processes at once: a loop run on the
   PKCS#11 thread (the reference for the ratio), and the same calls from another thread, which
   hop to the PKCS#11 thread one by one. It also times building + token-signing a leaf in process
   (the ceiling of issuance without HTTP, TLS, token checks and the database).
3. (b) For each concurrency level: pre-mints one-time tokens, warms the keep-alive connections up,
   then drives POST /1.0/sign over HTTPS for a fixed duration and records certificates/s, p50 and
   p99 latency and errors (any answer but 201 is an error). The load generator shares the machine
   with the server; from concurrency 8 on it runs in two processes that split the concurrency.
   It also records the CPU the server spent per certificate, by thread (event loop, PKCS#11
   thread, database writer), and the CPU everything else on the machine used meanwhile (noise).
   --profile SECONDS runs `py-spy record` on every worker during the last level and prints where
   the workers spend their time.
4. Checks that the database holds exactly as many issued certificates as there were 201 answers,
   prints a table with the ratio (b)/(a), stops the server with SIGTERM and expects exit code 0.

The exit status is 0 when every request succeeded, the database matches and the server stopped
cleanly; it is 1 otherwise. Whether the throughput target is met is reported, not enforced.

This file is the command line and the order of the steps; the steps live in bench/harness/
(ca, raw_sign, load_wrk, load_python, cpu, report).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from harness.ca import Server, create_ca, key_access
from harness.common import APPLIANCTL, SPLIT_FROM, TOKEN_LIFETIME, free_port, say, split
from harness.cpu import Profiler, worker_pids
from harness.load_python import run_level
from harness.load_wrk import run_level_wrk
from harness.raw_sign import RawRates, measure_raw
from harness.report import (
    LevelResult,
    code_revision,
    count_issued,
    machine_description,
    print_table,
    target_verdict,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds per concurrency level (default 10)")
    p.add_argument("--concurrency", default="1,8,32",
                   help="comma-separated concurrency levels (default 1,8,32)")
    p.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    p.add_argument("--no-pin", action="store_true",
                   help="let the workers run on any CPU (ca.json pinWorkers: false)")
    p.add_argument("--raw-seconds", type=float, default=3.0,
                   help="seconds per raw signing measurement (default 3); 0 skips it")
    p.add_argument("--max-rate", type=float, default=4000.0,
                   help="certificates/s the pre-minted tokens must cover (default 4000)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed requests per connection before each level (default 2)")
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                   help="py-spy record every server worker for SECONDS during the last level")
    p.add_argument("--native", action="store_true", help="with --profile: native frames too")
    p.add_argument("--client", choices=("wrk", "python"), default=None,
                   help="load generator: wrk (default when installed; C, so the server gets "
                        "the machine) or python (aiohttp in 1-2 processes)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of the last concurrency level (default 1); with more, the target "
                        "is judged on their median rate and p99 (the machine is noisy)")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary CA directory (it holds the PIN files!)")
    args = p.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        p.error("--concurrency must be comma-separated whole numbers")
    if not args.levels or min(args.levels) < 1:
        p.error("--concurrency levels must be at least 1")
    if not 1 <= args.duration <= TOKEN_LIFETIME / 2:
        p.error(f"--duration must be between 1 and {TOKEN_LIFETIME // 2} seconds")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if not 1 <= args.repeat <= 20:
        p.error("--repeat must be between 1 and 20")
    if args.client is None:
        args.client = "wrk" if shutil.which("wrk") else "python"
    elif args.client == "wrk" and not shutil.which("wrk"):
        p.error("--client wrk: wrk is not installed (apt-get install wrk, or make bench)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not APPLIANCTL.exists():
        raise SystemExit(f"{APPLIANCTL} not found: run with the venv's python")
    os.umask(0o077)
    workdir = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    server: Server | None = None
    ok = True
    try:
        say(f"Issuance benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
            f"{machine_description()}")
        say(f"code: {code_revision()}; load average before start: "
            + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        ca = create_ca(workdir, free_port(), pin_workers=not args.no_pin)
        server = Server(ca, args.workers)
        server.start()
        say(f"CA in {workdir}; server pid {server.pid} with {args.workers} worker(s) "
            f"{worker_pids(server.pid)} on {ca.url}"
            + ("; workers not pinned to CPUs" if args.no_pin else ""))

        raw = RawRates("?", *([math.nan] * 6))
        if args.raw_seconds > 0:
            raw = measure_raw(key_access(ca), args.raw_seconds)
            say(f"\n(a) issuer key ({raw.key}) through the KeyStore, {args.raw_seconds:g} s each:")
            say(f"    key.sign() loop on the PKCS#11 thread : {raw.on_thread_1:>9,.0f}/s 1 process"
                f"   {raw.on_thread_2:>9,.0f}/s 2 processes")
            say(f"    key.sign() from another thread (hop)  : {raw.hopped_1:>9,.0f}/s 1 process"
                f"   {raw.hopped_2:>9,.0f}/s 2 processes")
            say(f"    build + token-sign a leaf (in process): {raw.build_1:>9,.0f}/s 1 process"
                f"   {raw.build_2:>9,.0f}/s 2 processes")

        profiler = Profiler(workdir, args.profile, args.native) if args.profile > 0 else None
        levels: list[LevelResult] = []
        runs = list(args.levels) + [args.levels[-1]] * (args.repeat - 1)
        for i, c in enumerate(runs):
            if args.client == "wrk":
                procs = min(c, os.cpu_count() or 1, 2)
                say(f"\nconcurrency {c}: wrk, {procs} thread(s) x {split(c, procs)} connections, "
                    f"{args.duration:g} s (load average {os.getloadavg()[0]:.2f}) ...")
            else:
                procs = 2 if c >= SPLIT_FROM else 1
                say(f"\nconcurrency {c}: {procs} load process(es) x {split(c, procs)} "
                    f"connections, {args.duration:g} s "
                    f"(load average {os.getloadavg()[0]:.2f}) ...")
            last = i == len(runs) - 1
            level = run_level_wrk if args.client == "wrk" else run_level
            r = level(ca, server, c, args.duration, args.max_rate, args.warmup,
                      profiler if last else None)
            levels.append(r)
            say(f"  {r.requests} certificates in {r.elapsed:.2f} s = {r.rate:,.0f}/s, "
                f"p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms, errors {r.errors}")
            say("  server CPU per certificate: " + ", ".join(
                f"{role} {us:,.0f} us" for role, us in r.server_us_per_cert.items())
                + f"; total {sum(r.server_us_per_cert.values()):,.0f} us")
            for message, n in r.error_samples.items():
                say(f"  ERROR x{n}: {message}")
            if r.errors or r.exhausted:
                ok = False

        issued_201 = sum(r.ok_total for r in levels)
        abandoned = sum(r.abandoned_max for r in levels)
        counts = count_issued(ca.db_path)
        db_issued = counts.get("issued", 0)
        print_table(levels, raw, args.client)
        # Every 201 must be in the database; beyond those, only requests still in flight when
        # wrk stopped (at most one per connection per run) may have been issued unanswered.
        recorded = issued_201 <= db_issued <= issued_201 + abandoned
        others = {k: v for k, v in counts.items() if k != "issued"} or "none"
        say(f"\ndatabase: {db_issued} issued certificates (provisioner != appliance-tls), "
            f"{issued_201} answers 201"
            + (f" (+ up to {abandoned} in flight when wrk stopped)" if abandoned else "")
            + f"; other states: {others}"
            + (" -> OK, every certificate recorded" if recorded else " -> MISMATCH"))
        ok &= recorded

        tops = [r for r in levels if r.concurrency == 32]
        if tops:
            say(target_verdict(tops))
        if profiler:
            say(f"\npy-spy on the server workers during concurrency {levels[-1].concurrency}:")
            say(profiler.summary())

        problems = server.error_lines()
        code = server.stop()
        server = None
        say(f"\nserver stopped with SIGTERM: exit code {code}"
            + ("" if code == 0 else " (expected 0)"))
        ok &= code == 0
        if problems:
            say("server log lines other than successful requests:")
            for line in problems:
                say(f"  {line[:300]}")
        if args.json:
            args.json.write_text(json.dumps({
                "date": datetime.now(UTC).isoformat(), "machine": machine_description(),
                "code": code_revision(),
                "workers": args.workers, "duration": args.duration, "raw": asdict(raw),
                "levels": [asdict(r) for r in levels], "db_issued": db_issued,
                "answers_201": issued_201, "server_exit": code, "ok": ok}, indent=2))
        return 0 if ok else 1
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            say(f"kept {workdir} (holds PIN files; delete it when done)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
