from __future__ import annotations

import pytest

from k3d_registry_dockerd.oci.errors import RegistryError
from k3d_registry_dockerd.oci.reference import (
    MAX_NAME_LENGTH,
    Digest,
    is_digest,
    normalize_registry,
    parse_repository,
    parse_tag,
)

HEX = "0123456789abcdef" * 4


def error_code(call, *args) -> str:
    with pytest.raises(RegistryError) as caught:
        call(*args)
    return caught.value.code


# ---- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "alpine",
        "library/alpine",
        "team/sub/app",
        "my-app",
        "my--app",
        "my_app",
        "my__app",
        "my.app",
        "a/b/c/d/e",
        "0/1",
        "ghcr.io/org/image",
        "localhost/x",
    ],
)
def test_valid_names(name: str) -> None:
    assert parse_repository(name, None).name == name


@pytest.mark.parametrize(
    "name",
    [
        "Alpine",
        "team/App",
        "a..b",
        "a___b",
        "a.-b",
        "-app",
        "app-",
        ".app",
        "app.",
        "_app",
        "/app",
        "app/",
        "a//b",
        "",
        "localhost:5000/app",
        "app:latest",
        "a b",
    ],
)
def test_invalid_names(name: str) -> None:
    assert error_code(parse_repository, name, None) == "NAME_INVALID"


def test_over_long_name_is_invalid() -> None:
    name = "/".join(["a" * 50] * 5) + "/b"  # 256 characters, each component valid
    assert len(name) == MAX_NAME_LENGTH + 1
    assert error_code(parse_repository, name, None) == "NAME_INVALID"
    assert error_code(parse_repository, name, "docker.io") == "NAME_INVALID"


def test_name_too_long_once_qualified_is_invalid() -> None:
    name = "a" * 250 + "/bbbb"  # 255 characters: fine as given, too long with a registry in front
    assert len(name) == MAX_NAME_LENGTH
    assert error_code(parse_repository, name, "127.0.0.1:5001") == "NAME_INVALID"
    assert error_code(parse_repository, name, None) == "NAME_INVALID"


def test_name_at_the_limit_once_qualified_is_valid() -> None:
    path = "x/" + "a" * (MAX_NAME_LENGTH - len("docker.io/x/"))
    assert parse_repository(path, None).docker_name == f"docker.io/{path}"
    assert len(parse_repository(path, None).docker_name) == MAX_NAME_LENGTH


# ---- tags --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "3.20", "_private", "A-b_C.d", "a" * 128, "0"])
def test_valid_tags(tag: str) -> None:
    assert parse_tag(tag) == tag


@pytest.mark.parametrize("tag", ["a" * 129, ".hidden", "-dash", "", "with space", "a/b", "a:b", "tag+1"])
def test_invalid_tags(tag: str) -> None:
    assert error_code(parse_tag, tag) == "TAG_INVALID"


# ---- digests -----------------------------------------------------------------------------------


def test_valid_digest_round_trips() -> None:
    digest = Digest.parse(f"sha256:{HEX}")
    assert digest.hex == HEX
    assert str(digest) == f"sha256:{HEX}"
    assert Digest.parse(str(digest)) == digest


@pytest.mark.parametrize(
    "text",
    [
        f"sha256:{HEX.upper()}",
        f"sha256:{HEX[:-1]}",
        f"sha256:{HEX}0",
        "sha256:",
        ":" + HEX,
        HEX,
        "garbage",
        "sha256:zz" + HEX[2:],
        f"SHA256:{HEX}",
    ],
)
def test_invalid_digests(text: str) -> None:
    assert error_code(Digest.parse, text) == "DIGEST_INVALID"


def test_sha512_is_unsupported() -> None:
    with pytest.raises(RegistryError) as caught:
        Digest.parse("sha512:" + "ab" * 64)
    assert caught.value.code == "DIGEST_INVALID"
    assert "unsupported" in caught.value.message
    assert caught.value.status == 400


def test_is_digest() -> None:
    assert is_digest(f"sha256:{HEX}")
    assert not is_digest("latest")


# ---- mapping to Docker names -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ns", "docker_name"),
    [
        ("library/alpine", "docker.io", "docker.io/library/alpine"),
        ("alpine", "docker.io", "docker.io/library/alpine"),
        ("user/app", "docker.io", "docker.io/user/app"),
        ("alpine", "index.docker.io", "docker.io/library/alpine"),
        ("alpine", "registry-1.docker.io", "docker.io/library/alpine"),
        ("alpine", "registry.hub.docker.com", "docker.io/library/alpine"),
        ("user/app", "Docker.IO", "docker.io/user/app"),
        ("name", "127.0.0.1:5001", "127.0.0.1:5001/name"),
        ("team/app", "127.0.0.1:5001", "127.0.0.1:5001/team/app"),
        ("app", "ghcr.io", "ghcr.io/app"),
        ("app", "[::1]:5000", "[::1]:5000/app"),
        ("app", "registry.local", "registry.local/app"),
        ("app", "localhost:5000", "localhost:5000/app"),
    ],
)
def test_mirror_names(name: str, ns: str, docker_name: str) -> None:
    repo = parse_repository(name, ns)
    assert repo.docker_name == docker_name
    assert repo.remote
    assert repo.registry == docker_name.partition("/")[0]
    assert repo.domain == docker_name.partition("/")[0]
    assert repo.name == name


@pytest.mark.parametrize(
    "ns", ["not a host", "host/path", "-bad.example", "host:port", "host:123456", "exa mple.com", "a_b.com"]
)
def test_invalid_ns(ns: str) -> None:
    assert error_code(parse_repository, "alpine", ns) == "NAME_INVALID"
    assert error_code(normalize_registry, ns) == "NAME_INVALID"


@pytest.mark.parametrize(
    ("name", "docker_name"),
    [
        ("my-app", "docker.io/library/my-app"),
        ("alpine", "docker.io/library/alpine"),
        ("library/alpine", "docker.io/library/alpine"),
        ("user/app", "docker.io/user/app"),
        ("ghcr.io/x/y", "ghcr.io/x/y"),
        ("localhost/x", "localhost/x"),
        ("registry.local/team/app", "registry.local/team/app"),
        ("docker.io/alpine", "docker.io/library/alpine"),
        ("docker.io/user/app", "docker.io/user/app"),
    ],
)
def test_local_names(name: str, docker_name: str) -> None:
    repo = parse_repository(name, None)
    assert repo.docker_name == docker_name
    assert not repo.remote
    assert repo.registry is None


def test_empty_ns_means_local() -> None:
    assert not parse_repository("alpine", "").remote


def test_library_prefix_and_short_name_share_one_docker_name() -> None:
    assert parse_repository("library/alpine", None) == parse_repository("library/alpine", None)
    assert (
        parse_repository("library/alpine", None).docker_name == parse_repository("alpine", None).docker_name
    )
    assert (
        parse_repository("library/alpine", "docker.io").docker_name
        == parse_repository("alpine", "docker.io").docker_name
    )


def test_docker_hub_alias_in_name_is_normalized() -> None:
    assert parse_repository("index.docker.io/alpine", None).docker_name == "docker.io/library/alpine"


def test_docker_ref_and_familiar() -> None:
    hub = parse_repository("alpine", "docker.io")
    assert hub.docker_ref("3.20") == "docker.io/library/alpine:3.20"
    assert hub.docker_ref(f"sha256:{HEX}") == f"docker.io/library/alpine@sha256:{HEX}"
    assert hub.familiar("3.20") == "alpine:3.20"
    assert hub.familiar(f"sha256:{HEX}") == f"alpine@sha256:{HEX}"

    user = parse_repository("user/app", "docker.io")
    assert user.familiar("v1") == "user/app:v1"

    local = parse_repository("team/app", "127.0.0.1:5001")
    assert local.docker_ref("v1") == "127.0.0.1:5001/team/app:v1"
    assert local.familiar("v1") == "127.0.0.1:5001/team/app:v1"
    assert local.familiar(f"sha256:{HEX}") == f"127.0.0.1:5001/team/app@sha256:{HEX}"
