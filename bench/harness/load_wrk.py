"""(b) with wrk: the load generator in C, so that the server gets the machine.

bench/sign_load.lua sends one pre-minted body per request (each with its own one-time token) and
writes what it counted as JSON. An untimed second opens the connections before the timed run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from harness.ca import Ca, Server
from harness.common import split
from harness.cpu import CpuWindow, Profiler
from harness.report import LevelResult
from harness.tokens import check_answer, sign_request_bodies

WRK_SCRIPT = Path(__file__).resolve().parent.parent / "sign_load.lua"
WRK = shutil.which("wrk") or "wrk"


def mint_bodies_child(encrypted_key: str, password: bytes, provisioner: str, url: str,
                      root_fingerprint: str, subject: str, count: int, out: str) -> None:
    """Write `count` request bodies, one line each, every one with its own one-time token."""
    with open(out, "w") as f:
        for body in sign_request_bodies(encrypted_key, password, provisioner, url,
                                        root_fingerprint, subject, count):
            f.write(body + "\n")


def mint_bodies(ca: Ca, count: int, path: Path, subject: str) -> None:
    """Mint request bodies in two processes (ES256 signing in Python is the slow part)."""
    ctx = multiprocessing.get_context("spawn")
    provisioner = ca.config["authority"]["provisioners"][0]
    password = ca.provisioner_password_file.read_text().strip().encode()
    halves = split(count, 2)
    parts = [path.with_suffix(f".part{i}") for i in range(2)]
    children = [ctx.Process(target=mint_bodies_child, args=(
        provisioner["encryptedKey"], password, provisioner["name"], ca.url, ca.fingerprint,
        subject, n, str(part))) for n, part in zip(halves, parts, strict=True)]
    for c in children:
        c.start()
    for c in children:
        c.join()
        if c.exitcode != 0:
            raise SystemExit(f"minting tokens failed (exit {c.exitcode})")
    with path.open("w") as out:
        for part in parts:
            out.write(part.read_text())
            part.unlink()


def check_sample(ca: Ca, body: str, subject: str) -> str | None:
    """Verify one answer fully: a leaf for `subject` signed by the intermediate, and the chain."""
    from cryptography import x509

    try:
        check_answer(body, subject,
                     x509.load_pem_x509_certificate(ca.intermediate_path.read_bytes()))
    except Exception as e:  # noqa: BLE001 - reported as an error of the level
        return f"bad certificate: {type(e).__name__}: {e}"[:200]
    return None


def run_level_wrk(ca: Ca, server: Server, concurrency: int, duration: float, max_rate: float,
                  warmup_per_slot: int, profile: Profiler | None) -> LevelResult:
    threads = min(concurrency, os.cpu_count() or 1, 2)
    subject = f"wrk-{concurrency}.bench.test"
    bodies = ca.dir / f"bodies-c{concurrency}.jsonl"
    warm_bodies = ca.dir / f"bodies-c{concurrency}-warm.jsonl"
    result_path = ca.dir / f"wrk-c{concurrency}.json"
    warm_result_path = ca.dir / f"wrk-c{concurrency}-warm.json"
    # Enough tokens for max_rate (or 1,000/s per connection, whichever is lower) plus margin;
    # the untimed warm-up second gets its own.
    rate = min(max_rate, 1000.0 * concurrency)
    timed_budget, warm_budget = int(rate * duration * 1.2) + 64, int(rate * 1.2) + 64
    mint_bodies(ca, timed_budget + warm_budget, bodies, subject)
    lines = bodies.read_text().splitlines(keepends=True)
    warm_bodies.write_text("".join(lines[:warm_budget]))
    bodies.write_text("".join(lines[warm_budget:]))
    env = {**os.environ, "BENCH_BODIES": str(bodies), "BENCH_THREADS": str(threads),
           "BENCH_RESULT": str(result_path)}
    argv = [WRK, "-t", str(threads), "-c", str(concurrency), "--timeout", "30s", "-s",
            str(WRK_SCRIPT)]
    url = f"https://localhost:{ca.port}/1.0/sign"
    # One untimed second opens the connections and warms the server's code paths up.
    warm = subprocess.run([*argv, "-d", "1s", url],
                          env={**env, "BENCH_BODIES": str(warm_bodies),
                               "BENCH_RESULT": str(warm_result_path)},
                          capture_output=True, text=True, timeout=120, check=False)
    if warm.returncode != 0 or not warm_result_path.exists():
        raise SystemExit(f"wrk failed: {warm.stderr or warm.stdout}")
    warm_result = json.loads(warm_result_path.read_text())
    server.label_threads()
    cpu = CpuWindow(server)
    proc = subprocess.Popen([*argv, "-d", f"{duration:g}s", url],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    spy = profile.start(server, duration, concurrency) if profile else None
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    cpu.close()
    if profile and spy:
        profile.finish(spy)
    if proc.returncode != 0 or not result_path.exists():
        raise SystemExit(f"wrk failed ({proc.returncode}): {stderr or stdout}")
    r = json.loads(result_path.read_text())
    errors: Counter[str] = Counter()
    if r["refused"]:
        errors[f"HTTP {r['refusal']}"[:200]] += r["refused"]
    if r["socket_errors"]:
        errors["socket errors (connect, read, write, timeout)"] += r["socket_errors"]
    problem = check_sample(ca, r["sample"], subject) if r["created"] else "no certificate"
    if problem:
        errors[problem] += 1
    elapsed = r["duration_us"] / 1e6
    loadgen_cpu = usage.ru_utime + usage.ru_stime
    return LevelResult(
        concurrency=concurrency, load_processes=threads, requests=r["created"],
        rate=r["created"] / elapsed, p50_ms=r["p50_us"] / 1000, p99_ms=r["p99_us"] / 1000,
        max_ms=r["max_us"] / 1000, errors=sum(errors.values()),
        ok_total=r["created"] + warm_result["created"], elapsed=elapsed,
        **cpu.cores(loadgen_cpu, elapsed),
        exhausted=r["exhausted"] > 0, error_samples=dict(errors.most_common(10)),
        server_us_per_cert=cpu.us_per_certificate(r["created"]),
        abandoned_max=2 * concurrency)  # warm-up and timed run
