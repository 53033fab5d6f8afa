"""The host's Docker credentials for a registry, read as the docker CLI reads what `docker login` stored:
`$DOCKER_CONFIG/config.json` (else `~/.docker/config.json`), a registry's own helper in `credHelpers`, else
the `credsStore` helper, else the `auths` entries. Helpers are asked as the CLI asks them:
`docker-credential-<name> get`, the server URL on stdin, `{"Username": …, "Secret": …}` back.

Used (with --docker-credentials) for pulls through Docker whose request carries no credentials.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..oci.errors import RegistryError
from ..oci.reference import DOCKER_HUB, normalize_registry
from .endpoint import config_dir
from .engine import Credentials

log = logging.getLogger(__package__)
# The key `docker login` stores Docker Hub's credentials under, and the server URL its helpers know.
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
HELPER_TIMEOUT = 10.0
# What a helper answers for a registry it holds nothing for (docker-credential-helpers' message).
_NOT_FOUND = "credentials not found"
# A helper's username for an identity token (an OAuth refresh token) instead of a password.
_TOKEN_USER = "<token>"


class HostCredentialsError(Exception):
    """The config file or a helper could not be read; the message names which and why."""


@dataclass(frozen=True)
class DockerConfig:
    auths: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    creds_store: str | None = None
    cred_helpers: Mapping[str, str] = field(default_factory=dict)


def registry_of(key: str) -> str | None:
    """The registry domain a config key stands for (`https://index.docker.io/v1/` is docker.io), as the
    CLI reduces a key to its host."""
    host = key.strip().removeprefix("https://").removeprefix("http://").partition("/")[0]
    try:
        return normalize_registry(host)
    except RegistryError:
        return None


def server_url(domain: str) -> str:
    """What a helper is asked for: the key `docker login` stored the registry's credentials under."""
    return DOCKER_HUB_KEY if domain == DOCKER_HUB else domain


def parse_config(text: str, path: Path) -> DockerConfig:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise HostCredentialsError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise HostCredentialsError(f"{path} is not a JSON object")
    auths = data.get("auths") or {}
    helpers = data.get("credHelpers") or {}
    store = data.get("credsStore") or None
    if not isinstance(auths, dict) or not isinstance(helpers, dict) or not isinstance(store, str | None):
        raise HostCredentialsError(f"{path}: auths, credHelpers or credsStore is not what docker writes")
    return DockerConfig(
        {str(k): v for k, v in auths.items() if isinstance(v, dict)},
        store,
        {str(k): str(v) for k, v in helpers.items()},
    )


def from_auths(config: DockerConfig, domain: str) -> Credentials | None:
    """The `auths` entry for the registry: `auth` (base64 of user:password), the same spelled out, or an
    identity token."""
    for key, entry in config.auths.items():
        if registry_of(key) != domain:
            continue
        if entry.get("identitytoken"):
            return Credentials("", "", identity_token=str(entry["identitytoken"]))
        if entry.get("auth"):
            try:
                user, sep, password = base64.b64decode(str(entry["auth"])).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, sep, password = "", "", ""
            if sep:
                return Credentials(user, password)
        if entry.get("username") and entry.get("password"):
            return Credentials(str(entry["username"]), str(entry["password"]))
    return None


def helper_for(config: DockerConfig, domain: str) -> str | None:
    for key, helper in config.cred_helpers.items():
        if registry_of(key) == domain:
            return helper
    return config.creds_store


def parse_helper_answer(output: bytes, helper: str) -> Credentials:
    try:
        answer = json.loads(output)
        username, secret = str(answer["Username"]), str(answer["Secret"])
    except (ValueError, KeyError, TypeError) as exc:
        raise HostCredentialsError(
            f"docker-credential-{helper} answered something not JSON credentials"
        ) from exc
    if username == _TOKEN_USER:
        return Credentials("", "", identity_token=secret)
    return Credentials(username, secret)


class HostCredentials:
    """The docker CLI's stored credentials, re-read whenever the config file changes."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self.path = config_dir(env) / "config.json"
        self._env = dict(env)
        self._stamp: tuple[int, int] | None = None
        self._config = DockerConfig()

    def config(self) -> DockerConfig:
        """The config file as it is now (blocking: a stat, and a read when it changed)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._config = None, DockerConfig()
            return self._config
        except OSError as exc:
            raise HostCredentialsError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            try:
                text = self.path.read_text(encoding="utf-8")
            except OSError as exc:
                raise HostCredentialsError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
            self._config, self._stamp = parse_config(text, self.path), stamp
        return self._config

    async def lookup(self, domain: str) -> Credentials | None:
        """The credentials `docker pull` on this host would use for the registry; None when it has none."""
        config = await asyncio.to_thread(self.config)
        helper = helper_for(config, domain)
        if helper is None:
            return from_auths(config, domain)
        return await self._ask(helper, server_url(domain))

    async def _ask(self, helper: str, url: str) -> Credentials | None:
        program = f"docker-credential-{helper}"
        try:
            process = await asyncio.create_subprocess_exec(
                program,
                "get",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
            )
        except OSError as exc:
            raise HostCredentialsError(
                f"{self.path} names the credential helper {helper}, but {program} cannot run: "
                f"{exc.strerror or exc}"
            ) from exc
        try:
            async with asyncio.timeout(HELPER_TIMEOUT):
                out, err = await process.communicate(url.encode())
        except TimeoutError:
            process.kill()
            await process.wait()
            raise HostCredentialsError(f"{program} did not answer within {HELPER_TIMEOUT:.0f}s") from None
        if process.returncode != 0:
            said = (out or err).decode(errors="replace").strip()
            if _NOT_FOUND in said.lower():
                return None
            raise HostCredentialsError(f"{program} get {url} failed: {said[:200]}")
        return parse_helper_answer(out, helper)

    def registries(self) -> list[str]:
        """The registries this host has credentials for, by name (for `doctor`; a credsStore's list is
        not asked for)."""
        config = self.config()
        found = {registry_of(key) for key in [*config.auths, *config.cred_helpers]}
        return sorted(name for name in found if name)
