"""The registry under test: `python -m k3d_registry_dockerd` against one daemon, as k3d would run it."""

from __future__ import annotations

import functools
import os
import shutil
import ssl
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Protocol, Self

from .dockerd import Dockerd
from .process import REPO_ROOT, Service, free_port, http_status, make_temp_dir, require_binary, tail_of

# Debian's own: the interpreter running the tests may lie under /root, where no other user reaches.
USER_PYTHON = Path("/usr/bin/python3.11")


@functools.cache
def _code_for_users() -> Path:
    """The registry's code and its dependencies, copied once where any user can read them."""
    copy = make_temp_dir("user-code")
    copy.chmod(0o755)
    shutil.copytree(REPO_ROOT / "src", copy / "src")
    skip = shutil.ignore_patterns("ruff*", "grpc_tools*", "hypothesis*", "pip", "setuptools", "_pytest")
    shutil.copytree(sysconfig.get_paths()["purelib"], copy / "site-packages", ignore=skip)
    return copy


# For tests of the export path itself (faults mid-export, the cache on disk): on the containerd image
# store the registry would otherwise serve from containerd's content store and never export.
NO_ZERO_COPY = ("--no-zero-copy",)


class RegistryProcess(Service):
    """k3d_registry_dockerd run as a subprocess against one dockerd, as k3d would run it.

    The same port and cache dir survive stop()/kill()/start(), for restart and crash tests.
    """

    stop_timeout: ClassVar[float] = 15.0

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
        user: int | None = None,
        launcher: Sequence[str] = ("-m", "k3d_registry_dockerd"),
    ) -> None:
        self.docker_host = docker_host
        self.root = make_temp_dir("reg")
        # As a user, the registry reads only what that user may (rootless Podman's storage, say).
        self.user = user
        if user is not None:
            os.chown(self.root, user, user)
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
        # Another launcher of the same main (bench/loop_launch.py: on another event loop) and its arguments.
        self.launcher = tuple(launcher)

    def argv(self) -> list[str]:
        python = sys.executable if self.user is None else str(require_binary(USER_PYTHON))
        return [
            python, *self.launcher,
            "--addr", self.addr,
            "--cache-dir", str(self.cache_dir),
            "--log-level", self.log_level,
            *self.extra_args,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        """DOCKER_HOST of the daemon under test; src/ first on PYTHONPATH so no install is needed (as a
        user: copies of src/ and of the dependencies)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        if self.user is None:
            pythonpath = [str(REPO_ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
        else:
            code = _code_for_users()
            pythonpath = [str(code / "src"), str(code / "site-packages")]
        env.update(DOCKER_HOST=self.docker_host, PYTHONPATH=os.pathsep.join(pythonpath), PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30.0) -> Self:
        """Start and wait until GET /healthz is 200; on failure raise with the log."""
        if self.running:
            return self
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            os.chown(self.cache_dir, self.user, self.user)
        try:
            self._launch(
                self.argv(),
                env=self.environment(),
                name="k3d_registry_dockerd",
                ready=lambda: http_status(f"{self.url}/healthz", timeout=2, context=self.ssl_context) == 200,
                timeout=timeout,
                what=f"our registry on {self.addr}",
                cwd=self.root,
                user=self.user,
            )
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(
                f"registry under test did not start: {exc}\n--- log ---\n{tail_of(self.log_text(), 200)}"
            ) from exc
        return self

    def _failed_start(self) -> None:
        self.kill()

    def stop(self, timeout: float | None = None) -> int | None:  # type: ignore[override]
        """SIGTERM (graceful shutdown), SIGKILL after ``timeout``; returns the exit code."""
        return self._proc.stop(timeout=timeout or self.stop_timeout) if self._proc else None

    def kill(self) -> int | None:
        """SIGKILL: a crash, for tests of what survives in the cache dir."""
        return self._proc.kill() if self._proc else None

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
        user: int | None = None,
    ) -> RegistryProcess: ...
