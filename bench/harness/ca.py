"""The throwaway CA a benchmark runs against, its server, and access to its issuer key."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.common import APPLIANCTL, READY_TIMEOUT
from harness.cpu import proc_cpu_seconds, thread_cpu, thread_names, worker_pids


def write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")



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
