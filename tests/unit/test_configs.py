"""`config k3d|kind|registries`: what is printed parses and says what k3d, kind and k3s expect."""

from __future__ import annotations

import tomllib
from pathlib import Path

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
