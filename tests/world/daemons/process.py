"""The test world's foundations: where the unpacked daemons are, running commands, temp dirs that are
swept even after a SIGKILL, processes in their own sessions, HTTP over unix sockets, and `Service`, the
base of every daemon the tests start (see the package's docstring for the layered cleanup).
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, TypeVar

T = TypeVar("T")

WORLD_DIR = Path(os.environ.get("K3D_REGISTRY_DOCKERD_WORLD", "/opt/k3d-registry-dockerd-world"))
"""Where scripts/install-test-world unpacked the daemons (dpkg -x, nothing installed)."""
BOOKWORM_USR = WORLD_DIR / "bookworm" / "usr"
"""Debian 12's Docker 20.10, containerd 1.6, runc, Podman and distribution's registry."""
DOCKER26_USR = WORLD_DIR / "docker26" / "usr"
"""Debian trixie's Docker 26.1 and containerd 1.7."""
DOCKER28_USR = WORLD_DIR / "docker28" / "usr"
"""Debian sid's Docker 28.5 (API 1.51) and containerd 2.1."""
PODMAN5_ROOT = WORLD_DIR / "podman5"
"""A debootstrapped Debian trixie root with Podman 5 (which needs glibc 2.38), entered with chroot."""
ROOTLESS_UID = 1000
"""The user (and group) rootless Podman runs as: k3rd in PODMAN5_ROOT's /etc, with subordinate IDs there."""
RUNC_PATH = (BOOKWORM_USR / "sbin", BOOKWORM_USR / "bin")
"""Last on every daemon's PATH: bookworm's runc (newer suites' runc needs a newer glibc), tini, shims."""
DOCKER_CLI = DOCKER26_USR / "bin" / "docker"
# BuildKit's client (`docker build` with DOCKER_BUILDKIT=1), found in each daemon's DOCKER_CONFIG.
BUILDX_PLUGIN = DOCKER28_USR / "libexec" / "docker" / "cli-plugins" / "docker-buildx"
"""The docker CLI of the tests: 26.1 negotiates the API version with every daemon here."""
REPO_ROOT = Path(__file__).resolve().parents[3]
KEEP_TEMP = os.environ.get("K3RD_KEEP_TEMP", "") not in ("", "0")
"""Set K3RD_KEEP_TEMP=1 to keep daemon dirs and logs after the run, for debugging."""
OWNER_FILE = ".k3rd-owner"
"""In each temp dir: pid of the Python process that made it, for sweep_stale_dirs()."""


class WorldUnavailable(RuntimeError):
    """A binary the world needs is absent; pytest fixtures turn this into a loud skip."""


class CommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message carries the output, so a failing test shows why."""

    def __str__(self) -> str:
        def tail(text: str | bytes | None) -> str:
            if isinstance(text, bytes):
                text = text.decode(errors="replace")
            return (text or "").strip()[-4000:]

        return (
            f"{' '.join(map(str, self.cmd))!r} exited with {self.returncode}\n"
            f"--- stdout ---\n{tail(self.stdout)}\n--- stderr ---\n{tail(self.stderr)}"
        )


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    input: str | None = None,
    timeout: float = 600,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing text output; raise CommandError on failure."""
    proc = subprocess.run(
        [str(a) for a in argv],
        env=dict(env) if env is not None else None,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def search_path(*first: Path, variable: str = "PATH") -> str:
    """``variable`` of this process with ``first`` put in front (binaries and libraries of the world)."""
    return os.pathsep.join([*map(str, first), *filter(None, [os.environ.get(variable)])])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned); exceptions count as not yet."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # polling: any failure means "not ready yet"
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


_temp_dirs: list[Path] = []


def make_temp_dir(name: str) -> Path:
    """A fresh dir like /tmp/k3rd-NAME-xxxxxx: short, because unix socket paths must stay < 108 bytes.

    Whatever is left of it when Python exits is removed then (unless K3RD_KEEP_TEMP is set).
    """
    path = Path(tempfile.mkdtemp(prefix=f"k3rd-{name}-", dir="/tmp"))
    (path / OWNER_FILE).write_text(f"{os.getpid()}\n")
    if KEEP_TEMP:
        (path / ".keep").touch()
    _temp_dirs.append(path)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_dirs() -> list[Path]:
    """Remove /tmp/k3rd-* dirs (and their processes and mounts) left by a run that was SIGKILLed.

    A dir is stale when the pid in its owner file is gone; dirs kept with K3RD_KEEP_TEMP stay.
    """
    swept = []
    for path in Path("/tmp").glob("k3rd-*-*"):
        try:
            owner = int((path / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not _pid_alive(owner) and not (path / ".keep").exists():
            remove_tree(path, force=True)
            swept.append(path)
    return swept


def require_binary(path_or_name: str | os.PathLike[str]) -> str:
    """Absolute path of an executable, or WorldUnavailable naming what is missing."""
    candidate = str(path_or_name)
    found = candidate if os.path.isabs(candidate) and os.access(candidate, os.X_OK) else None
    found = found or (None if os.path.isabs(candidate) else shutil.which(candidate))
    if not found:
        raise WorldUnavailable(f"{candidate} is not installed (run scripts/install-test-world)")
    return found


# --------------------------------------------------------------------------- process management


def _pids_mentioning(needle: str) -> list[int]:
    """PIDs whose command line contains ``needle`` (our unique temp dir), excluding ourselves."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle.encode() in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def kill_strays(root: Path) -> list[int]:
    """SIGKILL processes that name ``root`` on their command line (e.g. orphaned containerd shims)."""
    pids = _pids_mentioning(str(root) + "/")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def unmount_under(root: Path) -> None:
    """Lazily unmount anything left mounted below ``root`` (overlay/netns mounts of a killed daemon)."""
    prefix = str(root).rstrip("/") + "/"
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point.startswith(prefix):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def remove_tree(root: Path, *, force: bool = False) -> None:
    """Delete a temp dir for good, after killing strays and unmounting (kept with K3RD_KEEP_TEMP)."""
    kill_strays(root)
    unmount_under(root)
    if force or not KEEP_TEMP:
        shutil.rmtree(root, ignore_errors=True)


class ManagedProcess:
    """A long-running child in its own session, logging to a file, stoppable as a process group."""

    _live: ClassVar[set[ManagedProcess]] = set()
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str | None = None,
        user: int | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.env = dict(env) if env is not None else dict(os.environ)
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        # Run as this user and its same-numbered group, with no other groups; root's otherwise.
        self.user = user
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        """Spawn (appending to the log, so restarts keep history); dies with us if we die."""
        if self.running:
            return
        argv = self.argv
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            # PDEATHSIG fires when the spawning *thread* ends: only safe from the main thread.
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                user=self.user,
                group=self.user,
                extra_groups=None if self.user is None else [],
            )
        with self._lock:
            self._live.add(self)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the whole group. Returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self._signal_group(signal.SIGKILL)  # leftovers in the group, or the main process itself
        code = self.popen.wait(10)
        with self._lock:
            self._live.discard(self)
        return code

    def kill(self) -> int | None:
        """SIGKILL the group at once: a crash, as far as the process is concerned."""
        if self.popen is None:
            return None
        self._signal_group(signal.SIGKILL)
        code = self.popen.wait(10)
        with self._lock:
            self._live.discard(self)
        return code

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @classmethod
    def kill_all(cls) -> None:
        """Kill every process still running; nothing we started may outlive the test run."""
        with cls._lock:
            live = list(cls._live)
        for proc in live:
            with contextlib.suppress(Exception):
                proc.kill()


def _cleanup_at_exit() -> None:
    """Last resort when fixtures did not run their finalizers (crash, KeyboardInterrupt)."""
    ManagedProcess.kill_all()
    for path in reversed(_temp_dirs):
        if path.exists():
            with contextlib.suppress(Exception):
                remove_tree(path)


atexit.register(_cleanup_at_exit)


def tail_of(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- unix-socket HTTP


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._socket_path)
        self.sock = sock


def unix_http(
    socket_path: str | os.PathLike[str],
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    """One HTTP request over a unix socket (the Docker Engine API). Returns (status, body)."""
    conn = _UnixHTTPConnection(str(socket_path), timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_status(url: str, *, timeout: float = 2.0, context: ssl.SSLContext | None = None) -> int:
    """Status of a GET on ``url`` (HTTP errors are statuses, not exceptions)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# --------------------------------------------------------------------------- services


class Service:
    """A daemon of the test world: its main process (`_proc`) in a temp dir of its own (`root`, removed
    by `close`). Subclasses spawn it with `_launch`, which returns once it serves."""

    root: Path
    log_path: Path
    _proc: ManagedProcess | None = None
    start_seconds: float | None = None
    """Seconds from spawning to serving, for the last start()."""
    stop_timeout: ClassVar[float] = 10.0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    @property
    def pid(self) -> int | None:
        """The main process's PID (dockerd's, for a Dockerd), while it was started."""
        return self._proc.pid if self._proc else None

    def _launch(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str],
        name: str,
        ready: Callable[[], bool],
        timeout: float,
        what: str,
        cwd: Path | None = None,
        user: int | None = None,
    ) -> None:
        """Spawns the main process (as `user`, if given) and waits until `ready()`; if the process exits
        first, that fails with its log. On failure the service is stopped (`_failed_start`) and the error
        raised."""
        began = time.monotonic()
        proc = self._proc = ManagedProcess(
            argv, log_path=self.log_path, env=env, cwd=cwd, name=name, user=user
        )
        proc.start()

        def serving() -> bool:
            return self._raise_if_dead(proc) or ready()

        try:
            wait_until(serving, timeout=timeout, what=what)
        except BaseException:
            self._failed_start()
            raise
        self.start_seconds = time.monotonic() - began

    @staticmethod
    def _raise_if_dead(proc: ManagedProcess | None) -> bool:
        """False while `proc` runs (or never ran); raises with its log once it exited."""
        if proc is not None and proc.popen is not None and proc.popen.poll() is not None:
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode}:\n{tail_of(proc.log_text())}"
            )
        return False

    def _failed_start(self) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM, SIGKILL after `stop_timeout`; then whatever names the temp dir (shims)."""
        if self._proc:
            self._proc.stop(timeout=self.stop_timeout)
        kill_strays(self.root)

    def close(self) -> None:
        """Stop, and delete the temp dir (data and logs) for good."""
        self.stop()
        remove_tree(self.root)

    def log_text(self) -> str:
        return self._proc.log_text() if self._proc else ""


class EngineEvents:
    """Image events of a daemon's Engine API (Docker's, or Podman's compatible one) on `socket`."""

    socket: Path
    name: str

    def image_saves(self, since: float) -> list[str]:
        """What the daemon exported (`docker save`) from the UNIX time `since` until now, as its event
        stream tells: the proof that an export did, or did not, happen."""
        return self.image_events("save", since)

    def image_events(self, action: str, since: float) -> list[str]:
        """The images (or, for a pull, the references) of the daemon's image events of this kind from the
        UNIX time `since` until now."""
        filters = urllib.parse.quote(json.dumps({"type": ["image"], "event": [action]}))
        # Podman reads whole seconds only: asked from the second before, the events are sorted out here.
        path = f"/events?since={int(since)}&until={int(time.time()) + 1}&filters={filters}"
        status, body = unix_http(self.socket, "GET", path, timeout=120)
        if status != 200:
            raise RuntimeError(f"GET /events on {self.name}: {status} {body[:500]!r}")
        events = [json.loads(line) for line in body.splitlines() if line.strip()]
        return [
            str(e["Actor"]["ID"])
            for e in events
            if e.get("timeNano", e.get("time", 0) * 10**9) >= since * 1e9
        ]
