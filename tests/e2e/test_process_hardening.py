"""What a running CA gives away beyond its answers: core dumps, its memory, its versions, its log.

The CA of this module runs with the core-file limit raised to the machine's hard limit (as a
shell with `ulimit -c unlimited` would start it) and, when the tests run as root, without any
capability (setpriv): a process of the same user without CAP_SYS_PTRACE may read the
/proc/PID/environ of a dumpable process but not of a non-dumpable one, which makes
PR_SET_DUMPABLE observable from outside. kernel.core_pattern is the machine's and is only read.
It also listens on an insecureAddress, so that every listener's Server header is checked.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import CaServer, free_port

pytestmark = pytest.mark.e2e

# As root, setpriv drops every capability (bounding and inheritable sets) for the command it
# runs; any other user has none to drop.
WITHOUT_CAPABILITIES: tuple[str, ...] = (
    ("setpriv", "--bounding-set=-all", "--inh-caps=-all") if os.geteuid() == 0 else ())


def _limit_text(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


@pytest.fixture(scope="module")
def hardened_ca(ca: CaServer) -> Iterator[CaServer]:
    """The module's CA, restarted with an insecureAddress and core files allowed by its shell."""
    ca.stop()
    config = json.loads(ca.config_path.read_text())
    config["insecureAddress"] = f"127.0.0.1:{free_port()}"
    ca.config_path.write_text(json.dumps(config))
    hard = _limit_text(resource.getrlimit(resource.RLIMIT_CORE)[1])
    ca.start(prefix=(*WITHOUT_CAPABILITIES, "prlimit", f"--core={hard}:{hard}", "--"))
    yield ca


def server_processes(ca: CaServer) -> dict[str, int]:
    """Process title -> pid of the CA's supervisor and workers (its session: start_new_session)."""
    assert ca.process is not None
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != ca.process.pid:
                continue
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue  # gone meanwhile
        if title.startswith("applianctl: "):
            found[title.removeprefix("applianctl: ").strip()] = int(entry.name)
    return found


def core_limits(pid: int) -> tuple[str, str]:
    limits = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max core file size\s+(\S+)\s+(\S+)", limits, re.MULTILINE)
    assert match, limits
    return match.group(1), match.group(2)


def environ_readable(pid: int) -> subprocess.CompletedProcess[str]:
    """Read /proc/PID/environ as the CA's user, with the CA's (lack of) capabilities."""
    return subprocess.run([*WITHOUT_CAPABILITIES, "cat", f"/proc/{pid}/environ"],
                          capture_output=True, text=True, timeout=10, check=False)


def test_supervisor_and_workers_forbid_core_dumps_and_reading_their_memory(
        hardened_ca: CaServer) -> None:
    processes = server_processes(hardened_ca)
    assert set(processes) == {"supervisor", "worker 0", "worker 1"}, processes
    # The reader can read a dumpable process of the same user: a refusal below is the CA's.
    control = subprocess.Popen([*WITHOUT_CAPABILITIES, "sleep", "30"])
    try:
        time.sleep(0.2)
        readable = environ_readable(control.pid)
        assert readable.returncode == 0, f"the reader cannot read a dumpable process: {readable}"
    finally:
        control.kill()
        control.wait(10)
    for title, pid in processes.items():
        assert core_limits(pid) == ("0", "0"), (
            f"{title} (pid {pid}) may write a core file: /proc/{pid}/limits says "
            f"{core_limits(pid)}")
        attempt = environ_readable(pid)
        assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, (
            f"{title} (pid {pid}) is dumpable: another process of its user read "
            f"/proc/{pid}/environ")


def is_running(pid: int) -> bool:
    """Not exited (a zombie has exited: its supervisor may reap it later)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_a_worker_killed_by_sigsegv_leaves_no_core(hardened_ca: CaServer) -> None:
    pid = server_processes(hardened_ca)["worker 1"]
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    # A plain file pattern is written relative to the crashing process's working directory.
    core_dir = Path(os.readlink(f"/proc/{pid}/cwd")) / Path(pattern).parent
    prefix = Path(pattern).name.split("%", 1)[0]
    before = set(core_dir.glob(f"{prefix}*"))
    since = hardened_ca.log_size()
    os.kill(pid, signal.SIGSEGV)
    hardened_ca.wait_for_event("worker_died", since)
    hardened_ca.wait_for_event("worker_ready", since)
    deadline = time.monotonic() + 30  # a core, were one written, is complete at its exit
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    new_cores = set(core_dir.glob(f"{prefix}*")) - before
    for core in new_cores:
        core.unlink()
    if not pattern.startswith("|"):  # a pipe (systemd-coredump) leaves no file to look for
        assert not new_cores, f"the crashed worker left {sorted(map(str, new_cores))}"
    replaced = server_processes(hardened_ca)["worker 1"]
    assert replaced != pid and core_limits(replaced) == ("0", "0")


def server_header(url: str, context: ssl.SSLContext | None = None) -> str | None:
    try:
        with urllib.request.urlopen(url, context=context, timeout=10) as answer:  # noqa: S310
            value = answer.headers.get("Server")
    except urllib.error.HTTPError as e:  # a 4xx still carries the header
        value = e.headers.get("Server")
    return None if value is None else str(value)


def test_no_listener_names_its_software_versions(hardened_ca: CaServer) -> None:
    insecure = json.loads(hardened_ca.config_path.read_text())["insecureAddress"]
    context = hardened_ca.ssl_context()
    seen = {
        "API": server_header(f"{hardened_ca.url}/health", context),
        "ACME": server_header(f"{hardened_ca.url}/acme/no-such-provisioner/directory", context),
        "plain HTTP": server_header(f"http://{insecure}/roots.pem"),
    }
    answer = hardened_ca.raw_tls_request(b"GET / HTTP/1.1\r\nHost: localhost\r\nX: a\x01\r\n\r\n")
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0], answer[:200]
    found = re.search(rb"^Server: (.*)\r$", answer, re.MULTILINE)
    seen["malformed HTTP"] = found.group(1).decode() if found else None
    for listener, header in seen.items():
        assert header in (None, "appliance"), f"{listener}: Server: {header}"


def test_malformed_http_is_logged_as_one_json_line_without_what_was_sent(
        hardened_ca: CaServer) -> None:
    marker = secrets.token_hex(12)
    credential = f"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ{marker}.c2ln"
    since = hardened_ca.log_size()
    for request in (  # a header value with a control byte; a NUL in the request line's URL
            f"GET /health HTTP/1.1\r\nHost: localhost\r\nX: {credential}\x01\r\n\r\n",
            f"GET /health\x00pin={marker} HTTP/1.1\r\nHost: localhost\r\n\r\n"):
        answer = hardened_ca.raw_tls_request(request.encode())
        assert b" 400 " in answer.split(b"\r\n")[0], answer[:200]
    deadline = time.monotonic() + 10
    while True:
        refused = [e for e in hardened_ca.events(since) if e.get("logger") == "aiohttp.server"]
        if len(refused) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    with open(hardened_ca.log_path, "rb") as f:
        f.seek(since)
        written = f.read().decode(errors="replace")
    assert [e.get("error") for e in refused] == ["BadHttpMessage", "InvalidURLError"], written
    assert all(e["event"] == "library_log" and e["level"] == "error" for e in refused), refused
    assert "Traceback" not in written, written
    assert marker not in written and "eyJhbGciOiJFUzI1NiJ9" not in written, written
    for line in written.splitlines():
        assert isinstance(json.loads(line), dict), f"not a JSON log line: {line!r}"
