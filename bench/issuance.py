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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import queue
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent  # the venv's bin: applianctl and py-spy live next to python
APPLIANCTL = BIN / "applianctl"
PY_SPY = BIN / "py-spy"
TARGET_RATE = 1000.0  # certificates/s at concurrency 32 ...
TARGET_P99_MS = 50.0  # ... with p99 below this
LATER_TARGET_RATE = 3000.0
TOKEN_LIFETIME = 600  # seconds; tokens are minted before each level, so they outlive it
SPLIT_FROM = 8  # from this concurrency on the load generator runs in two processes
READY_TIMEOUT = 120.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- small helpers ---------------------------------------------------------------------------
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


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process, all its threads (0 when it is gone)."""
    return proc_cpu_seconds_path(Path(f"/proc/{pid}/stat"))


def system_busy_seconds() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine (all cores), from /proc/stat.

    Stolen time is when this virtual machine wanted a CPU and the hypervisor ran another guest:
    the host's contention, which slows everything measured here by as much.
    """
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    steal = values[7] if len(values) > 7 else 0
    return (sum(values[:7]) - idle) / CLK_TCK, steal / CLK_TCK


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                out += [int(p) for p in (task / "children").read_text().split()]
    return out


def worker_pids(server_pid: int) -> list[int]:
    """The supervisor's worker processes (spawned; the resource tracker is left out)."""
    pids = []
    for pid in child_pids(server_pid):
        with contextlib.suppress(FileNotFoundError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"resource_tracker" not in cmd:
                pids.append(pid)
    return pids


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names of a process by OS thread id, from `py-spy dump` (empty if unavailable).

    Python 3.11 does not give its threads OS-level names, so /proc alone cannot tell the event
    loop from the PKCS#11 thread or the database writer."""
    if not PY_SPY.exists():
        return {}
    try:
        out = subprocess.run([str(PY_SPY), "dump", "--pid", str(pid)], capture_output=True,
                             text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = {}
    for line in out.splitlines():
        m = re.match(r'Thread (?:0x)?(\w+) \(.*\): "(.*)"', line)
        if m:
            with contextlib.suppress(ValueError):
                names[int(m.group(1))] = re.sub(r"_\d+$", "", m.group(2))
    return names


def thread_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds of every thread of the given processes, by OS thread id."""
    out = {}
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                out[int(task.name)] = proc_cpu_seconds_path(task / "stat")
    return out


def proc_cpu_seconds_path(path: Path) -> float:
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def softhsm_version() -> str:
    try:
        out = subprocess.run(["softhsm2-util", "--version"], capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def code_revision() -> str:
    """The product code measured: commit, and whether the working tree differs from it."""
    repo = Path(__file__).resolve().parent.parent
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


# -- the throwaway CA and its server -------------------------------------------------------------
@dataclass
class Ca:
    dir: Path
    home: Path
    port: int
    issuer_pin_file: Path
    provisioner_password_file: Path
    fingerprint: str
    config: dict[str, Any]

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/1.0/sign"

    @property
    def root_path(self) -> Path:
        return self.home / "certs" / "root_ca.crt"

    @property
    def intermediate_path(self) -> Path:
        return self.home / "certs" / "intermediate_ca.crt"

    @property
    def db_path(self) -> Path:
        return Path(self.config["db"]["dataSource"])

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["APPLIANCE_HOME"] = str(self.home)
        env.pop("SOFTHSM2_CONF", None)  # the CA points SoftHSM2 at its own token directory
        return env


def create_ca(workdir: Path, port: int, pin_workers: bool = True) -> Ca:
    secrets_dir = workdir / "secrets"
    secrets_dir.mkdir(mode=0o700)
    files = {}
    for name in ("root-pin", "issuer-pin", "provisioner-password"):
        files[name] = secrets_dir / name
        write_secret(files[name], secrets.token_urlsafe(18))
    home = workdir / "home"
    ca = Ca(workdir, home, port, files["issuer-pin"], files["provisioner-password"], "", {})
    out = subprocess.run(
        [str(APPLIANCTL), "init", "--name", "Bench", "--address", f"127.0.0.1:{port}",
         "--password-file", str(files["root-pin"]),
         "--issuer-password-file", str(files["issuer-pin"]),
         "--provisioner-password-file", str(files["provisioner-password"])],
        env=ca.env(), capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0:
        raise SystemExit(f"applianctl init failed ({out.returncode}):\n{out.stderr}{out.stdout}")
    ca.fingerprint = out.stdout.strip().splitlines()[-1].strip()
    config_path = home / "config" / "ca.json"
    ca.config = json.loads(config_path.read_text())
    if not pin_workers:
        ca.config["pinWorkers"] = False
        config_path.write_text(json.dumps(ca.config, indent=2))
    return ca


class Server:
    def __init__(self, ca: Ca, workers: int) -> None:
        self.ca = ca
        self.workers = workers
        self.log_path = ca.dir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._names: dict[int, dict[int, str]] = {}  # worker pid -> {tid: Python thread name}

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(APPLIANCTL), "serve", "--issuer-password-file", str(self.ca.issuer_pin_file),
             "--workers", str(self.workers)],
            env=self.ca.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"applianctl serve exited with {self.proc.returncode}:\n"
                                 f"{self.tail()}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("event") == "serving":
                        return
            time.sleep(0.1)
        raise SystemExit(f"applianctl serve was not ready in {READY_TIMEOUT:.0f} s:\n{self.tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        return [self.pid, *worker_pids(self.pid)]

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(p) for p in self.pids())

    def label_threads(self) -> None:
        """Learn the Python names of the workers' threads (again when new threads appeared)."""
        for pid in worker_pids(self.pid):
            known = self._names.get(pid)
            if known is None or set(thread_cpu([pid])) - set(known) - {pid}:
                self._names[pid] = thread_names(pid)

    def thread_cpu(self) -> dict[str, float]:
        """CPU seconds so far by role: the workers' event loops, their named threads (pkcs11,
        db-writer, ...), unnamed threads ("other"), and the supervisor."""
        out: dict[str, float] = {"event loop": 0.0}
        for pid in worker_pids(self.pid):
            names = self._names.get(pid, {})
            for tid, cpu in thread_cpu([pid]).items():
                role = "event loop" if tid == pid else names.get(tid, "other")
                if role.startswith("Thread-") or role.startswith("asyncio"):
                    role = "other"  # executor and unnamed threads
                out[role] = out.get(role, 0.0) + cpu
        out["supervisor"] = sum(thread_cpu([self.pid]).values())
        return out

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def error_lines(self, limit: int = 10) -> list[str]:
        """Log lines that are not plain successful request lines (warnings, errors, tracebacks)."""
        out = []
        with contextlib.suppress(FileNotFoundError), self.log_path.open(errors="replace") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    out.append(line.rstrip())
                else:
                    if event.get("level") not in (None, "info") or (
                            event.get("event") == "request" and event.get("status") != 201):
                        out.append(line.rstrip())
                if len(out) >= limit:
                    break
        return out

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


# -- (a) raw signing rate through the KeyStore ---------------------------------------------------
@dataclass(frozen=True)
class KeyAccess:
    softhsm_conf: str
    module: str
    token: str
    pin: str
    key_uri: str
    intermediate_pem: bytes


def key_access(ca: Ca) -> KeyAccess:
    from hsm.uri import Pkcs11Uri

    uri = Pkcs11Uri.parse(ca.config["kms"]["uri"])
    assert uri.module_path and uri.token
    return KeyAccess(ca.config["kms"]["softhsmConf"], uri.module_path, uri.token,
                     ca.issuer_pin_file.read_text().strip(), ca.config["key"],
                     ca.intermediate_path.read_bytes())


def _timed_loop(fn: Any, seconds: float) -> tuple[int, float]:
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        fn()
        n += 1
        if n % 32 == 0 and time.perf_counter() >= end:
            return n, time.perf_counter() - start


BARRIER_TIMEOUT = 120.0


def raw_sign_child(access: KeyAccess, seconds: float, barrier: Any, results: Any) -> None:
    try:
        results.put(_raw_sign_child(access, seconds, barrier))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which retries or fails
        with contextlib.suppress(Exception):
            barrier.abort()  # do not leave the sibling waiting
        results.put({"fatal": f"{type(e).__name__}: {e}"})


def _raw_sign_child(access: KeyAccess, seconds: float, barrier: Any) -> dict[str, Any]:
    """One process: log in, then time signatures on the PKCS#11 thread, hopped, and leaf builds."""
    os.environ["SOFTHSM2_CONF"] = access.softhsm_conf  # before the module is loaded
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from hsm.pkcs11_store import Pkcs11KeyStore

    out: dict[str, Any] = {}
    ks = Pkcs11KeyStore.open(access.module, access.token, access.pin)
    try:
        key = ks.private_key(ks.find_uri(access.key_uri))
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SystemExit("the benchmark's raw loop expects an EC issuer key")
        out["key"] = f"EC {key.curve.name} ({type(key).__name__})"
        algorithm = ec.ECDSA(hashes.SHA256())
        tbs = secrets.token_bytes(420)  # about the size of a leaf's to-be-signed part

        def sign() -> None:
            key.sign(tbs, algorithm)

        intermediate = x509.load_pem_x509_certificate(access.intermediate_pem)
        leaf_public = ec.generate_private_key(ec.SECP256R1()).public_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raw.bench.test")])
        now = datetime.now(UTC)

        def build() -> None:
            (x509.CertificateBuilder().subject_name(name).issuer_name(intermediate.subject)
             .public_key(leaf_public).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(now.replace(year=now.year + 1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.SubjectAlternativeName([x509.DNSName("raw.bench.test")]),
                            critical=False)
             .sign(key, hashes.SHA256()))

        ks.run(_timed_loop, sign, 0.3)  # warm up
        barrier.wait(BARRIER_TIMEOUT)
        out["on_thread"] = ks.run(_timed_loop, sign, seconds)
        barrier.wait(BARRIER_TIMEOUT)
        out["hopped"] = _timed_loop(sign, seconds)
        barrier.wait(BARRIER_TIMEOUT)
        out["build"] = ks.run(_timed_loop, build, seconds)
    finally:
        ks.close()
    return out


@dataclass
class RawRates:
    key: str
    on_thread_1: float
    hopped_1: float
    build_1: float
    on_thread_2: float
    hopped_2: float
    build_2: float


def measure_raw(access: KeyAccess, seconds: float) -> RawRates:
    rates = {procs: _raw_round(access, seconds, procs) for procs in (1, 2)}

    def rate(procs: int, what: str) -> float:
        return float(sum(r[what][0] / r[what][1] for r in rates[procs]))

    return RawRates(rates[1][0]["key"], rate(1, "on_thread"), rate(1, "hopped"), rate(1, "build"),
                    rate(2, "on_thread"), rate(2, "hopped"), rate(2, "build"))


def _raw_round(access: KeyAccess, seconds: float, procs: int, attempts: int = 3
               ) -> list[dict[str, Any]]:
    """Run `procs` raw-signing processes side by side; retry when one of them fails.

    SoftHSM2 2.6.1 sometimes reports the token as absent to a process that opens it while other
    processes use it ("Token integrity check failed", SoftHSMv2 issue #757), so a failed login
    is retried with fresh processes and reported.
    """
    ctx = multiprocessing.get_context("spawn")
    failures: list[str] = []
    for _ in range(attempts):
        barrier = ctx.Barrier(procs)
        results = ctx.Queue()
        children = [ctx.Process(target=raw_sign_child, args=(access, seconds, barrier, results),
                                daemon=True) for _ in range(procs)]
        for c in children:
            c.start()
        try:
            outs = [results.get(timeout=BARRIER_TIMEOUT + 4 * seconds + 60) for _ in children]
        except queue.Empty:
            outs = [{"fatal": "no result from a raw signing process"}]
        for c in children:
            c.join(30)
            if c.is_alive():
                c.kill()
        fatal = [o["fatal"] for o in outs if "fatal" in o]
        if not fatal:
            return outs
        failures += fatal
        say(f"  raw signing with {procs} process(es) failed ({'; '.join(fatal)}); retrying")
    raise SystemExit(f"raw signing failed {attempts} times: {failures}")


# -- (b) the HTTP load generator -------------------------------------------------------------------
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
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from appliance.authority.provisioners.jwk import TokenSigner
    from appliance.authority.provisioners.jwk_keys import decrypt_private_key
    from appliance.client import make_csr

    key, _ = decrypt_private_key(spec.encrypted_key, spec.password)
    signer = TokenSigner.for_key(key, spec.provisioner)
    subject = f"load-{spec.index}.bench.test"
    csr_pem = make_csr(ec.generate_private_key(ec.SECP256R1()), subject, [subject]).public_bytes(
        serialization.Encoding.PEM).decode()
    started = time.perf_counter()
    # Bodies are serialised up front so the timed phase spends the load generator's CPU on HTTP.
    bodies = [json.dumps({"csr": csr_pem, "ott": signer.mint(
        subject, audience=spec.url, sans=[subject], root_fingerprint=spec.root_fingerprint,
        lifetime=TOKEN_LIFETIME)}).encode() for _ in range(spec.tokens)]
    mint_seconds = time.perf_counter() - started
    import asyncio

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

    def check_first(body: bytes) -> None:
        """Verify one answer fully: a leaf for our subject signed by the intermediate."""
        data = json.loads(body)
        cert = x509.load_pem_x509_certificate(data["crt"].encode())
        cert.verify_directly_issued_by(intermediate)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [subject], names
        assert len(data["certChain"]) == 2, "certChain should be leaf + intermediate"

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
                check_first(answer)
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
    (busy0, steal0), server0 = system_busy_seconds(), server.cpu_seconds()
    threads0 = server.thread_cpu()
    wall0 = time.perf_counter()
    spy = profile.start(server, duration, concurrency) if profile else None
    try:
        outs = [results.get(timeout=duration + 300) for _ in children]
    except queue.Empty:
        raise SystemExit("a load generator process died without reporting") from None
    wall = time.perf_counter() - wall0
    (busy1, steal1), server_cpu = system_busy_seconds(), server.cpu_seconds() - server0
    busy = busy1 - busy0
    threads1 = server.thread_cpu()
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
    # Includes the warm-up and the stragglers only in so far as they fall in the window.
    per_cert = {role: (cpu - threads0.get(role, 0.0)) / max(requests, 1) * 1e6
                for role, cpu in threads1.items()}
    return LevelResult(
        concurrency=concurrency, load_processes=procs, requests=requests,
        rate=requests / elapsed, p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000, max_ms=(latencies[-1] if latencies else 0) * 1000,
        errors=sum(errors.values()), ok_total=sum(sum(o["ok"].values()) for o in outs),
        elapsed=elapsed, server_cores=server_cpu / wall, loadgen_cores=loadgen_cpu / elapsed,
        other_cores=max(0.0, (busy - server_cpu) / wall - loadgen_cpu / elapsed),
        stolen_cores=(steal1 - steal0) / wall,
        exhausted=any(o["exhausted"] for o in outs), error_samples=dict(errors.most_common(10)),
        server_us_per_cert=per_cert)


# -- (b) with wrk: the load generator in C, so that the server gets the machine ------------------
WRK_SCRIPT = Path(__file__).resolve().parent / "sign_load.lua"
WRK = shutil.which("wrk") or "wrk"


def mint_bodies_child(encrypted_key: str, password: bytes, provisioner: str, url: str,
                      root_fingerprint: str, subject: str, count: int, out: str) -> None:
    """Write `count` request bodies, one line each, every one with its own one-time token."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from appliance.authority.provisioners.jwk import TokenSigner
    from appliance.authority.provisioners.jwk_keys import decrypt_private_key
    from appliance.client import make_csr

    key, _ = decrypt_private_key(encrypted_key, password)
    signer = TokenSigner.for_key(key, provisioner)
    csr_pem = make_csr(ec.generate_private_key(ec.SECP256R1()), subject, [subject]).public_bytes(
        serialization.Encoding.PEM).decode()
    with open(out, "w") as f:
        for _ in range(count):
            f.write(json.dumps({"csr": csr_pem, "ott": signer.mint(
                subject, audience=url, sans=[subject], root_fingerprint=root_fingerprint,
                lifetime=TOKEN_LIFETIME)}) + "\n")


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
        data = json.loads(body)
        cert = x509.load_pem_x509_certificate(data["crt"].encode())
        cert.verify_directly_issued_by(
            x509.load_pem_x509_certificate(ca.intermediate_path.read_bytes()))
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [subject], names
        assert len(data["certChain"]) == 2, "certChain should be leaf + intermediate"
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
    (busy0, steal0), server0 = system_busy_seconds(), server.cpu_seconds()
    threads0 = server.thread_cpu()
    wall0 = time.perf_counter()
    proc = subprocess.Popen([*argv, "-d", f"{duration:g}s", url],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    spy = profile.start(server, duration, concurrency) if profile else None
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    wall = time.perf_counter() - wall0
    (busy1, steal1), server_cpu = system_busy_seconds(), server.cpu_seconds() - server0
    busy = busy1 - busy0
    threads1 = server.thread_cpu()
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
    per_cert = {role: (cpu - threads0.get(role, 0.0)) / max(r["created"], 1) * 1e6
                for role, cpu in threads1.items()}
    return LevelResult(
        concurrency=concurrency, load_processes=threads, requests=r["created"],
        rate=r["created"] / elapsed, p50_ms=r["p50_us"] / 1000, p99_ms=r["p99_us"] / 1000,
        max_ms=r["max_us"] / 1000, errors=sum(errors.values()),
        ok_total=r["created"] + warm_result["created"], elapsed=elapsed,
        server_cores=server_cpu / wall, loadgen_cores=loadgen_cpu / elapsed,
        other_cores=max(0.0, (busy - server_cpu) / wall - loadgen_cpu / elapsed),
        stolen_cores=(steal1 - steal0) / wall,
        exhausted=r["exhausted"] > 0, error_samples=dict(errors.most_common(10)),
        server_us_per_cert=per_cert, abandoned_max=2 * concurrency)  # warm-up and timed run


# -- optional: py-spy on the server's workers during the last level ------------------------------
class Profiler:
    def __init__(self, outdir: Path, seconds: float, native: bool) -> None:
        self.outdir = outdir
        self.seconds = seconds
        self.native = native
        self.files: list[Path] = []

    def start(self, server: Server, duration: float, concurrency: int
              ) -> list[subprocess.Popen[bytes]] | None:
        if not PY_SPY.exists():
            say(f"  (no {PY_SPY}: not profiling)")
            return None
        seconds = max(1, int(min(self.seconds, duration - 1)))
        spies = []
        for n, pid in enumerate(worker_pids(server.pid)):
            path = self.outdir / f"py-spy-c{concurrency}-worker{n}-{pid}.txt"
            self.files.append(path)
            argv = [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(seconds),
                    "--rate", "100", "--threads", "--format", "raw", "--output", str(path)]
            # Without --native, sample without pausing the worker (py-spy cannot do both).
            argv.append("--native" if self.native else "--nonblocking")
            spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        return spies

    def finish(self, spies: list[subprocess.Popen[bytes]]) -> None:
        for s in spies:
            try:
                s.wait(60)
            except subprocess.TimeoutExpired:
                s.kill()
                s.wait()

    def summary(self, top: int = 20) -> str:
        """Share of samples by thread, self time by function, and inclusive time of product code."""
        threads: Counter[str] = Counter()
        own: Counter[str] = Counter()
        product: Counter[str] = Counter()
        total = 0
        for path in self.files:
            with contextlib.suppress(FileNotFoundError), path.open() as f:
                for line in f:
                    stack, _, count = line.rstrip("\n").rpartition(" ")
                    if not stack or not count.isdigit():
                        continue
                    n = int(count)
                    frames = stack.split(";")
                    if frames[0].startswith("thread ("):  # --threads puts the thread first
                        name = frames.pop(0).split(": ", 1)[-1]
                        threads[re.sub(r"_\d+$", "", name)] += n
                    if not frames:
                        continue
                    total += n
                    own[frames[-1]] += n
                    for frame in set(frames):
                        if "appliance/" in frame or "hsm/" in frame:
                            product[frame] += n
        if not total:
            return "  (no samples)"
        lines = [f"  {total} samples (py-spy counts threads that are not idle, including some "
                 f"waiting in system calls) over {len(self.files)} worker(s)"]
        lines.append("  by thread: " + ", ".join(
            f"{name} {100 * n / total:.0f}%" for name, n in threads.most_common()))
        lines.append("  self time:")
        lines += [f"    {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
        lines.append("  inclusive time, product code:")
        lines += [f"    {100 * n / total:5.1f}%  {frame}" for frame, n in product.most_common(top)]
        return "\n".join(lines)


# -- verification and report ---------------------------------------------------------------------
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
