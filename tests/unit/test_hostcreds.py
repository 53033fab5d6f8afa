"""The host's Docker credentials, read as the docker CLI reads them, and their use for pulls."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.docker.engine import Credentials, PullDenied
from k3d_registry_dockerd.docker.hostcreds import (
    DockerConfig,
    HostCredentials,
    HostCredentialsError,
    from_auths,
    helper_for,
    parse_helper_answer,
    registry_of,
)
from k3d_registry_dockerd.oci.errors import RegistryError
from k3d_registry_dockerd.oci.reference import parse_repository
from k3d_registry_dockerd.web.assembly import assemble

from .fakes import FakeDocker, local_image

PRIVATE = "registry.example:5000"


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def write_config(directory: Path, config: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


def write_helper(directory: Path, name: str, script: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    helper = directory / f"docker-credential-{name}"
    helper.write_text("#!/bin/sh\n" + script)
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize(
    ("key", "registry"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("docker.io", "docker.io"),
        ("ghcr.io", "ghcr.io"),
        ("https://registry.example:5000/v2/", "registry.example:5000"),
        ("not a host!", None),
    ],
)
def test_a_config_key_stands_for_its_registry(key: str, registry: str | None) -> None:
    assert registry_of(key) == registry


def test_auths_entries_as_docker_login_writes_them() -> None:
    config = DockerConfig(
        auths={
            "https://index.docker.io/v1/": {"auth": basic("hub-user", "hub:pass")},
            PRIVATE: {"username": "u", "password": "p"},
            "token.example": {"identitytoken": "refresh-token"},
            "empty.example": {},
        }
    )
    assert from_auths(config, "docker.io") == Credentials("hub-user", "hub:pass")
    assert from_auths(config, PRIVATE) == Credentials("u", "p")
    assert from_auths(config, "token.example") == Credentials("", "", identity_token="refresh-token")
    assert from_auths(config, "empty.example") is None
    assert from_auths(config, "ghcr.io") is None


def test_a_registry_s_own_helper_wins_over_the_store() -> None:
    config = DockerConfig(creds_store="desktop", cred_helpers={"gcr.io": "gcloud"})
    assert helper_for(config, "gcr.io") == "gcloud"
    assert helper_for(config, "docker.io") == "desktop"
    assert helper_for(DockerConfig(), "docker.io") is None


def test_a_helper_s_answer() -> None:
    assert parse_helper_answer(b'{"ServerURL": "x", "Username": "u", "Secret": "s"}', "h") == Credentials(
        "u", "s"
    )
    token = parse_helper_answer(b'{"Username": "<token>", "Secret": "t"}', "h")
    assert token.identity_token == "t"
    assert token.registry_auth() == {"identitytoken": "t"}
    with pytest.raises(HostCredentialsError, match="docker-credential-h"):
        parse_helper_answer(b"oops", "h")


def test_secrets_stay_out_of_the_repr() -> None:
    assert "s3cret" not in repr(Credentials("u", "s3cret"))
    assert "s3cret" not in repr(Credentials("", "", identity_token="s3cret"))


async def test_the_config_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    home = tmp_path / "docker"
    credentials = HostCredentials({"DOCKER_CONFIG": str(home)})
    assert await credentials.lookup(PRIVATE) is None  # no file: no credentials
    path = write_config(home, {"auths": {PRIVATE: {"auth": basic("first", "pw")}}})
    assert await credentials.lookup(PRIVATE) == Credentials("first", "pw")
    write_config(home, {"auths": {PRIVATE: {"auth": basic("second", "pw2")}}})
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    assert await credentials.lookup(PRIVATE) == Credentials("second", "pw2")
    assert credentials.registries() == [PRIVATE]
    path.write_text("{not json")
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    with pytest.raises(HostCredentialsError, match="is not JSON"):
        await credentials.lookup(PRIVATE)


async def test_credential_helpers_are_asked_as_the_cli_asks_them(tmp_path: Path) -> None:
    home, bin_dir = tmp_path / "docker", tmp_path / "bin"
    write_config(home, {"credsStore": "fake", "auths": {PRIVATE: {}}})
    # Reads the server URL from stdin, as docker-credential-helpers do.
    write_helper(
        bin_dir,
        "fake",
        'read url\nif [ "$1 $url" = "get https://index.docker.io/v1/" ]; then\n'
        '  echo \'{"ServerURL": "https://index.docker.io/v1/", "Username": "hub", "Secret": "hub-pw"}\'\n'
        "else echo 'credentials not found in native keychain'; exit 1; fi\n",
    )
    write_helper(bin_dir, "broken", "echo 'the keychain is locked' >&2; exit 1\n")
    env = {"DOCKER_CONFIG": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    credentials = HostCredentials(env)
    assert await credentials.lookup("docker.io") == Credentials("hub", "hub-pw")
    assert await credentials.lookup(PRIVATE) is None

    write_config(home, {"credHelpers": {PRIVATE: "broken"}, "credsStore": "missing"})
    credentials = HostCredentials(env)
    with pytest.raises(HostCredentialsError, match="the keychain is locked"):
        await credentials.lookup(PRIVATE)
    with pytest.raises(HostCredentialsError, match="docker-credential-missing cannot run"):
        await credentials.lookup("docker.io")


async def test_pulls_without_credentials_use_the_host_s(store: Store, tmp_path: Path) -> None:
    write_config(tmp_path, {"auths": {PRIVATE: {"auth": basic("host-user", "host-pw")}}})
    ref = f"{PRIVATE}/team/app:1"
    docker = FakeDocker(upstream={ref: local_image("private", ref)})
    credentials = HostCredentials({"DOCKER_CONFIG": str(tmp_path)})
    mirror = assemble(store, docker, host_credentials=credentials).mirror  # type: ignore[arg-type]
    repo = parse_repository("team/app", PRIVATE)
    await mirror.manifest_by_tag(repo, "1", None)
    assert docker.pulls == [(ref, Credentials("host-user", "host-pw"))]

    # The request's own credentials win.
    docker.images.clear()
    await mirror.manifest_by_tag(repo, "1", Credentials("pod", "secret"))
    assert docker.pulls[-1] == (ref, Credentials("pod", "secret"))

    # Refused host credentials still challenge the client, so it can send the pod's pull secret.
    docker.images.clear()
    docker.pull_error = PullDenied("unauthorized: authentication required")
    with pytest.raises(RegistryError) as refused:
        await mirror.manifest_by_tag(repo, "1", None)
    assert refused.value.code == "UNAUTHORIZED"


async def test_without_the_setting_the_host_s_credentials_are_not_used(store: Store, tmp_path: Path) -> None:
    ref = f"{PRIVATE}/team/app:1"
    docker = FakeDocker(upstream={ref: local_image("private", ref)})
    mirror = assemble(store, docker).mirror  # type: ignore[arg-type]
    await mirror.manifest_by_tag(parse_repository("team/app", PRIVATE), "1", None)
    assert docker.pulls == [(ref, None)]
