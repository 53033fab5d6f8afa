"""Watching a daemon from outside, for bench/load.py, bench/soak.py, bench/churn.py and
tests/world/test_churn.py: RSS and its peak, threads, open fds by kind, CPU time, the open-files limit, and a
thread that samples them while a benchmark runs. Linux /proc only."""

from __future__ import annotations

import collections
import os
import resource
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TCP_STATES = {
    "01": "established",
    "02": "syn_sent",
    "03": "syn_recv",
    "04": "fin_wait1",
    "05": "fin_wait2",
    "06": "time_wait",
    "07": "close",
    "08": "close_wait",
    "09": "last_ack",
    "0A": "listen",
    "0B": "closing",
}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def status_int(pid: int, key: str) -> int:
    """A number of /proc/PID/status (VmRSS and VmHWM in kB, Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def status_mib(pid: int, key: str) -> float:
    """A kB field of /proc/PID/status (VmRSS, VmHWM) in MiB."""
    return status_int(pid, key) / 1024


def threads(pid: int) -> int:
    return status_int(pid, "Threads")


def reset_peak_rss(pid: int) -> None:
    """Sets the process's VmHWM to its VmRSS now (Linux >= 4.0), so VmHWM read later is the peak since."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _socket_kinds(pid: int) -> dict[str, str]:
    """Socket inode -> "tcp <state>" or "unix", from the process's network namespace."""
    kinds: dict[str, str] = {}
    for proto in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9:
                kinds[parts[9]] = f"tcp {TCP_STATES.get(parts[3], parts[3])}"
    try:
        for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) > 6:
                kinds[parts[6]] = "unix"
    except OSError:
        pass
    return kinds


def fd_kinds(pid: int) -> dict[str, int]:
    """Open fds by kind: "tcp established", "tcp close_wait", "unix", "file", "pipe", "eventpoll", …"""
    counts: collections.Counter[str] = collections.Counter()
    sockets: dict[str, str] | None = None
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets = sockets if sockets is not None else _socket_kinds(pid)
            counts[sockets.get(target[8:-1], "socket (other)")] += 1
        elif target.startswith("pipe:"):
            counts["pipe"] += 1
        elif target.startswith("anon_inode:"):
            counts[target.removeprefix("anon_inode:").strip("[]")] += 1
        elif target.startswith("/dev/"):
            counts["dev"] += 1
        elif target.startswith("/"):
            counts["file"] += 1
        else:
            counts["other"] += 1
    return dict(sorted(counts.items()))


def tcp_counters(*names: str) -> dict[str, int]:
    """System-wide TcpExt counters from /proc/net/netstat (ListenOverflows, ListenDrops, …)."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    for keys, values in zip(lines[::2], lines[1::2], strict=False):
        if keys and keys[0] == "TcpExt:":
            found = dict(zip(keys[1:], map(int, values[1:]), strict=False))
            return {name: found.get(name, 0) for name in names}
    return dict.fromkeys(names, 0)


def nofile_limit(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a running process (-1 for unlimited)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return (-1 if soft == "unlimited" else int(soft)), (-1 if hard == "unlimited" else int(hard))
    raise RuntimeError(f"no open-files limit in /proc/{pid}/limits")


def set_nofile(soft: int) -> tuple[int, int]:
    """Sets this process's soft RLIMIT_NOFILE (children inherit it), raising the hard limit as well when
    allowed (root); returns the limits now in force."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, soft))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def checked_pid(pid: int | None, needle: str) -> int:
    """``pid`` once its command line is checked to be the daemon (``needle``), not a setpriv wrapper."""
    if pid is None:
        raise RuntimeError(f"{needle} is not running")
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if needle.encode() not in b" ".join(argv) or argv[0].endswith(b"setpriv"):
        raise RuntimeError(f"pid {pid} is not {needle}: {argv!r}")
    return pid


def wait_fds(pid: int, at_most: int, timeout: float) -> tuple[int, float]:
    """Polls until the process has at most ``at_most`` open fds or ``timeout`` passed; (count, seconds)."""
    began = time.monotonic()
    while True:
        count = fd_count(pid)
        waited = time.monotonic() - began
        if count <= at_most or waited >= timeout:
            return count, waited
        time.sleep(0.2)


def quarters(values: list[float]) -> tuple[float, float]:
    """Means of the second and the last quarter: the first is warm-up (caches, allocator arenas fill)."""
    n = max(1, len(values) // 4)
    return statistics.mean(values[n : 2 * n] or values[:n]), statistics.mean(values[-n:])


@dataclass
class Sample:
    seconds: float
    rss_mib: float
    fds: int
    threads: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Sampler:
    """Samples a process's RSS, fd and thread counts every ``interval`` seconds in a thread, between start()
    and stop() (or as a context manager). ``probe`` adds more figures to each sample."""

    def __init__(self, pid: int, interval: float, probe: Any = None) -> None:
        self.pid = pid
        self.interval = interval
        self.probe = probe
        self.samples: list[Sample] = []
        self.peak_fd_kinds: dict[str, int] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{pid}", daemon=True)
        self._began = 0.0

    def _take(self) -> None:
        try:
            fds = fd_count(self.pid)
            sample = Sample(
                time.monotonic() - self._began, status_mib(self.pid, "VmRSS"), fds, threads(self.pid)
            )
            if self.probe is not None:
                sample.extra = self.probe()
            if not self.samples or fds > max(s.fds for s in self.samples):
                self.peak_fd_kinds = fd_kinds(self.pid)
            self.samples.append(sample)
        except (OSError, RuntimeError, ValueError) as exc:
            self.errors.append(repr(exc))

    def _run(self) -> None:
        while True:
            self._take()
            if self._stop.wait(self.interval):
                return

    def start(self) -> Sampler:
        self._began = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def max_fds(self) -> int:
        return max((s.fds for s in self.samples), default=0)

    @property
    def max_rss_mib(self) -> float:
        return max((s.rss_mib for s in self.samples), default=0.0)

    @property
    def max_threads(self) -> int:
        return max((s.threads for s in self.samples), default=0)
