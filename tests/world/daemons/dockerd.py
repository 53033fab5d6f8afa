"""A private dockerd (Docker 20.10, 26.1, 28.5; classic or containerd image store) with a containerd of
its own, on a unix socket in its temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from .containerd import containerd_config
from .process import (
    BOOKWORM_USR,
    BUILDX_PLUGIN,
    DOCKER26_USR,
    DOCKER28_USR,
    DOCKER_CLI,
    RUNC_PATH,
    EngineEvents,
    ManagedProcess,
    Service,
    kill_strays,
    make_temp_dir,
    require_binary,
    run,
    search_path,
    tail_of,
    unix_http,
    wait_until,
)


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


class Dockerd(Service, EngineEvents):
    """A private dockerd plus the containerd it talks to, both in one temp dir.

    We start containerd ourselves and pass ``--containerd``: without that flag, dockerd 20.10 and
    26 alike use the *system* containerd whenever /run/containerd/containerd.sock exists (they only
    start a managed one when it does not), which would make daemons share an image store. The config
    mirrors the one dockerd writes for its managed containerd (no CRI plugin).
    """

    stop_timeout: ClassVar[float] = 20.0

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
        if self.running:
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
        self._proc = ManagedProcess(argv, log_path=self.log_path, env=env, name=self.name)
        self._proc.start()
        try:
            wait_until(self._pinged, timeout=timeout, what=f"{self.name} /_ping on {self.socket}")
        except (TimeoutError, RuntimeError) as exc:
            log = self._proc.log_text()
            self._proc.stop()
            if self.storage_driver == "overlay2" and "overlay" in log.lower():
                # Backing filesystems that cannot host overlayfs (e.g. overlay inside a container).
                print(f"[world] {self.name}: overlay2 failed, falling back to vfs", file=sys.stderr)
                self.storage_driver = "vfs"
                self._start_dockerd(config_path, env, timeout)
                return
            raise RuntimeError(f"{self.name} did not start: {exc}\n{tail_of(log)}") from exc

    def _storage_arg(self) -> str:
        """With the containerd store, --storage-driver names a containerd snapshotter instead."""
        if self.variant.containerd_store:
            return {"overlay2": "overlayfs", "vfs": "native"}.get(self.storage_driver, self.storage_driver)
        return self.storage_driver

    def _pinged(self) -> bool:
        self._raise_if_dead(self._proc)
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
    def driver(self) -> str:
        """Storage driver dockerd reports: overlay2/vfs, or overlayfs for the containerd store."""
        return str(self.info.get("Driver", ""))

    def stop(self) -> None:
        """Stop dockerd (SIGTERM, then SIGKILL), then its containerd, then any stray shims."""
        if self._proc:
            self._proc.stop(timeout=self.stop_timeout)
        if self._containerd:
            self._containerd.stop(timeout=10)
        kill_strays(self.root)

    def kill(self) -> None:
        """Crash dockerd (SIGKILL), leaving containerd running, as when dockerd dies on its own."""
        if self._proc:
            self._proc.kill()

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

    def build(self, ref: str, context: Path, timeout: float = 900) -> None:
        """The legacy builder's `docker build` of a context, tagged `ref` (no BuildKit: deterministic)."""
        self.docker("build", "-q", "-t", ref, str(context), env={"DOCKER_BUILDKIT": "0"}, timeout=timeout)

    def image_id(self, ref: str) -> str:
        """ID (sha256:…) of a local image; raises if absent."""
        return str(self.docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip())

    def id_of(self, *, manifest: str, config: str) -> str:
        """The ID this daemon gives an image: its manifest's digest on the containerd store (the image's
        target), its config's on the classic store."""
        return manifest if self.variant.containerd_store else config

    @property
    def zero_copy(self) -> bool:
        """Whether the registry, started with no store settings, serves this daemon's images where they
        lie, so pulls cost no export: the containerd image store on an Engine that reports its containerd
        (API >= 1.46; this private one is nowhere else to find), or the classic store (overlay2 or vfs),
        whose directories are on this machine."""
        major, _, minor = self.api_version.partition(".")
        if self.variant.containerd_store:
            return (int(major), int(minor)) >= (1, 46)
        return self.driver in ("overlay2", "vfs")

    def exports_for(self, count: int) -> int:
        """The exports `count` cold images cost the registry on this daemon: none served in place."""
        return 0 if self.zero_copy else count

    def layers(self, ref: str) -> list[str]:
        """Diff IDs of a local image's layers: its content, the same on every daemon and store."""
        return list(self.api_json(f"/images/{ref}/json")["RootFS"]["Layers"])

    def __repr__(self) -> str:
        return f"<Dockerd {self.name} {self.version or '?'} api={self.api_version or '?'} {self.host}>"
