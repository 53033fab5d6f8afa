"""The OCI reference grammar and the mapping from a registry request to Docker's image names.

Pure functions only: everything here is decided from the request path and the `ns` query parameter.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .errors import RegistryError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_SHA256_HEX_RE = re.compile(r"[a-f0-9]{64}")
_DOMAIN_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_REGISTRY_RE = re.compile(rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?")

# Distribution limits a repository name to 255 characters including the registry host.
MAX_NAME_LENGTH = 255
DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}


@dataclass(frozen=True, order=True)
class Digest:
    """A validated sha256 content digest; the only algorithm Docker and this store use."""

    hex: str

    @staticmethod
    def parse(text: str) -> Digest:
        return _parse_digest(text)

    def __str__(self) -> str:
        return f"sha256:{self.hex}"


# Pure, and asked for the same few strings by every request: remembered (failures are not).
@functools.lru_cache(maxsize=4096)
def _parse_digest(text: str) -> Digest:
    if not _DIGEST_RE.fullmatch(text):
        raise RegistryError("DIGEST_INVALID", f"invalid digest {text!r}")
    algorithm, _, encoded = text.partition(":")
    if algorithm != "sha256":
        raise RegistryError("DIGEST_INVALID", f"unsupported digest algorithm {algorithm!r}: only sha256")
    if not _SHA256_HEX_RE.fullmatch(encoded):
        raise RegistryError("DIGEST_INVALID", f"invalid sha256 digest {text!r}")
    return Digest(encoded)


def is_digest(reference: str) -> bool:
    """A manifest reference is a digest when it has an algorithm prefix (tags cannot contain ':')."""
    return ":" in reference


def parse_tag(text: str) -> str:
    if not _TAG_RE.fullmatch(text):
        raise RegistryError("TAG_INVALID", f"invalid tag {text!r}")
    return text


def _split_domain(name: str) -> tuple[str | None, str]:
    """Docker's rule: the first component is a registry host if it has a '.' or ':' or is localhost."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, name


@dataclass(frozen=True)
class Repository:
    """A repository as requested, and the Docker repository it stands for.

    `docker_name` is fully qualified (``docker.io/library/alpine``, ``127.0.0.1:5001/team/app``); it keys
    the store, so the same Docker image is cached once however it is asked for.
    """

    name: str
    registry: str | None
    docker_name: str

    @property
    def remote(self) -> bool:
        """Only mirror requests (``ns`` given) may make Docker pull from a remote registry."""
        return self.registry is not None

    @property
    def domain(self) -> str:
        return self.docker_name.partition("/")[0]

    def docker_ref(self, reference: str) -> str:
        """The reference Docker's API takes for a tag or digest of this repository."""
        separator = "@" if is_digest(reference) else ":"
        return f"{self.docker_name}{separator}{reference}"

    def podman_local(self) -> Repository | None:
        """The `localhost/` repository Podman's short-name lookup finds for a Docker Hub name (`podman build
        -t my-app:dev` makes `localhost/my-app:dev`, and `podman run my-app:dev` runs it); None for names of
        other registries."""
        if self.domain != DOCKER_HUB:
            return None
        short = self.docker_name.removeprefix(f"{DOCKER_HUB}/").removeprefix("library/")
        return Repository(self.name, self.registry, f"localhost/{short}")

    def familiar(self, reference: str) -> str:
        """The short form `docker images` shows, for logs."""
        name = self.docker_name
        if name.startswith(DOCKER_HUB + "/"):
            name = name.removeprefix(DOCKER_HUB + "/").removeprefix("library/")
        separator = "@" if is_digest(reference) else ":"
        return f"{name}{separator}{reference}"


def normalize_registry(ns: str) -> str:
    if not _REGISTRY_RE.fullmatch(ns):
        raise RegistryError("NAME_INVALID", f"invalid registry in ns parameter: {ns!r}")
    lowered = ns.lower()
    return DOCKER_HUB if lowered in _DOCKER_HUB_ALIASES else lowered


def docker_name(name: str) -> str:
    """Docker's fully qualified form of an image name as `docker images` lists it (`alpine`,
    `127.0.0.1:5001/app`): the registry domain, and `library/` for Docker Hub's one-part names."""
    found, path = _split_domain(name)
    domain = DOCKER_HUB if found is None or found.lower() in _DOCKER_HUB_ALIASES else found
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return f"{domain}/{path}"


def repository_of(docker_name: str) -> Repository:
    """The repository a cache record's Docker name stands for, as this registry's own namespace names it
    (nothing is ever pulled for it)."""
    name = docker_name.removeprefix(f"{DOCKER_HUB}/").removeprefix("library/")
    return Repository(name=name, registry=None, docker_name=docker_name)


def split_repo_tag(repo_tag: str) -> tuple[str, str] | None:
    """`name:tag` as Docker lists it (the name may hold a registry port) → (Docker name, tag)."""
    name, sep, tag = repo_tag.rpartition(":")
    if not sep or "/" in tag or name == "<none>":
        return None
    return docker_name(name), tag


@functools.lru_cache(maxsize=4096)
def parse_repository(name: str, ns: str | None) -> Repository:
    """Maps a request's repository name (and containerd's ``ns`` mirror parameter) to a Docker name.

    With ``ns`` the image lives in that registry, as Docker names it (``library/`` for Docker Hub's
    single-component names). Without ``ns`` the name is in this registry's own namespace: the local Docker
    image that ``docker images`` lists under that name.
    """
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise RegistryError("NAME_INVALID", f"invalid repository name {name!r}")
    registry = normalize_registry(ns) if ns else None
    full = docker_name(f"{registry}/{name}" if registry else name)
    if len(full) > MAX_NAME_LENGTH:
        raise RegistryError("NAME_INVALID", f"repository name too long: {full!r}")
    return Repository(name=name, registry=registry, docker_name=full)
