"""The registry's image, built by a test dockerd with `k3d-registry-dockerd image build` and run the way k3d
runs a registry.

No public base image is reachable here, so the base is a Debian trixie root filesystem made with
debootstrap (python3 + venv: Python 3.13, the release image's) and imported under a local name (`--base`);
the dependencies come as wheels for that Python from PyPI, with one of this checkout (`--wheels`). The
Dockerfile itself stays an ordinary one: both are build arguments. (The registry run on the host in the
other tests is Python 3.11, Debian 12's: both are tested.)
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import k3d_registry_dockerd

from . import oci_client
from .daemons import (
    REPO_ROOT,
    Containerd,
    Dockerd,
    Podman,
    free_port,
    make_temp_dir,
    remove_tree,
    run,
    wait_until,
)
from .images import MiB, build_image, build_with_podman

BASE_IMAGE = "k3rd-python-base:trixie"
# Debian trixie's python3: the minor version of the Dockerfile's default base (python:3.13-slim-bookworm).
BASE_SUITE, BASE_PYTHON = "trixie", "3.13"
IMAGE = "k3d-registry-dockerd:test"
CLI = Path(sys.executable).parent / "k3d-registry-dockerd"


def _debian_mirror() -> str:
    """The Debian mirror this machine's apt uses, for debootstrap."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    for line in Path("/etc/apt/sources.list").read_text().splitlines():
        if line.startswith("deb ") and " bookworm" in line:
            return line.split()[1]
    raise RuntimeError("no Debian mirror configured for apt")


def _wheels(into: Path) -> None:
    """The dependencies' wheels for the base's Python on this machine (from PyPI), and one of this
    checkout (which the command's own replaces)."""
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", into, REPO_ROOT], timeout=900)
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    tags = [
        f"--platform={m}_{platform.machine()}" for m in ("manylinux2014", "manylinux_2_17", "manylinux_2_28")
    ]
    download = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--implementation=cp"]
    run(
        [*download, f"--python-version={BASE_PYTHON}", *tags, "-d", into, *project["dependencies"]],
        timeout=900,
    )


@dataclass(frozen=True)
class Built:
    image: str
    # What `image build` printed.
    output: str
    # The dependencies' wheels it was given (there while the module's tests run).
    wheels: Path


def _cli(*args: str | Path, docker: Dockerd | Podman, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The installed command, against `docker` (through DOCKER_HOST)."""
    env = {**os.environ, "DOCKER_HOST": docker.host}
    return run([CLI, *args], env=env, check=check, timeout=900)


# Session-wide: the node and Podman fixtures are parametrized per session, so pytest runs this module's
# tests in several groups, and a module-scoped image was debootstrapped and built again for each (80 s).
@pytest.fixture(scope="session")
def built_image(docker26: Dockerd, debootstrap: str) -> Iterator[Built]:
    """`image build` with the test dockerd, offline: the base is a debootstrapped Debian with the release
    image's Python, the dependencies are its wheels."""
    work = make_temp_dir("image")
    try:
        rootfs = work / "rootfs"
        run([debootstrap, "--variant=minbase", "--include=python3,python3-venv", BASE_SUITE, rootfs,
             _debian_mirror()], timeout=900)  # fmt: skip
        with tarfile.open(work / "rootfs.tar", "w") as tar:
            tar.add(rootfs, arcname=".")
        shutil.rmtree(rootfs)
        docker26.docker("import", str(work / "rootfs.tar"), BASE_IMAGE)
        _wheels(work / "wheels")
        built = _cli("image", "build", "--tag", IMAGE, "--base", BASE_IMAGE, "--wheels", work / "wheels",
                     docker=docker26)  # fmt: skip
        yield Built(IMAGE, built.stdout, work / "wheels")
    finally:
        remove_tree(work)


@pytest.fixture(scope="session")
def registry_image(built_image: Built) -> str:
    return built_image.image


@contextmanager
def registry_container(
    docker26: Dockerd, image: str, socket: Path | None, mounts: Sequence[str] = ()
) -> Iterator[tuple[str, str]]:
    """Runs the image as k3d does (engine socket mounted, unless `mounts` has it, REGISTRY_HTTP_ADDR
    set, host network on loopback); yields the container's name and the registry's address, and removes
    it afterwards."""
    port = free_port()
    name = f"k3rd-registry-{port}"
    api = ("-v", f"{socket}:/var/run/docker.sock") if socket else ()
    volumes = [arg for mount in mounts for arg in ("-v", mount)]
    docker26.docker(
        "run", "-d", "--name", name, "--network", "host",
        "-e", f"REGISTRY_HTTP_ADDR=127.0.0.1:{port}",
        *api,
        *volumes,
        image,
    )  # fmt: skip
    try:
        wait_until(
            lambda: oci_client.request(f"http://127.0.0.1:{port}/v2/", timeout=2).status == 200,
            timeout=60,
            what="the registry container",
        )
        yield name, f"127.0.0.1:{port}"
    finally:
        docker26.docker("rm", "-f", name, check=False)


def test_image_runs_as_k3d_runs_a_registry(docker26: Dockerd, node: Containerd, registry_image: str) -> None:
    build_image(docker26, "in-cluster-app:1", layers=2, size=2 * MiB, seed="container")
    with registry_container(docker26, registry_image, docker26.socket) as (name, addr):
        node.set_mirror(addr)
        result = node.pull("docker.io/library/in-cluster-app:1")
        assert result.returncode == 0, result.stdout + result.stderr
        logs = docker26.docker("logs", name).stderr
        assert "listen address 127.0.0.1:" in logs and "(env REGISTRY_HTTP_ADDR)" in logs
        assert "cache dir /var/cache/k3d-registry-dockerd (env K3D_REGISTRY_DOCKERD_CACHE_DIR)" in logs
        assert "exported docker.io/library/in-cluster-app:1" in logs
        # The HEALTHCHECK's own command, run in the container.
        health = docker26.docker("inspect", "--format", "{{json .Config.Healthcheck.Test}}", name).stdout
        command = json.loads(health)
        assert command[0] == "CMD"
        docker26.docker("exec", name, *command[1:])


def test_image_with_podmans_socket(
    docker26: Dockerd, podman: Podman, node: Containerd, registry_image: str, tmp_path: Path
) -> None:
    build_with_podman(podman, "localhost/podman-built:1", tmp_path / "context", seed="podman-in-container")
    with registry_container(docker26, registry_image, podman.socket) as (name, addr):
        node.set_mirror(addr)
        result = node.pull("localhost/podman-built:1")
        assert result.returncode == 0, result.stdout + result.stderr
        logs = docker26.docker("logs", name).stderr
        assert "Podman Engine" in logs
        assert "exported localhost/podman-built:1" in logs


def test_image_with_dockers_containerd_mounted_serves_zero_copy(
    docker26: Dockerd, docker28_containerd: Dockerd, node: Containerd, registry_image: str
) -> None:
    """What `config k3d --containerd` mounts for Docker 29 on Linux, here for Docker 28.5's containerd:
    its socket, and its content store read-only, each at the same path as on the host."""
    docker = docker28_containerd
    build_image(docker, "in-cluster-zc:1", layers=2, size=2 * MiB, seed="container-zc")
    content = docker.data_root / "containerd" / "daemon" / "io.containerd.content.v1.content"
    mounts = (f"{docker.containerd_socket}:{docker.containerd_socket}", f"{content}:{content}:ro")
    since = time.time()
    with registry_container(docker26, registry_image, docker.socket, mounts) as (name, addr):
        node.set_mirror(addr)
        result = node.pull("docker.io/library/in-cluster-zc:1")
        assert result.returncode == 0, result.stdout + result.stderr
        logs = docker26.docker("logs", name).stderr
        assert "zero-copy from containerd is on" in logs, logs
        assert "exporting" not in logs
    assert docker.image_saves(since) == []


def _printed_mounts(daemon: Dockerd | Podman) -> list[str]:
    """The volumes `config k3d` prints for the daemon it asks (through DOCKER_HOST), but the cache's."""
    text = _cli("config", "k3d", docker=daemon).stdout
    volumes = yaml.safe_load(text)["registries"]["create"]["volumes"]
    return [volume for volume in volumes if not volume.startswith("k3d-registry-dockerd-cache:")]


@pytest.mark.parametrize("store", ["docker26", "docker28_containerd", "podman5"])
def test_image_with_the_printed_mounts_serves_in_place(
    store: str, node: Containerd, registry_image: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """`config k3d` asks the daemon what it runs and prints the mounts for it; the container run with
    exactly those serves the daemon's images where they lie: no save in its event stream."""
    docker26: Dockerd = request.getfixturevalue("docker26")
    daemon: Dockerd | Podman = request.getfixturevalue(store)
    if isinstance(daemon, Podman):
        build_with_podman(daemon, "localhost/printed-mounts:1", tmp_path / "context", seed="printed-pm")
        reference = "localhost/printed-mounts:1"
    else:
        build_image(daemon, "printed-mounts:1", layers=2, size=2 * MiB, seed=f"printed-{store}")
        reference = "docker.io/library/printed-mounts:1"
    mounts = _printed_mounts(daemon)
    # Sockets are connected to, not written; every mount of files is read-only.
    assert all(mount.endswith(":ro") for mount in mounts if ".sock:" not in mount), mounts
    since = time.time()
    with registry_container(docker26, registry_image, None, mounts) as (name, addr):
        node.set_mirror(addr)
        result = node.pull(reference)
        assert result.returncode == 0, result.stdout + result.stderr
        logs = docker26.docker("logs", name).stderr
        served = {
            "docker26": "serving Docker's classic store in place: ",
            "docker28_containerd": "zero-copy from containerd is on",
            "podman5": "serving Podman's storage in place: ",
        }[store]
        assert served in logs, logs
        assert "exporting" not in logs
    assert daemon.image_saves(since) == []


def test_image_build_says_each_step_and_fails_in_one_sentence(built_image: Built, docker26: Dockerd) -> None:
    lines = built_image.output.splitlines()
    steps = [line for line in lines if line.startswith("Step ")]
    assert steps[0].startswith("Step 1/") and steps[-1].startswith(f"Step {len(steps)}/"), lines
    assert lines[-1] == f"built {IMAGE}"
    # A build whose dependencies are missing fails in pip's step: pip's words, then one sentence.
    wheels = make_temp_dir("no-deps")
    try:
        (wheels / "unrelated-1.0-py3-none-any.whl").write_bytes(b"")
        failed = _cli("image", "build", "--tag", "k3rd-never-built:1", "--base", BASE_IMAGE,
                      "--wheels", wheels, docker=docker26, check=False)  # fmt: skip
    finally:
        remove_tree(wheels)
    assert failed.returncode == 1
    assert "No matching distribution found" in failed.stdout, failed.stdout
    assert failed.stderr.count("\n") == 1 and "returned a non-zero code" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr


def test_config_names_the_command_that_builds_a_missing_image(
    built_image: Built, docker26: Dockerd, tmp_path: Path
) -> None:
    """`config k3d` and `config kind` with an image Docker lacks say, at the top and on stderr, the one
    command that builds it; with the built image they say nothing of it."""
    printed = _cli("config", "k3d", docker=docker26)
    command = "k3d-registry-dockerd image build"
    default = yaml.safe_load(printed.stdout)["registries"]["create"]["image"]
    assert printed.stdout.startswith(f"# {default} is not in Docker: build it first with `{command}`\n")
    assert printed.stderr.strip().endswith(f"build it with: {command}"), printed.stderr
    kind = _cli("config", "kind", "--image", "k3rd-missing:2", "--hosts-dir", tmp_path,
                docker=docker26)  # fmt: skip
    assert kind.stdout.startswith(
        f"# k3rd-missing:2 is not in Docker: build it first with `{command} --tag k3rd-missing:2`"
    )
    assert f"build it with: {command} --tag k3rd-missing:2" in kind.stderr
    present = _cli("config", "k3d", "--image", built_image.image, docker=docker26)
    assert "is not in Docker" not in present.stdout + present.stderr
    assert yaml.safe_load(present.stdout)["registries"]["create"]["image"] == built_image.image


@pytest.mark.parametrize("store", ["docker26", "docker28_containerd"])
def test_a_container_without_the_mounts_says_it_exports_and_which_mounts(
    store: str, registry_image: str, request: pytest.FixtureRequest
) -> None:
    """Only the socket mounted: the status page's first line and `doctor`'s say export, and name the mounts
    `config k3d` prints for this daemon."""
    docker26: Dockerd = request.getfixturevalue("docker26")
    daemon: Dockerd = request.getfixturevalue(store)
    printed = [
        f"-v {mount}" for mount in _printed_mounts(daemon) if ".sock:/var/run/docker.sock" not in mount
    ]
    with registry_container(docker26, registry_image, daemon.socket) as (name, addr):
        line = oci_client.request(f"http://{addr}/status.json").json()["bytes_path"]
        doctor = docker26.docker("exec", name, "k3d-registry-dockerd", "doctor", check=False).stdout
    assert line.startswith("export: "), line
    assert line.endswith(f"give the registry container the mounts `config k3d` prints: {' '.join(printed)}")
    assert doctor.splitlines()[0] == line, doctor


def test_image_build_on_the_containerd_image_store(
    built_image: Built, docker26: Dockerd, docker28_containerd: Dockerd, tmp_path: Path
) -> None:
    """What a fresh Docker 29 runs: the build endpoint's builder on the containerd image store."""
    docker26.docker("save", "-o", tmp_path / "base.tar", BASE_IMAGE)
    docker28_containerd.docker("load", "-i", tmp_path / "base.tar")
    tag = "k3rd-built-on-containerd:1"
    built = _cli("image", "build", "--tag", tag, "--base", BASE_IMAGE, "--wheels", built_image.wheels,
                 docker=docker28_containerd)  # fmt: skip
    assert built.stdout.splitlines()[-1] == f"built {tag}"
    version = docker28_containerd.docker("run", "--rm", "--network", "none", tag, "--version").stdout
    assert version.strip() == f"k3d-registry-dockerd {k3d_registry_dockerd.__version__}"
