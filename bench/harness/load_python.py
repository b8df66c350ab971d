"""(b) with the Python client: aiohttp in one or two processes drives POST /1.0/sign.

`--client python`, or the default when wrk is not installed. From concurrency SPLIT_FROM on, two
processes split the connections, because the load generator shares the machine with the server.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import queue
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from harness.ca import Ca, Server
from harness.common import SPLIT_FROM, percentile, split
from harness.cpu import CpuWindow, Profiler
from harness.report import LevelResult
from harness.tokens import check_answer, sign_request_bodies


@dataclass(frozen=True)
class LoadSpec:
    index: int
    url: str
    root_path: str
    intermediate_pem: bytes
    encrypted_key: str
    provisioner: str
    password: bytes
    root_fingerprint: str
    concurrency: int
    duration: float
    tokens: int
    warmup_per_slot: int


def load_child(spec: LoadSpec, barrier: Any, results: Any) -> None:
    try:
        results.put(_load_child(spec, barrier))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the run
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put({"index": spec.index, "fatal": f"{type(e).__name__}: {e}"})
        raise


def _load_child(spec: LoadSpec, barrier: Any) -> dict[str, Any]:
    import asyncio

    subject = f"load-{spec.index}.bench.test"
    started = time.perf_counter()
    bodies = [body.encode() for body in sign_request_bodies(
        spec.encrypted_key, spec.password, spec.provisioner, spec.url, spec.root_fingerprint,
        subject, spec.tokens)]
    mint_seconds = time.perf_counter() - started
    out = asyncio.run(_drive(spec, bodies, subject, barrier))
    out["index"] = spec.index
    out["mint_seconds"] = mint_seconds
    return out


async def _drive(spec: LoadSpec, bodies: list[bytes], subject: str, barrier: Any
                 ) -> dict[str, Any]:
    import asyncio

    import aiohttp
    from cryptography import x509

    ssl_context = ssl.create_default_context(cafile=spec.root_path)  # trust only the CA's root
    intermediate = x509.load_pem_x509_certificate(spec.intermediate_pem)
    headers = {"Content-Type": "application/json"}
    pending = iter(bodies)
    ok = {"warmup": 0, "timed": 0, "late": 0}
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    exhausted = False
    checked = False
    deadline = math.inf

    async def one(session: aiohttp.ClientSession, phase: str) -> bool:
        nonlocal exhausted, checked
        body = next(pending, None)
        if body is None:
            exhausted = True
            return False
        start = time.perf_counter()
        try:
            async with session.post(spec.url, data=body, headers=headers) as resp:
                answer = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            errors[f"{type(e).__name__}: {e}"[:200]] += 1
            return True
        end = time.perf_counter()
        if status != 201:
            errors[f"HTTP {status}: {answer[:200].decode(errors='replace')}"] += 1
            return True
        if not checked:
            checked = True
            try:
                check_answer(answer, subject, intermediate)
            except Exception as e:  # noqa: BLE001 - counted and shown as an error
                errors[f"bad certificate: {type(e).__name__}: {e}"[:200]] += 1
                return True
        if phase == "warmup":
            ok["warmup"] += 1
        elif start < deadline:
            ok["timed"] += 1
            latencies.append(end - start)
        else:
            ok["late"] += 1
        return True

    async def slot(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline and await one(session, "timed"):
            pass

    connector = aiohttp.TCPConnector(limit=spec.concurrency, ssl=ssl_context)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(spec.warmup_per_slot):  # opens `concurrency` keep-alive connections
            await asyncio.gather(*(one(session, "warmup") for _ in range(spec.concurrency)))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, barrier.wait)  # warm: the parent looks at the server
        await loop.run_in_executor(None, barrier.wait)  # then all load processes start together
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        deadline = t0 + spec.duration
        await asyncio.gather(*(slot(session) for _ in range(spec.concurrency)))
        t1 = time.perf_counter()
        cpu = time.process_time() - cpu0
    return {"ok": ok, "errors": dict(errors), "latencies": latencies, "t0": t0, "t1": t1,
            "cpu": cpu, "exhausted": exhausted}



def run_level(ca: Ca, server: Server, concurrency: int, duration: float, max_rate: float,
              warmup_per_slot: int, profile: Profiler | None) -> LevelResult:
    ctx = multiprocessing.get_context("spawn")
    procs = 2 if concurrency >= SPLIT_FROM else 1
    shares = split(concurrency, procs)
    provisioner = ca.config["authority"]["provisioners"][0]
    password = ca.provisioner_password_file.read_text().strip().encode()
    specs = []
    for i, share in enumerate(shares):
        # Enough tokens for max_rate (or 1,000/s per connection, whichever is lower) plus margin.
        budget = min(max_rate * share / concurrency, 1000.0 * share) * duration * 1.2
        specs.append(LoadSpec(
            index=i, url=ca.url, root_path=str(ca.root_path),
            intermediate_pem=ca.intermediate_path.read_bytes(),
            encrypted_key=provisioner["encryptedKey"], provisioner=provisioner["name"],
            password=password, root_fingerprint=ca.fingerprint, concurrency=share,
            duration=duration, tokens=int(budget) + warmup_per_slot * share + 16,
            warmup_per_slot=warmup_per_slot))
    barrier = ctx.Barrier(procs + 1)  # the load processes and this one
    results = ctx.Queue()
    children = [ctx.Process(target=load_child, args=(s, barrier, results), daemon=True)
                for s in specs]
    for c in children:
        c.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a child failed: its report follows
        barrier.wait(timeout=300)  # tokens minted, connections warm
        server.label_threads()  # after the warm-up, so that lazily started threads exist
        barrier.wait(timeout=120)  # go
    cpu = CpuWindow(server)
    spy = profile.start(server, duration, concurrency) if profile else None
    try:
        outs = [results.get(timeout=duration + 300) for _ in children]
    except queue.Empty:
        raise SystemExit("a load generator process died without reporting") from None
    cpu.close()
    for c in children:
        c.join(30)
    if profile and spy:
        profile.finish(spy)
    fatal = [o["fatal"] for o in outs if "fatal" in o]
    if fatal:
        raise SystemExit(f"load generator failed: {fatal}")
    latencies = sorted(x for o in outs for x in o["latencies"])
    errors: Counter[str] = Counter()
    for o in outs:
        errors.update(o["errors"])
    elapsed = max(o["t1"] for o in outs) - min(o["t0"] for o in outs)
    requests = sum(o["ok"]["timed"] for o in outs)
    loadgen_cpu = sum(o["cpu"] for o in outs)
    return LevelResult(
        concurrency=concurrency, load_processes=procs, requests=requests,
        rate=requests / elapsed, p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000, max_ms=(latencies[-1] if latencies else 0) * 1000,
        errors=sum(errors.values()), ok_total=sum(sum(o["ok"].values()) for o in outs),
        elapsed=elapsed, **cpu.cores(loadgen_cpu, elapsed),
        exhausted=any(o["exhausted"] for o in outs), error_samples=dict(errors.most_common(10)),
        server_us_per_cert=cpu.us_per_certificate(requests))
