"""The commands beside the server, against a real registry and dockerd: cache commands keep off a cache dir
a running registry holds, prune keeps pushed images, doctor recognizes a running registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from . import oci_client
from .daemons import NO_ZERO_COPY, Dockerd, RegistryFactory, RegistryProcess, free_port
from .images import MiB, build_image, write_image_layout
from .test_push import push_layout


def command(*args: str, docker_host: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    if docker_host:
        env["DOCKER_HOST"] = docker_host
    return subprocess.run(
        [sys.executable, "-m", "k3d_registry_dockerd", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def cache(registry: RegistryProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return command("cache", *args, "--cache-dir", str(registry.cache_dir))


def test_cache_commands_keep_off_a_running_registrys_dir(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    registry = registry_under_test(docker)
    for action in (["ls"], ["verify"], ["prune", "--all"]):
        result = cache(registry, *action)
        assert result.returncode == 1
        assert result.stderr == (
            f"k3d-registry-dockerd: cache dir {registry.cache_dir} is in use by a running "
            f"k3d-registry-dockerd (PID {registry.pid}): stop it first, "
            "or give this one another --cache-dir\n"
        )
    registry.stop()
    assert cache(registry, "ls").returncode == 0


def test_prune_keeps_pushed_images_unless_asked(
    docker: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    build_image(docker, "prune-exported:1", layers=1, size=1 * MiB, seed="prune-exported")
    registry = registry_under_test(docker, extra_args=[*NO_ZERO_COPY, "--no-load-pushed"])
    exported = oci_client.pull(registry.url, "prune-exported", "1")
    pushed = write_image_layout(tmp_path / "pushed", layer_sizes=(1 * MiB,), seed="prune-pushed")
    push_layout(pushed, registry, "team/pushed", "1")
    registry.stop()

    assert cache(registry, "prune", "--older-than", "7").returncode == 2
    assert "needs a unit: 7s, 7m, 7h or 7d" in cache(registry, "prune", "--older-than", "7").stderr
    pruned = cache(registry, "prune", "--all")
    assert pruned.returncode == 0, pruned.stderr
    assert "pruned 1 tags" in pruned.stdout
    assert (
        "kept 1 pushed tags: they cannot be exported again (--include-pushed removes them)" in pruned.stdout
    )
    listed = cache(registry, "ls").stdout
    assert "team/pushed" in listed and " pushed " in listed and "prune-exported" not in listed

    # A pod pinned to the pushed digest still gets it (there is nothing in Docker to export it from).
    registry.start()
    assert oci_client.pull(registry.url, "team/pushed", pushed.digest).digest == pushed.digest
    assert oci_client.pull(registry.url, "prune-exported", "1").digest == exported.digest
    registry.stop()

    everything = cache(registry, "prune", "--all", "--include-pushed")
    assert "pruned 2 tags" in everything.stdout and "kept" not in everything.stdout
    registry.start()
    assert oci_client.request(f"{registry.url}/v2/team/pushed/manifests/{pushed.digest}").status == 404


def test_cache_ls_of_a_dir_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "never-made"
    result = command("cache", "ls", "--cache-dir", str(missing))
    assert result.returncode == 1
    assert result.stderr.startswith(f"k3d-registry-dockerd: no cache at {missing}, nothing to list")
    assert not missing.exists()


def test_doctor_recognizes_the_running_registry(
    docker: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    port = free_port()
    registry = registry_under_test(docker, port=port, extra_args=["--addr", f"0.0.0.0:{port}"])
    result = command(
        "doctor", "--addr", f":{port}", "--cache-dir", str(registry.cache_dir), docker_host=docker.host
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"✓ listen address :{port}: this registry (0.1.0) serves there" in result.stdout
    assert "in use by the running registry" in result.stdout
    assert f"! anyone who can reach :{port} can push images here" in result.stdout

    loopback = command(
        "doctor",
        "--addr",
        f"127.0.0.1:{free_port()}",
        "--cache-dir",
        str(tmp_path),
        docker_host=docker.host,
    )
    assert loopback.returncode == 0
    assert "is loopback only: k3d and kind nodes cannot reach it" in loopback.stdout
