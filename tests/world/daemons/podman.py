"""Podman's Docker-compatible Engine API (`podman system service`) on a private socket and store."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from .process import (
    BOOKWORM_USR,
    PODMAN5_ROOT,
    ROOTLESS_UID,
    RUNC_PATH,
    EngineEvents,
    Service,
    make_temp_dir,
    require_binary,
    run,
    search_path,
    unix_http,
)


class Podman(Service, EngineEvents):
    """``podman system service``: Podman's Docker-compatible Engine API on a private socket and store.

    Release "4" is bookworm's Podman 4.3, run from the unpacked packages. Release "5" is trixie's Podman 5,
    which needs a newer glibc: it runs chrooted into a debootstrapped trixie root, in a mount namespace of
    its own (private propagation: nothing it mounts reaches the machine) where /tmp is the machine's, so its
    socket, store and the tests' build contexts have the same paths on both sides; its CLI enters that
    namespace and root. Its image save is the legacy ``docker save`` format (top-level ``<digest>.tar``
    layers, with the old ``<id>/layer.tar`` paths as symlinks to them).

    ``rootless`` (release 5 only) runs it as ROOTLESS_UID, the user install-test-world gives the trixie
    root with subordinate IDs: its store is that user's, files of other owners in an image belong to
    subordinate IDs on disk. The namespace's root is entered with pivot_root, as the kernel lets no
    chrooted process make the user namespace rootless Podman lives in.

    ``insecure_registries`` (``127.0.0.1:PORT``) are reached over plain HTTP, from the CLI and through the
    API alike (a private registries.conf): Docker allows that for 127.0.0.0/8 by itself, Podman only for
    registries named so, and without it a pull through the API from the world's upstream fails.
    """

    name = "podman"
    # Set in storage.conf below; its storage is read in place.
    driver = "overlay"

    def __init__(
        self,
        root: Path | None = None,
        *,
        release: str = "4",
        rootless: bool = False,
        insecure_registries: Sequence[str] = (),
    ) -> None:
        if rootless and release != "5":
            raise ValueError("rootless Podman runs from Podman 5's root only")
        self.release = release
        self.rootless = rootless
        self.root = root or make_temp_dir(f"podman{release}{'-rootless' if rootless else ''}")
        if rootless:
            os.chown(self.root, ROOTLESS_UID, ROOTLESS_UID)
        self.socket = self.root / "podman.sock"
        self.host = f"unix://{self.socket}"
        self.storage_conf = self.root / "storage.conf"
        self.containers_conf = self.root / "containers.conf"
        self.insecure_registries = tuple(insecure_registries)
        self.registries_conf = self.root / "registries.conf"
        self.log_path = self.root / "podman.log"
        self.version = ""
        self.api_version = ""

    @staticmethod
    def check_available(release: str = "4") -> None:
        if release == "5":
            for tool in ("unshare", "nsenter", "chroot", "pivot_root"):
                require_binary(tool)
            require_binary(PODMAN5_ROOT / "usr" / "bin" / "podman")
            require_binary(PODMAN5_ROOT / "usr" / "bin" / "newuidmap")
        else:
            require_binary(BOOKWORM_USR / "bin" / "podman")

    def _env(self) -> dict[str, str]:
        """Private store and engine config; bookworm's unpacked binaries find their one extra library."""
        env = {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
            "CONTAINERS_CONF": str(self.containers_conf),
        }
        if self.insecure_registries:
            env["CONTAINERS_REGISTRIES_CONF"] = str(self.registries_conf)
        if self.release == "5":
            env.pop("LD_LIBRARY_PATH", None)
            env.update(PATH="/usr/sbin:/usr/bin:/sbin:/bin", PODMAN_IGNORE_CGROUPSV1_WARNING="1")
            if self.rootless:
                env.update(HOME=str(self.root), XDG_RUNTIME_DIR=str(self.root / "run"), USER="k3rd")
            return env
        libraries = BOOKWORM_USR / "lib" / "x86_64-linux-gnu"
        return {
            **env,
            "LD_LIBRARY_PATH": search_path(libraries, variable="LD_LIBRARY_PATH"),
            "PATH": search_path(*RUNC_PATH),
        }

    def _global_args(self) -> list[str]:
        binary = "/usr/bin/podman" if self.release == "5" else str(BOOKWORM_USR / "bin" / "podman")
        return [binary, "--root", str(self.root / "store"), "--runroot", str(self.root / "run")]

    def _engine_conf(self) -> str:
        # Events in a file of its own: the default one (/run/libpod/events, the machine's for 4.3, Podman 5's
        # root's) is every Podman's there, whose saves a test would take for this one's.
        events = f'events_logger = "file"\nevents_logfile_path = "{self.root / "events.log"}"\n'
        if self.release == "5":
            # Its own conmon and crun, inside its root; no systemd there to ask.
            return f'[engine]\ncgroup_manager = "cgroupfs"\n{events}'
        return (
            f'[engine]\nconmon_path = ["{BOOKWORM_USR / "bin" / "conmon"}"]\nruntime = "runc"\n{events}'
            f'[engine.runtimes]\nrunc = ["{BOOKWORM_USR / "sbin" / "runc"}"]\n'
        )

    def _service_argv(self) -> list[str]:
        service = [*self._global_args(), "system", "service", "--time=0", self.host]
        if self.release != "5":
            return service
        system = shlex.quote(str(PODMAN5_ROOT))
        # The root is made a mount point first: containers/storage makes "/" private when it unpacks.
        script = (
            f"set -e; mount --bind {system} {system}; mount -t proc proc {system}/proc; "
            f"mount --rbind /dev {system}/dev; mount -t tmpfs shm {system}/dev/shm; "
            f"mount --rbind /sys {system}/sys; mount --rbind /tmp {system}/tmp; "
        )
        if self.rootless:
            user = f"--reuid={ROOTLESS_UID} --regid={ROOTLESS_UID} --clear-groups"
            script += (
                f"cd {system}; pivot_root . .; umount -l .; cd /; mount --make-rshared /; "
                f"exec setpriv {user} {shlex.join(service)}"
            )
        else:
            script += f"exec chroot {system} {shlex.join(service)}"
        return [require_binary("unshare"), "--mount", "--propagation", "private", "sh", "-c", script]

    def start(self, timeout: float = 30.0) -> Self:
        if self.running:
            return self
        self.check_available(self.release)
        if self.rootless:
            (self.root / "run").mkdir(mode=0o700, exist_ok=True)
            os.chown(self.root / "run", ROOTLESS_UID, ROOTLESS_UID)
        self.storage_conf.write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{self.root / "run"}"\n'
            f'graphroot = "{self.root / "store"}"\n'
        )
        self.containers_conf.write_text(self._engine_conf())
        if self.insecure_registries:
            entry = '[[registry]]\nlocation = "{}"\ninsecure = true\n'
            self.registries_conf.write_text("".join(entry.format(addr) for addr in self.insecure_registries))

        def ready() -> bool:
            try:
                status, body = unix_http(self.socket, "GET", "/version")
            except OSError:
                return False
            if status == 200:
                version = json.loads(body)
                self.version, self.api_version = version.get("Version", ""), version.get("ApiVersion", "")
            return status == 200

        self._launch(
            self._service_argv(),
            env=self._env(),
            name=f"podman{self.release}",
            ready=ready,
            timeout=timeout,
            what=f"podman {self.release} system service",
        )
        return self

    def stop(self) -> None:
        """The service, and rootless Podman's pause process (it holds the user namespace, outliving it)."""
        super().stop()
        pause = self.root / "run" / "libpod" / "tmp" / "pause.pid"
        if self.rootless and pause.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pause.read_text()), signal.SIGKILL)
            pause.unlink()

    def podman(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """The podman CLI on this service's store (Podman 5's in the service's namespace and root; rootless
        Podman's as a client of its service)."""
        client = ["/usr/bin/podman", "--url", self.host] if self.rootless else self._global_args()
        argv = [*client, *args]
        if self.release == "5":
            if self.pid is None:
                raise RuntimeError("podman 5 runs its CLI in its service's namespace: start it first")
            argv = [require_binary("nsenter"), f"--target={self.pid}", "--mount", "--root", "--wd=/", *argv]
        return run(argv, env=self._env(), timeout=timeout)

    def build(self, ref: str, context: Path, timeout: float = 900) -> None:
        """`podman build` of a context's Dockerfile, tagged `ref`."""
        self.podman(
            "build", "-q", "-f", str(context / "Dockerfile"), "-t", ref, str(context), timeout=timeout
        )

    def image_id(self, ref: str) -> str:
        """ID (sha256:…) of a local image, as Docker would write it; raises if absent."""
        return "sha256:" + self.podman("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()
