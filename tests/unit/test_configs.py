"""`config k3d|kind|registries`: what is printed parses and says what k3d, kind and k3s expect."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from k3d_registry_dockerd.cli import main
from k3d_registry_dockerd.configs import DEFAULT_IMAGE


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["config", *argv]) == 0
    return capsys.readouterr().out


def test_k3d_create(capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load(_run(capsys, "k3d"))
    assert (config["apiVersion"], config["kind"]) == ("k3d.io/v1alpha5", "Simple")
    create = config["registries"]["create"]
    assert create["name"] == "k3d-registry"
    assert create["hostPort"] == "5000"
    assert create["image"] == DEFAULT_IMAGE
    assert "/var/run/docker.sock:/var/run/docker.sock" in create["volumes"]
    registries = yaml.safe_load(config["registries"]["config"])
    assert registries == {"mirrors": {"*": {"endpoint": ["http://k3d-registry:5000"]}}}


def test_k3d_shared(capsys: pytest.CaptureFixture[str]) -> None:
    text = _run(capsys, "k3d", "--shared", "--name", "cache", "--port", "5055", "--image", "me/reg:1")
    assert "# k3d registry create cache --port 5055 -i me/reg:1" in text
    config = yaml.safe_load(text)
    assert config["registries"]["use"] == ["k3d-cache:5055"]
    assert "create" not in config["registries"]
    mirrors = yaml.safe_load(config["registries"]["config"])["mirrors"]
    assert mirrors["*"]["endpoint"] == ["http://k3d-cache:5000"]


def test_k3d_with_containerd_mounts_its_socket_and_content_store(capsys: pytest.CaptureFixture[str]) -> None:
    volumes = yaml.safe_load(_run(capsys, "k3d", "--containerd"))["registries"]["create"]["volumes"]
    content = "/var/lib/containerd/io.containerd.content.v1.content"
    assert "/run/containerd/containerd.sock:/run/containerd/containerd.sock" in volumes
    assert f"{content}:{content}:ro" in volumes
    shared = _run(capsys, "k3d", "--shared", "--containerd")
    assert f"#   -v {content}:{content}:ro" in shared
    assert "containerd" not in yaml.safe_load(_run(capsys, "k3d"))["registries"]["create"]["volumes"][0]


def test_registries_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load(_run(capsys, "registries", "--name", "my-reg", "--port", "6000"))
    assert config == {"mirrors": {"*": {"endpoint": ["http://my-reg:6000"]}}}


def test_kind(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = _run(capsys, "kind", "--hosts-dir", str(tmp_path / "certs.d"))
    config = yaml.safe_load(text)
    assert (config["kind"], config["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    patch = tomllib.loads(config["containerdConfigPatches"][0])
    assert (
        patch["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == "/etc/containerd/certs.d"
    )
    mount = config["nodes"][0]["extraMounts"][0]
    assert mount == {"hostPath": str(tmp_path / "certs.d"), "containerPath": "/etc/containerd/certs.d"}
    hosts = tomllib.loads((tmp_path / "certs.d" / "_default" / "hosts.toml").read_text())
    assert hosts == {"host": {"http://kind-registry:5000/v2": {"capabilities": ["pull", "resolve"]}}}


def _endpoint_host(config: dict[str, Any]) -> str:
    mirrors = yaml.safe_load(config["registries"]["config"])["mirrors"]
    return str(mirrors["*"]["endpoint"][0]).removeprefix("http://").rpartition(":")[0]


@pytest.mark.parametrize("name", ["k3d-registry", "myreg", "registry.localhost"])
def test_k3d_create_endpoint_is_the_container_k3d_makes(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """k3d names the container `registries.create.name` verbatim (k3d's pkg/config/transform.go)."""
    config = yaml.safe_load(_run(capsys, "k3d", "--name", name))
    assert config["registries"]["create"]["name"] == name
    assert _endpoint_host(config) == name


@pytest.mark.parametrize("name", ["cache", "k3d-cache"])
def test_k3d_shared_endpoint_is_the_container_k3d_makes(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """`k3d registry create NAME` names the container k3d-NAME (k3d's cmd/registry/registryCreate.go)."""
    text = _run(capsys, "k3d", "--shared", "--name", name)
    argument = re.search(r"# k3d registry create (\S+) ", text)
    assert argument is not None
    container = f"k3d-{argument[1]}"
    config = yaml.safe_load(text)
    assert container == "k3d-cache"
    assert [use.rpartition(":")[0] for use in config["registries"]["use"]] == [container]
    assert _endpoint_host(config) == container


def test_kind_hosts_dir_that_cannot_be_written(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["config", "kind", "--hosts-dir", str(blocker / "certs.d")]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"k3d-registry-dockerd: cannot write {blocker}/certs.d/_default/hosts.toml: ")
    assert error.rstrip().endswith("choose another --hosts-dir")
    assert len(error.splitlines()) == 1
