"""Where the CPU goes during a run: /proc accounting by process and thread, and py-spy.

The machine is shared, so every level also records what the rest of the machine used and what
the hypervisor stole (CpuWindow): a figure is read together with those.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from harness.common import PY_SPY, say

if TYPE_CHECKING:
    from harness.ca import Server

CLK_TCK = os.sysconf("SC_CLK_TCK")


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



class CpuWindow:
    """CPU used while one level runs: by the server (and by role of its threads), by the whole
    machine, and stolen by the hypervisor. Opened just before the timed run, closed after it."""

    def __init__(self, server: Server) -> None:
        self._server = server
        (self._busy0, self._steal0), self._server0 = system_busy_seconds(), server.cpu_seconds()
        self._threads0 = server.thread_cpu()
        self._wall0 = time.perf_counter()
        self.wall = self.server_cpu = self.busy = self.stolen = 0.0
        self._threads1: dict[str, float] = {}

    def close(self) -> None:
        self.wall = time.perf_counter() - self._wall0
        (busy1, steal1), self.server_cpu = (system_busy_seconds(),
                                            self._server.cpu_seconds() - self._server0)
        self.busy = busy1 - self._busy0
        self.stolen = steal1 - self._steal0
        self._threads1 = self._server.thread_cpu()

    def us_per_certificate(self, certificates: int) -> dict[str, float]:
        """Server CPU per certificate by thread role (warm-up and stragglers only in so far as
        they fall in the window)."""
        return {role: (cpu - self._threads0.get(role, 0.0)) / max(certificates, 1) * 1e6
                for role, cpu in self._threads1.items()}

    def cores(self, loadgen_cpu: float, elapsed: float) -> dict[str, float]:
        """Cores used by the server, the load generator, everything else, and stolen."""
        return {"server_cores": self.server_cpu / self.wall,
                "loadgen_cores": loadgen_cpu / elapsed,
                "other_cores": max(0.0, (self.busy - self.server_cpu) / self.wall
                                   - loadgen_cpu / elapsed),
                "stolen_cores": self.stolen / self.wall}


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
