"""Private daemons for the real test world: dockerd, containerd, an upstream registry, our registry.

Everything listens on loopback or on unix sockets inside short temp dirs under /tmp, so several
daemons (and several test runs) live side by side without touching the machine's defaults
(/run/containerd/containerd.sock, /var/run/docker.sock, /etc/docker). No pytest dependency: the
benchmarks and ad-hoc scripts can use these classes too.

Cleanup is layered because a leaked dockerd or containerd poisons later runs: every process gets
its own session (we kill its whole process group), dies with the Python process that started it
(PR_SET_PDEATHSIG via ``setpriv``), is stopped by an ``atexit`` hook, and processes whose command
line names one of our temp dirs (containerd shims) are killed when their owner stops.
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
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, TypeVar

from k3d_registry_dockerd import configs

T = TypeVar("T")

WORLD_DIR = Path(os.environ.get("K3D_REGISTRY_DOCKERD_WORLD", "/opt/k3d-registry-dockerd-world"))
"""Where scripts/install-test-world unpacked the daemons (dpkg -x, nothing installed)."""
BOOKWORM_USR = WORLD_DIR / "bookworm" / "usr"
"""Debian 12's Docker 20.10, containerd 1.6, runc, Podman and distribution's registry."""
DOCKER26_USR = WORLD_DIR / "docker26" / "usr"
"""Debian trixie's Docker 26.1 and containerd 1.7."""
DOCKER28_USR = WORLD_DIR / "docker28" / "usr"
"""Debian sid's Docker 28.5 (API 1.51) and containerd 2.1."""
RUNC_PATH = (BOOKWORM_USR / "sbin", BOOKWORM_USR / "bin")
"""Last on every daemon's PATH: bookworm's runc (newer suites' runc needs a newer glibc), tini, shims."""
DOCKER_CLI = DOCKER26_USR / "bin" / "docker"
# BuildKit's client (`docker build` with DOCKER_BUILDKIT=1), found in each daemon's DOCKER_CONFIG.
BUILDX_PLUGIN = DOCKER28_USR / "libexec" / "docker" / "cli-plugins" / "docker-buildx"
"""The docker CLI of the tests: 26.1 negotiates the API version with every daemon here."""
REPO_ROOT = Path(__file__).resolve().parents[2]
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
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.env = dict(env) if env is not None else dict(os.environ)
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
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


def _tail(text: str, lines: int = 60) -> str:
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


# --------------------------------------------------------------------------- containerd config


def containerd_config(*, root: Path, state: Path, address: Path) -> str:
    """Minimal containerd 1.6/1.7 config: private root/state/socket, no CRI, no /opt/containerd."""
    return (
        "version = 2\n"
        f'root = "{root}"\n'
        f'state = "{state}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "[grpc]\n"
        f'  address = "{address}"\n'
        "[debug]\n"
        '  address = ""\n'
        "[metrics]\n"
        '  address = ""\n'
        '[plugins."io.containerd.internal.v1.opt"]\n'
        f'  path = "{root}/opt"\n'
    )


# --------------------------------------------------------------------------- dockerd


@dataclass(frozen=True)
class DockerdVariant:
    """How to run one flavour of dockerd: binaries, PATH prefix, daemon.json features."""

    name: str
    dockerd: Path
    containerd: Path
    path_prefix: tuple[Path, ...]
    config: Mapping[str, Any]
    containerd_store: bool


def _engine(name: str, usr: Path, *, containerd_store: bool) -> DockerdVariant:
    """A dockerd unpacked under `usr`, with the containerd beside it; bookworm's runc last on PATH."""
    return DockerdVariant(
        name,
        usr / "sbin" / "dockerd",
        usr / "bin" / "containerd",
        (usr / "bin", usr / "sbin", *RUNC_PATH),
        {"features": {"containerd-snapshotter": True}} if containerd_store else {},
        containerd_store=containerd_store,
    )


VARIANTS: dict[str, DockerdVariant] = {
    # Engine 26 (API 1.45), classic graph-driver image store: `docker save` writes an OCI layout
    # with Docker-generated manifests and uncompressed layers.
    "docker26": _engine("docker26", DOCKER26_USR, containerd_store=False),
    # Same binaries with the containerd image store: saves keep original digests and compression.
    "docker26-containerd": _engine("docker26-containerd", DOCKER26_USR, containerd_store=True),
    # Engine 28.5 (API 1.51: image save exports one platform), classic store.
    "docker28": _engine("docker28", DOCKER28_USR, containerd_store=False),
    # Engine 28.5 with the containerd image store (on containerd 2.1): what a fresh Docker 29 runs.
    "docker28-containerd": _engine("docker28-containerd", DOCKER28_USR, containerd_store=True),
    # Debian bookworm's Engine 20.10 (API 1.41): `docker save` writes the legacy format.
    # Without deprecated-key-path it would write /etc/docker/key.json.
    "docker20": _engine("docker20", BOOKWORM_USR, containerd_store=False),
}


class Dockerd:
    """A private dockerd plus the containerd it talks to, both in one temp dir.

    We start containerd ourselves and pass ``--containerd``: without that flag, dockerd 20.10 and
    26 alike use the *system* containerd whenever /run/containerd/containerd.sock exists (they only
    start a managed one when it does not), which would make daemons share an image store. The config
    mirrors the one dockerd writes for its managed containerd (no CRI plugin).
    """

    def __init__(
        self,
        variant: str,
        root: Path | None = None,
        *,
        storage_driver: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown dockerd variant {variant!r}; known: {sorted(VARIANTS)}")
        self.variant = VARIANTS[variant]
        self.name = variant
        self.root = root or make_temp_dir(variant.replace("-containerd", "c"))
        self.storage_driver = storage_driver or os.environ.get("K3RD_STORAGE_DRIVER", "overlay2")
        self.extra_args = tuple(extra_args)
        self.socket = self.root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.data_root = self.root / "data"
        self.exec_root = self.root / "exec"
        self.pidfile = self.root / "docker.pid"
        self.log_path = self.root / "dockerd.log"
        self.containerd_socket = self.exec_root / "containerd" / "containerd.sock"
        self.containerd_log_path = self.root / "containerd.log"
        self.docker_config = self.root / "docker-config"
        self.version = ""
        self.api_version = ""
        self.info: dict[str, Any] = {}
        self.start_seconds: float | None = None
        """Seconds from spawning containerd to dockerd answering /_ping, for the last start()."""
        self._dockerd: ManagedProcess | None = None
        self._containerd: ManagedProcess | None = None

    @staticmethod
    def check_available(variant: str) -> None:
        """Raise WorldUnavailable if this variant's binaries or the docker CLI are missing."""
        v = VARIANTS[variant]
        require_binary(v.dockerd)
        require_binary(v.containerd)
        require_binary(DOCKER_CLI)
        require_binary(BOOKWORM_USR / "sbin" / "runc")

    def _daemon_config(self) -> dict[str, Any]:
        config = dict(self.variant.config)
        if self.variant.name == "docker20":
            config["deprecated-key-path"] = str(self.root / "key.json")
        return config

    def start(self, timeout: float = 60.0) -> Self:
        """Start containerd then dockerd (again, after stop()); return once /_ping answers."""
        if self._dockerd and self._dockerd.running:
            return self
        self.check_available(self.name)
        for d in (self.data_root, self.exec_root / "containerd", self.docker_config):
            d.mkdir(parents=True, exist_ok=True)
        (self.docker_config / "config.json").write_text("{}\n")
        plugins = self.docker_config / "cli-plugins"
        if BUILDX_PLUGIN.exists() and not plugins.exists():
            plugins.mkdir()
            (plugins / "docker-buildx").symlink_to(BUILDX_PLUGIN)
        config_path = self.root / "daemon.json"
        config_path.write_text(json.dumps(self._daemon_config(), indent=2) + "\n")
        ctd_config = self.root / "containerd.toml"
        ctd_config.write_text(
            containerd_config(
                root=self.data_root / "containerd" / "daemon",
                state=self.exec_root / "containerd" / "daemon",
                address=self.containerd_socket,
            )
        )
        env = {**os.environ, "PATH": search_path(*self.variant.path_prefix)}
        env.pop("NOTIFY_SOCKET", None)
        began = time.monotonic()
        if not (self._containerd and self._containerd.running):  # kill() leaves containerd up
            self.containerd_socket.unlink(missing_ok=True)  # stale after a SIGKILL
            self._containerd = ManagedProcess(
                [self.variant.containerd, "--config", ctd_config],
                log_path=self.containerd_log_path,
                env=env,
                name=f"{self.name}/containerd",
            )
            self._containerd.start()
        try:
            wait_until(
                lambda: self.containerd_socket.is_socket() or self._raise_if_dead(self._containerd),
                timeout=timeout,
                what=f"{self.name} containerd socket",
            )
            self._start_dockerd(config_path, env, timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        self._read_versions()
        return self

    def _start_dockerd(self, config_path: Path, env: dict[str, str], timeout: float) -> None:
        argv: list[str | Path] = [
            self.variant.dockerd,
            "--host", self.host,
            "--data-root", self.data_root,
            "--exec-root", self.exec_root,
            "--pidfile", self.pidfile,
            "--config-file", config_path,
            "--containerd", self.containerd_socket,
            "--storage-driver", self._storage_arg(),
            "--iptables=false", "--ip-forward=false", "--ip-masq=false",
            "--bridge=none", "--userland-proxy=false",
            "--log-level", "debug",
            *self.extra_args,
        ]  # fmt: skip
        self._dockerd = ManagedProcess(argv, log_path=self.log_path, env=env, name=self.name)
        self._dockerd.start()
        try:
            wait_until(self._pinged, timeout=timeout, what=f"{self.name} /_ping on {self.socket}")
        except (TimeoutError, RuntimeError) as exc:
            log = self._dockerd.log_text()
            self._dockerd.stop()
            if self.storage_driver == "overlay2" and "overlay" in log.lower():
                # Backing filesystems that cannot host overlayfs (e.g. overlay inside a container).
                print(f"[world] {self.name}: overlay2 failed, falling back to vfs", file=sys.stderr)
                self.storage_driver = "vfs"
                self._start_dockerd(config_path, env, timeout)
                return
            raise RuntimeError(f"{self.name} did not start: {exc}\n{_tail(log)}") from exc

    def _storage_arg(self) -> str:
        """With the containerd store, --storage-driver names a containerd snapshotter instead."""
        if self.variant.containerd_store:
            return {"overlay2": "overlayfs", "vfs": "native"}.get(self.storage_driver, self.storage_driver)
        return self.storage_driver

    def _raise_if_dead(self, proc: ManagedProcess | None) -> bool:
        if proc is not None and proc.popen is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{_tail(proc.log_text())}")
        return False

    def _pinged(self) -> bool:
        self._raise_if_dead(self._dockerd)
        if not self.socket.is_socket():
            return False
        status, body = unix_http(self.socket, "GET", "/_ping", timeout=2)
        return status == 200 and body == b"OK"

    def _read_versions(self) -> None:
        version = self.api_json("/version")
        self.version = str(version["Version"])
        self.api_version = str(version["ApiVersion"])
        self.info = self.api_json("/info")

    @property
    def running(self) -> bool:
        return self._dockerd is not None and self._dockerd.running

    @property
    def driver(self) -> str:
        """Storage driver dockerd reports: overlay2/vfs, or overlayfs for the containerd store."""
        return str(self.info.get("Driver", ""))

    def stop(self) -> None:
        """Stop dockerd (SIGTERM, then SIGKILL), then its containerd, then any stray shims."""
        if self._dockerd:
            self._dockerd.stop(timeout=20)
        if self._containerd:
            self._containerd.stop(timeout=10)
        kill_strays(self.root)

    def kill(self) -> None:
        """Crash dockerd (SIGKILL), leaving containerd running, as when dockerd dies on its own."""
        if self._dockerd:
            self._dockerd.kill()

    def close(self) -> None:
        """Stop everything and delete the temp dir (images and logs) for good."""
        self.stop()
        remove_tree(self.root)

    def env(self) -> dict[str, str]:
        """Environment for clients of this daemon: DOCKER_HOST and a private DOCKER_CONFIG."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(DOCKER_HOST=self.host, DOCKER_CONFIG=str(self.docker_config), DOCKER_CLI_HINTS="false")
        return env

    def docker(
        self,
        *args: str | os.PathLike[str],
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the test world's docker CLI against this daemon (the client negotiates the API version)."""
        full_env = {**self.env(), **(env or {})}
        argv = [require_binary(DOCKER_CLI), "-H", self.host, *map(str, args)]
        return run(argv, env=full_env, check=check, input=input, timeout=timeout, cwd=cwd)

    def api(
        self, method: str, path: str, *, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes]:
        """Raw Engine API call over the socket (unversioned path, e.g. "/images/json")."""
        return unix_http(self.socket, method, path, body=body, headers=headers, timeout=120)

    def api_json(self, path: str) -> Any:
        status, body = self.api("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path} on {self.name}: {status} {body[:500]!r}")
        return json.loads(body)

    def image_id(self, ref: str) -> str:
        """ID (sha256:…) of a local image; raises if absent."""
        return str(self.docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip())

    def id_of(self, *, manifest: str, config: str) -> str:
        """The ID this daemon gives an image: its manifest's digest on the containerd store (the image's
        target), its config's on the classic store."""
        return manifest if self.variant.containerd_store else config

    def image_saves(self, since: float) -> list[str]:
        """What Docker exported (`docker save`) from the UNIX time `since` until now, as its event stream
        tells: the proof that an export did, or did not, happen."""
        return self.image_events("save", since)

    def image_events(self, action: str, since: float) -> list[str]:
        """The images (or, for a pull, the references) of Docker's image events of this kind from the
        UNIX time `since` until now."""
        filters = urllib.parse.quote(json.dumps({"type": ["image"], "event": [action]}))
        status, body = self.api("GET", f"/events?since={since:.9f}&until={time.time():.9f}&filters={filters}")
        if status != 200:
            raise RuntimeError(f"GET /events on {self.name}: {status} {body[:500]!r}")
        return [str(json.loads(line)["Actor"]["ID"]) for line in body.splitlines() if line.strip()]

    @property
    def zero_copy(self) -> bool:
        """Whether the registry, started with no containerd settings, serves this daemon's images from
        containerd's content store as they are, so pulls cost no export: the containerd image store, on
        an Engine that reports its containerd (API >= 1.46; this private one is nowhere else to find)."""
        major, _, minor = self.api_version.partition(".")
        return self.variant.containerd_store and (int(major), int(minor)) >= (1, 46)

    def exports_for(self, count: int) -> int:
        """The exports `count` cold images cost the registry on this daemon: none with zero-copy."""
        return 0 if self.zero_copy else count

    def layers(self, ref: str) -> list[str]:
        """Diff IDs of a local image's layers: its content, the same on every daemon and store."""
        return list(self.api_json(f"/images/{ref}/json")["RootFS"]["Layers"])

    def log_text(self) -> str:
        return self._dockerd.log_text() if self._dockerd else ""

    def __repr__(self) -> str:
        return f"<Dockerd {self.name} {self.version or '?'} api={self.api_version or '?'} {self.host}>"


# --------------------------------------------------------------------------- upstream registry

# distribution's access log (combined): HOST - - [DATE] "METHOD PATH HTTP/1.1" STATUS SIZE "REFERER" "UA".
_ACCESS_LOG = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?:\S+ "[^"]*" "(?P<agent>[^"]*)")?'
)


@dataclass(frozen=True)
class AccessLogEntry:
    """One request the upstream registry served (from its combined-format access log)."""

    method: str
    path: str
    status: int
    # The client's user agent: `docker/…` is dockerd pulling for us, `containerd/…` a node going around us.
    agent: str = ""


class UpstreamRegistry:
    """distribution/registry 2.8 on 127.0.0.1:<free port>, filesystem storage, optional htpasswd.

    Its access log (stdout, combined format, one line per request with method, path and status)
    goes to ``log_path`` together with the app log, so a test can prove whether our registry fetched
    a manifest or blob from here.
    """

    binary = str(BOOKWORM_USR / "bin" / "docker-registry")

    def __init__(
        self,
        root: Path | None = None,
        *,
        user: str | None = None,
        password: str | None = None,
        port: int | None = None,
    ) -> None:
        if (user is None) != (password is None):
            raise ValueError("give both user and password, or neither")
        self.root = root or make_temp_dir("upstream")
        self.user = user
        self.password = password
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.addr}"
        self.storage = self.root / "storage"
        self.log_path = self.root / "registry.log"
        self.config_path = self.root / "config.yml"
        self.start_seconds: float | None = None
        self._proc: ManagedProcess | None = None

    @property
    def credentials(self) -> tuple[str, str] | None:
        return (self.user, self.password) if self.user is not None and self.password is not None else None

    @classmethod
    def check_available(cls, *, auth: bool = False) -> None:
        require_binary(cls.binary)
        if auth:
            require_binary("htpasswd")

    def _write_config(self) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.credentials:
            htpasswd = self.root / "htpasswd"
            line = run([require_binary("htpasswd"), "-nbB", self.user or "", self.password or ""]).stdout
            htpasswd.write_text(line.strip() + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: k3rd-upstream\n    path: {htpasswd}\n"
        self.config_path.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n  cache:\n    blobdescriptor: inmemory\n"
            f"http:\n  addr: {self.addr}\n  secret: k3rd-test-secret\n"
            "  headers:\n    X-Content-Type-Options: [nosniff]\n"
            f"{auth}"
            "health:\n  storagedriver:\n    enabled: false\n"
        )

    def start(self, timeout: float = 30.0) -> Self:
        """Start (or restart, same port and storage) and wait until /v2/ answers."""
        if self._proc and self._proc.running:
            return self
        self.check_available(auth=self.credentials is not None)
        self._write_config()
        began = time.monotonic()
        env = {**os.environ, "OTEL_TRACES_EXPORTER": "none"}
        self._proc = ManagedProcess(
            [self.binary, "serve", self.config_path], log_path=self.log_path, env=env, name="docker-registry"
        )
        self._proc.start()
        expected = 401 if self.credentials else 200

        def ready() -> bool:
            if self._proc and self._proc.popen and self._proc.popen.poll() is not None:
                raise RuntimeError(f"registry exited:\n{_tail(self.log_text())}")
            return http_status(f"{self.url}/v2/") == expected

        try:
            wait_until(ready, timeout=timeout, what=f"upstream registry on {self.addr}")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    def stop(self) -> None:
        if self._proc:
            self._proc.stop(timeout=10)

    def close(self) -> None:
        self.stop()
        remove_tree(self.root)

    def log_text(self) -> str:
        return self._proc.log_text() if self._proc else ""

    def log_mark(self) -> int:
        """Current log size: pass to requests(since=…) to see only what happened afterwards."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def requests(self, since: int = 0) -> list[AccessLogEntry]:
        """Requests served so far (or since a log_mark()), oldest first."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [
            AccessLogEntry(m["method"], m["path"], int(m["status"]), m["agent"] or "")
            for m in (_ACCESS_LOG.search(line) for line in text.splitlines())
            if m
        ]

    def __repr__(self) -> str:
        return f"<UpstreamRegistry {self.addr}{' auth' if self.credentials else ''}>"


# --------------------------------------------------------------------------- podman


class _SingleProcessService:
    """Lifecycle of a daemon that is one ManagedProcess in its own temp dir (Podman, containerd)."""

    root: Path
    _proc: ManagedProcess | None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    def stop(self) -> None:
        if self._proc:
            self._proc.stop(timeout=10)
        kill_strays(self.root)

    def close(self) -> None:
        self.stop()
        remove_tree(self.root)

    def log_text(self) -> str:
        return self._proc.log_text() if self._proc else ""


class Podman(_SingleProcessService):
    """``podman system service``: Podman's Docker-compatible Engine API on a private socket and store.

    Its image save is the legacy ``docker save`` format (top-level ``<digest>.tar`` layers, with the old
    ``<id>/layer.tar`` paths as symlinks to them).
    """

    binary = str(BOOKWORM_USR / "bin" / "podman")

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or make_temp_dir("podman")
        self.socket = self.root / "podman.sock"
        self.host = f"unix://{self.socket}"
        self.storage_conf = self.root / "storage.conf"
        self.containers_conf = self.root / "containers.conf"
        self.log_path = self.root / "podman.log"
        self.version = ""
        self.start_seconds: float | None = None
        self._proc: ManagedProcess | None = None

    @classmethod
    def check_available(cls) -> None:
        require_binary(cls.binary)

    def _env(self) -> dict[str, str]:
        """Private store and engine config; the unpacked binaries find their one extra library."""
        libraries = BOOKWORM_USR / "lib" / "x86_64-linux-gnu"
        return {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
            "CONTAINERS_CONF": str(self.containers_conf),
            "LD_LIBRARY_PATH": search_path(libraries, variable="LD_LIBRARY_PATH"),
            "PATH": search_path(*RUNC_PATH),
        }

    def _global_args(self) -> list[str]:
        return [self.binary, "--root", str(self.root / "store"), "--runroot", str(self.root / "run")]

    def start(self, timeout: float = 30.0) -> Self:
        if self._proc and self._proc.running:
            return self
        self.check_available()
        self.storage_conf.write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{self.root / "run"}"\n'
            f'graphroot = "{self.root / "store"}"\n'
        )
        self.containers_conf.write_text(
            f'[engine]\nconmon_path = ["{BOOKWORM_USR / "bin" / "conmon"}"]\nruntime = "runc"\n'
            f'[engine.runtimes]\nrunc = ["{BOOKWORM_USR / "sbin" / "runc"}"]\n'
        )
        began = time.monotonic()
        self._proc = ManagedProcess(
            [*self._global_args(), "system", "service", "--time=0", self.host],
            log_path=self.log_path,
            env=self._env(),
            name="podman",
        )
        self._proc.start()

        def ready() -> bool:
            if self._proc and self._proc.popen and self._proc.popen.poll() is not None:
                raise RuntimeError(f"podman exited:\n{_tail(self.log_text())}")
            try:
                status, body = unix_http(self.socket, "GET", "/version")
            except OSError:
                return False
            if status == 200:
                self.version = json.loads(body).get("Version", "")
            return status == 200

        try:
            wait_until(ready, timeout=timeout, what="podman system service")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def podman(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """The podman CLI on this service's store."""
        return run([*self._global_args(), *args], env=self._env(), timeout=timeout)


# --------------------------------------------------------------------------- containerd node


class Containerd(_SingleProcessService):
    """containerd as a k3s node uses it (no CRI), pulled through ``ctr`` with a hosts dir: 1.7 from
    ``usr`` DOCKER26_USR, 2.1 from DOCKER28_USR.

    ``hosts_dir/_default/hosts.toml`` is exactly what k3s writes for ``mirrors: "*"``; pulls use
    ``ctr images pull --local`` by default, i.e. the client-side resolver and fetcher (the code path
    CRI uses) rather than the transfer service.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        mirror: str | None = None,
        namespace: str = "k8s.io",
        usr: Path = DOCKER26_USR,
    ) -> None:
        self.root = root or make_temp_dir("node")
        self.namespace = namespace
        self.address = self.root / "containerd.sock"
        self.hosts_dir = self.root / "certs.d"
        self.log_path = self.root / "containerd.log"
        self.config_path = self.root / "config.toml"
        self.usr = usr
        self.binary = usr / "bin" / "containerd"
        self.ctr_binary = usr / "bin" / "ctr"
        self.version = ""
        self.start_seconds: float | None = None
        self._proc: ManagedProcess | None = None
        self.mirror: str | None = None
        if mirror:
            self.set_mirror(mirror)

    @classmethod
    def check_available(cls, usr: Path = DOCKER26_USR) -> None:
        require_binary(usr / "bin" / "containerd")
        require_binary(usr / "bin" / "ctr")

    def set_mirror(
        self,
        addr: str,
        *,
        host: str = "_default",
        capabilities: Iterable[str] = ("pull", "resolve"),
        override_path: bool = False,
        path: str = "/v2",
    ) -> Path:
        """(Re)write HOST/hosts.toml with one mirror endpoint, like k3s does; returns the file.

        With the defaults this is the file `k3d-registry-dockerd config kind` writes.
        """
        caps = ", ".join(f'"{c}"' for c in capabilities)
        if (tuple(capabilities), path, override_path) == (("pull", "resolve"), "/v2", False):
            text = configs.hosts_toml(f"http://{addr}")
        else:
            text = f'[host."http://{addr}{path}"]\n  capabilities = [{caps}]\n'
        if override_path:
            text += "  override_path = true\n"
        target = self.hosts_dir / host / "hosts.toml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        if host == "_default":
            self.mirror = addr
        return target

    def clear_mirrors(self) -> None:
        """Remove every hosts.toml (then pulls go to the image's own registry)."""
        shutil.rmtree(self.hosts_dir, ignore_errors=True)
        self.mirror = None

    def config_text(self) -> str:
        """The config.toml this node starts with (no CRI: pulls go through ctr)."""
        return containerd_config(root=self.root / "root", state=self.root / "state", address=self.address)

    def start(self, timeout: float = 30.0) -> Self:
        if self._proc and self._proc.running:
            return self
        self.check_available(self.usr)
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        env = {**os.environ, "PATH": search_path(self.usr / "bin", *RUNC_PATH)}
        began = time.monotonic()
        self._proc = ManagedProcess(
            [self.binary, "--config", self.config_path],
            log_path=self.log_path,
            env=env,
            name="node-containerd",
        )
        self._proc.start()

        def ready() -> bool:
            if self._proc and self._proc.popen and self._proc.popen.poll() is not None:
                raise RuntimeError(f"containerd exited:\n{_tail(self._proc.log_text())}")
            return self.ctr("version", check=False, timeout=5).returncode == 0

        try:
            wait_until(ready, timeout=timeout, what="node containerd")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        match = re.search(r"Server:\s+Version:\s+(\S+)", self.ctr("version").stdout)
        self.version = match.group(1) if match else ""
        return self

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address … -n NAMESPACE ARGS``."""
        argv = [str(self.ctr_binary), "--address", str(self.address), "-n", self.namespace, *args]
        return run(argv, check=check, timeout=timeout)

    def _registry_args(self, user: str | None, platform: str | None, all_platforms: bool) -> list[str]:
        args = ["--hosts-dir", str(self.hosts_dir)]
        if user:
            args += ["--user", user]
        if platform:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        return args

    def pull(
        self,
        ref: str,
        *,
        user: str | None = None,
        platform: str | None = None,
        all_platforms: bool = False,
        local: bool = True,
        check: bool = False,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr images pull --hosts-dir DIR [--user u:p] [--platform p] REF`` (unpacks, as kubelet would).

        ``user`` is "user:password". Not checked by default: tests assert on returncode/stderr.
        """
        args = ["images", "pull", *self._registry_args(user, platform, all_platforms)]
        if local:
            args.append("--local")
        return self.ctr(*args, ref, check=check, timeout=timeout)

    def content_fetch(
        self,
        ref: str,
        *,
        user: str | None = None,
        platform: str | None = None,
        all_platforms: bool = False,
        check: bool = False,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr content fetch`` (download only, no unpack, no image record)."""
        args = ["content", "fetch", *self._registry_args(user, platform, all_platforms)]
        return self.ctr(*args, ref, check=check, timeout=timeout)

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q").stdout.split()

    def content(self) -> list[str]:
        """Digests of all blobs in the content store."""
        return [line.split()[0] for line in self.ctr("content", "ls").stdout.splitlines()[1:] if line.strip()]

    def remove_image(self, *refs: str) -> None:
        """Remove images and synchronously garbage-collect what only they referenced."""
        if refs:
            self.ctr("images", "rm", "--sync", *refs, check=False)

    def clean(self) -> None:
        """Forget every image, lease, blob and snapshot, so the next pull really fetches again."""
        self.remove_image(*self.images())
        leases = [
            line.split()[0] for line in self.ctr("leases", "ls").stdout.splitlines()[1:] if line.strip()
        ]
        if leases:
            self.ctr("leases", "rm", "--sync", *leases, check=False)
        blobs = self.content()
        if blobs:
            self.ctr("content", "rm", *blobs, check=False)

    def __repr__(self) -> str:
        return f"<Containerd node {self.version or '?'} {self.address} mirror={self.mirror}>"


# --------------------------------------------------------------------------- our registry


# For tests of the export path itself (faults mid-export, the cache on disk): on the containerd image
# store the registry would otherwise serve from containerd's content store and never export.
NO_ZERO_COPY = ("--no-zero-copy",)


class RegistryProcess:
    """k3d_registry_dockerd run as a subprocess against one dockerd, as k3d would run it.

    The same port and cache dir survive stop()/kill()/start(), for restart and crash tests.
    """

    def __init__(
        self,
        docker_host: str,
        *,
        cache_dir: Path | None = None,
        port: int | None = None,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_level: str = "debug",
        ca_file: Path | None = None,
    ) -> None:
        self.docker_host = docker_host
        self.root = make_temp_dir("reg")
        self.cache_dir = cache_dir or self.root / "cache"
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        # With ca_file the registry serves HTTPS with a certificate that CA signed.
        self.ssl_context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        self.url = f"{'https' if ca_file else 'http'}://{self.addr}"
        self.log_path = log_path or self.root / "registry.log"
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(env or {})
        self.log_level = log_level
        self.start_seconds: float | None = None
        self._proc: ManagedProcess | None = None

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "k3d_registry_dockerd",
            "--addr", self.addr,
            "--cache-dir", str(self.cache_dir),
            "--log-level", self.log_level,
            *self.extra_args,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        """DOCKER_HOST of the daemon under test; src/ first on PYTHONPATH so no install is needed."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        pythonpath = [str(REPO_ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
        env.update(DOCKER_HOST=self.docker_host, PYTHONPATH=os.pathsep.join(pythonpath), PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30.0) -> Self:
        """Start and wait until GET /healthz is 200; on failure raise with the log."""
        if self._proc and self._proc.running:
            return self
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        self._proc = ManagedProcess(
            self.argv(),
            log_path=self.log_path,
            env=self.environment(),
            cwd=self.root,
            name="k3d_registry_dockerd",
        )
        self._proc.start()

        def ready() -> bool:
            if self._proc and self._proc.popen and self._proc.popen.poll() is not None:
                raise RuntimeError(f"exited with {self._proc.popen.returncode}")
            return http_status(f"{self.url}/healthz", timeout=2, context=self.ssl_context) == 200

        try:
            wait_until(ready, timeout=timeout, what=f"our registry on {self.addr}")
        except (TimeoutError, RuntimeError) as exc:
            self._proc.kill()
            raise RuntimeError(
                f"registry under test did not start: {exc}\n--- log ---\n{_tail(self.log_text(), 200)}"
            ) from exc
        self.start_seconds = time.monotonic() - began
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful shutdown), SIGKILL after ``timeout``; returns the exit code."""
        return self._proc.stop(timeout=timeout) if self._proc else None

    def kill(self) -> int | None:
        """SIGKILL: a crash, for tests of what survives in the cache dir."""
        return self._proc.kill() if self._proc else None

    def close(self) -> None:
        self.stop()
        remove_tree(self.root)

    def log_text(self) -> str:
        return self._proc.log_text() if self._proc else ""

    def __repr__(self) -> str:
        return f"<RegistryProcess {self.url} DOCKER_HOST={self.docker_host}>"


class RegistryFactory(Protocol):
    """Type of the ``registry_under_test`` fixture: start our registry against a dockerd."""

    def __call__(
        self,
        daemon: Dockerd | str,
        *,
        cache_dir: Path | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        start: bool = True,
        timeout: float = 30.0,
        ca_file: Path | None = None,
    ) -> RegistryProcess: ...
