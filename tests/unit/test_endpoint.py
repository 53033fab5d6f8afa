"""Finding Docker as the docker CLI does: DOCKER_HOST, DOCKER_CONTEXT, the config's current context."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from k3d_registry_dockerd.docker.endpoint import (
    DockerEndpoint,
    EndpointError,
    TLSFiles,
    parse_host,
    resolve_endpoint,
)


def _context(config: Path, name: str, host: str, *, tls: bool = False, skip_verify: bool = False) -> None:
    context_id = hashlib.sha256(name.encode()).hexdigest()
    meta = config / "contexts" / "meta" / context_id / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(
        json.dumps({"Name": name, "Endpoints": {"docker": {"Host": host, "SkipTLSVerify": skip_verify}}})
    )
    if tls:
        files = config / "contexts" / "tls" / context_id / "docker"
        files.mkdir(parents=True)
        for pem in ("ca.pem", "cert.pem", "key.pem"):
            (files / pem).write_text("pem")


def test_default_socket_without_any_setting(tmp_path: Path) -> None:
    endpoint = resolve_endpoint({"HOME": str(tmp_path)})
    assert endpoint == DockerEndpoint("unix:///var/run/docker.sock", "default", "default")
    assert endpoint.describe() == "unix:///var/run/docker.sock (default)"
    assert endpoint.base_url == "unix://localhost"


@pytest.mark.parametrize(
    ("value", "host", "tls"),
    [
        ("unix:///run/user/1000/docker.sock", "unix:///run/user/1000/docker.sock", False),
        ("unix://", "unix:///var/run/docker.sock", False),
        ("tcp://10.0.0.1:2375", "tcp://10.0.0.1:2375", False),
        ("tcp://10.0.0.1", "tcp://10.0.0.1:2375", False),
        ("tcp://:2375", "tcp://localhost:2375", False),
        ("10.0.0.1:2375", "tcp://10.0.0.1:2375", False),
        ("https://docker.example", "tcp://docker.example:2376", True),
        ("tcp://[::1]:2375", "tcp://[::1]:2375", False),
    ],
)
def test_docker_host_forms(value: str, host: str, tls: bool) -> None:
    assert parse_host(value, "DOCKER_HOST") == (host, tls)


@pytest.mark.parametrize("value", ["bogus", "tcp://host:99999", "ftp://x", "/var/run/docker.sock"])
def test_invalid_docker_host_is_an_error_naming_it(value: str) -> None:
    with pytest.raises(EndpointError, match=r"DOCKER_HOST='.*' is not a Docker address: use unix://"):
        parse_host(value, "DOCKER_HOST")


def test_ssh_hosts_are_refused_with_what_to_do_instead() -> None:
    with pytest.raises(EndpointError, match=r"ssh:// Docker hosts are not supported.*ssh -NL"):
        resolve_endpoint({"DOCKER_HOST": "ssh://me@build-box"})


def test_docker_host_wins_over_contexts(tmp_path: Path) -> None:
    _context(tmp_path, "remote", "tcp://10.1.1.1:2376")
    (tmp_path / "config.json").write_text(json.dumps({"currentContext": "remote"}))
    env = {"DOCKER_CONFIG": str(tmp_path), "DOCKER_CONTEXT": "remote", "DOCKER_HOST": "unix:///x.sock"}
    endpoint = resolve_endpoint(env)
    assert (endpoint.host, endpoint.context, endpoint.source) == ("unix:///x.sock", "default", "DOCKER_HOST")


def test_current_context_of_docker_config(tmp_path: Path) -> None:
    _context(tmp_path, "colima", "unix:///home/me/.colima/default/docker.sock")
    (tmp_path / "config.json").write_text(json.dumps({"currentContext": "colima"}))
    endpoint = resolve_endpoint({"DOCKER_CONFIG": str(tmp_path)})
    assert endpoint.host == "unix:///home/me/.colima/default/docker.sock"
    assert endpoint.describe() == (
        f"unix:///home/me/.colima/default/docker.sock (context colima, from currentContext in "
        f"{tmp_path / 'config.json'})"
    )


def test_docker_context_variable_wins_over_the_config(tmp_path: Path) -> None:
    _context(tmp_path, "a", "unix:///a.sock")
    _context(tmp_path, "b", "unix:///b.sock")
    (tmp_path / "config.json").write_text(json.dumps({"currentContext": "a"}))
    endpoint = resolve_endpoint({"DOCKER_CONFIG": str(tmp_path), "DOCKER_CONTEXT": "b"})
    assert (endpoint.host, endpoint.context, endpoint.source) == ("unix:///b.sock", "b", "DOCKER_CONTEXT")


def test_the_default_context_by_name(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"currentContext": "default"}))
    assert resolve_endpoint({"DOCKER_CONFIG": str(tmp_path)}).host == "unix:///var/run/docker.sock"


def test_home_docker_dir_without_docker_config(tmp_path: Path) -> None:
    _context(tmp_path / ".docker", "rootless", "unix:///run/user/1000/docker.sock")
    (tmp_path / ".docker" / "config.json").write_text(json.dumps({"currentContext": "rootless"}))
    assert resolve_endpoint({"HOME": str(tmp_path)}).context == "rootless"


def test_missing_context_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EndpointError, match="context 'gone' \\(from DOCKER_CONTEXT\\) does not exist"):
        resolve_endpoint({"DOCKER_CONFIG": str(tmp_path), "DOCKER_CONTEXT": "gone"})


def test_unreadable_config_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EndpointError, match="cannot read the docker CLI config"):
        resolve_endpoint({"DOCKER_CONFIG": str(tmp_path)})


def test_context_tls_material(tmp_path: Path) -> None:
    _context(tmp_path, "secure", "tcp://docker.example:2376", tls=True, skip_verify=True)
    endpoint = resolve_endpoint({"DOCKER_CONFIG": str(tmp_path), "DOCKER_CONTEXT": "secure"})
    files = tmp_path / "contexts" / "tls" / hashlib.sha256(b"secure").hexdigest() / "docker"
    assert endpoint.tls == TLSFiles(False, files / "ca.pem", files / "cert.pem", files / "key.pem")
    assert endpoint.base_url == "https://docker.example:2376"


def test_tls_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("pem")
    env = {
        "DOCKER_HOST": "tcp://docker.example:2376",
        "DOCKER_TLS_VERIFY": "1",
        "DOCKER_CERT_PATH": str(tmp_path),
    }
    endpoint = resolve_endpoint(env)
    assert endpoint.tls == TLSFiles(True, tmp_path / "ca.pem", None, None)
    assert resolve_endpoint({"DOCKER_HOST": "tcp://docker.example:2375"}).tls is None
