"""Podman's Docker-compatible Engine API (`podman system service`) on a private socket and store."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Self

from .process import (
    BOOKWORM_USR,
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
        if self.running:
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

        def ready() -> bool:
            try:
                status, body = unix_http(self.socket, "GET", "/version")
            except OSError:
                return False
            if status == 200:
                self.version = json.loads(body).get("Version", "")
            return status == 200

        self._launch(
            [*self._global_args(), "system", "service", "--time=0", self.host],
            env=self._env(),
            name="podman",
            ready=ready,
            timeout=timeout,
            what="podman system service",
        )
        return self

    def podman(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """The podman CLI on this service's store."""
        return run([*self._global_args(), *args], env=self._env(), timeout=timeout)
