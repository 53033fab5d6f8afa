"""Mistakes at start, each answered with one line (what, which value, what to do) and a non-zero exit; a
traceback only at --log-level debug. And Docker found the way the docker CLI finds it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from . import oci_client
from .daemons import DOCKER_CLI, Dockerd, RegistryFactory, free_port, run
from .images import MiB, build_image


def registry_command(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The registry's command line, run to its end (these runs are meant to fail at start)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "k3d_registry_dockerd", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The run failed, said why in one ERROR line (or one stderr line), and printed no traceback."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line or line.startswith("k3d-")]
    assert len(errors) == 1, result.stderr
    assert "serving on" not in result.stderr
    return errors[0]


def test_a_busy_port(docker: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path) -> None:
    first = registry_under_test(docker)
    result = registry_command(
        "--addr", first.addr, "--cache-dir", str(tmp_path / "other"), env={"DOCKER_HOST": docker.host}
    )
    line = one_error_line(result)
    assert result.returncode == 1
    assert f"cannot listen on {first.addr}: the port is already in use" in line
    assert "--addr" in line and "doctor" in line
    debug = registry_command(
        "--addr", first.addr, "--cache-dir", str(tmp_path / "other"), "--log-level", "debug",
        env={"DOCKER_HOST": docker.host},
    )  # fmt: skip
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can write to, root included (a read-only tmpfs mount when we are root)."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], check=True)
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=False)
    else:
        path.chmod(0o555)
        yield path


def test_unusable_cache_dirs(docker: Dockerd, tmp_path: Path, read_only_dir: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = {
        a_file: f"cache dir {a_file} is a file, not a directory",
        read_only_dir: f"cache dir {read_only_dir} is not writable: Read-only file system",
        read_only_dir
        / "cache": f"cannot create the cache dir {read_only_dir / 'cache'}: Read-only file system",
    }
    if os.geteuid() != 0:
        cases[read_only_dir] = f"cache dir {read_only_dir} is not writable: Permission denied"
        cases[read_only_dir / "cache"] = (
            f"cannot create the cache dir {read_only_dir / 'cache'}: Permission denied"
        )
    for cache_dir, why in cases.items():
        result = registry_command(
            "--addr",
            f"127.0.0.1:{free_port()}",
            "--cache-dir",
            str(cache_dir),
            env={"DOCKER_HOST": docker.host},
        )
        line = one_error_line(result)
        assert why in line, line
        assert "--cache-dir (or K3D_REGISTRY_DOCKERD_CACHE_DIR)" in line


def test_a_second_server_on_a_held_cache_dir(docker: Dockerd, registry_under_test: RegistryFactory) -> None:
    first = registry_under_test(docker)
    result = registry_command(
        "--addr",
        f"127.0.0.1:{free_port()}",
        "--cache-dir",
        str(first.cache_dir),
        env={"DOCKER_HOST": docker.host},
    )
    line = one_error_line(result)
    assert (
        f"cache dir {first.cache_dir} is in use by a running k3d-registry-dockerd (PID {first.pid})" in line
    )


def test_an_invalid_docker_host(tmp_path: Path) -> None:
    for command in ((), ("doctor",)):
        result = registry_command(*command, "--cache-dir", str(tmp_path), env={"DOCKER_HOST": "bogus"})
        assert result.returncode == 2
        assert result.stderr == (
            "k3d-registry-dockerd: DOCKER_HOST='bogus' is not a Docker address: "
            "use unix:///path/to/docker.sock or tcp://HOST:PORT\n"
        )


def _context(config: Path, name: str, host: str) -> None:
    meta = config / "contexts" / "meta" / hashlib.sha256(name.encode()).hexdigest() / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"Name": name, "Metadata": {}, "Endpoints": {"docker": {"Host": host}}}))


def test_docker_contexts_as_the_docker_cli_resolves_them(
    docker: Dockerd, docker20: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    config = tmp_path / "docker-config"
    _context(config, "world", docker.host)
    _context(config, "old", docker20.host)
    (config / "config.json").write_text(json.dumps({"currentContext": "world"}))
    # The docker CLI agrees: its `context ls` marks the current one.
    listed = run(
        [DOCKER_CLI, "context", "ls", "--format", "{{.Name}} {{.Current}}"],
        env={"PATH": os.environ["PATH"], "DOCKER_CONFIG": str(config)},
    )
    assert "world true" in listed.stdout
    build_image(docker, "from-context:1", layers=1, size=1 * MiB, seed="context")

    registry = registry_under_test("", env={"DOCKER_CONFIG": str(config)})
    where = f"{docker.host} (context world, from currentContext in {config / 'config.json'})"
    log = registry.log_text()
    assert f"Docker at {where}" in log
    assert f"Docker Engine {docker.version} (API {docker.api_version}, linux/amd64) at {where}" in log
    assert "unix:///var/run/docker.sock" not in log
    assert oci_client.pull(registry.url, "from-context", "1").bytes > 0
    registry.stop()

    # DOCKER_CONTEXT wins over the config; DOCKER_HOST over both.
    doctor = registry_command(
        "doctor", "--addr", f"127.0.0.1:{free_port()}", "--cache-dir", str(tmp_path / "c"),
        env={"DOCKER_CONFIG": str(config), "DOCKER_CONTEXT": "old"},
    )  # fmt: skip
    assert f"reachable at {docker20.host} (context old, from DOCKER_CONTEXT)" in doctor.stdout
    doctor = registry_command(
        "doctor", "--addr", f"127.0.0.1:{free_port()}", "--cache-dir", str(tmp_path / "c"),
        env={"DOCKER_CONFIG": str(config), "DOCKER_CONTEXT": "old", "DOCKER_HOST": docker.host},
    )  # fmt: skip
    assert f"reachable at {docker.host} (DOCKER_HOST)" in doctor.stdout


def test_docker_unreachable_is_said_in_words(registry_under_test: RegistryFactory, tmp_path: Path) -> None:
    registry = registry_under_test(f"unix://{tmp_path}/gone.sock")
    answer = oci_client.request(f"{registry.url}/v2/anything/manifests/1")
    assert answer.status == 503
    message = answer.json()["errors"][0]["message"]
    assert (
        message
        == f"Docker is unreachable at unix://{tmp_path}/gone.sock (DOCKER_HOST): No such file or directory"
    )
    assert "[900]" not in registry.log_text() and "DockerError" not in registry.log_text()
