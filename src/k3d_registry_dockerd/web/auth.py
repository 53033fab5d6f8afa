"""Write access control: pushes and deletes need credentials from an htpasswd file, as with distribution's
registry (``REGISTRY_AUTH=htpasswd``). Pulls never do: they stay open for the cluster, whose credentials are
meant for the upstream registry.

Entries are bcrypt hashes, as ``htpasswd -B`` writes them. The file is read again when it changes, and a
verified password is remembered until then: bcrypt costs tens of milliseconds by design, and a push makes
a few requests per layer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from aiohttp import BasicAuth

from ..common.bounded import BoundedDict

log = logging.getLogger(__package__)

_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_REMEMBERED = 256


class HtpasswdError(ValueError):
    """The htpasswd file cannot be used; the message names the file, the line and what to do."""


def parse_htpasswd(text: str, path: Path) -> dict[str, bytes]:
    """User → bcrypt hash; every other entry kind is refused (distribution accepts only bcrypt)."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not user:
            raise HtpasswdError(f"{path} line {number} is not USER:HASH")
        if not hashed.startswith(_BCRYPT_PREFIXES):
            raise HtpasswdError(
                f"{path} line {number} ({user}) is not a bcrypt entry: create entries with `htpasswd -B`"
            )
        users[user] = hashed.encode()
    return users


@dataclass(frozen=True)
class _Loaded:
    stamp: tuple[int, int, int]
    users: dict[str, bytes]


class Htpasswd:
    def __init__(self, path: Path, realm: str) -> None:
        self.path = path
        self.realm = realm
        self._loaded: _Loaded | None = None
        self._verified: BoundedDict[bytes, str] = BoundedDict(_REMEMBERED)

    @property
    def challenge(self) -> dict[str, str]:
        return {"WWW-Authenticate": f'Basic realm="{self.realm}"'}

    def load(self) -> dict[str, bytes]:
        """The current entries, read again when the file changed; HtpasswdError when it cannot be used."""
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if self._loaded is not None and self._loaded.stamp == stamp:
                return self._loaded.users
            users = parse_htpasswd(self.path.read_text(encoding="utf-8", errors="replace"), self.path)
        except OSError as exc:
            raise HtpasswdError(f"cannot read the htpasswd file {self.path}: {exc.strerror or exc}") from exc
        if self._loaded is not None:
            log.info("htpasswd file %s changed: %d users", self.path, len(users))
        self._loaded = _Loaded(stamp, users)
        self._verified.clear()
        return users

    async def allows(self, authorization: str | None) -> str | None:
        """The user whose valid Basic credentials the header carries, else None."""
        if not authorization or not authorization.lower().startswith("basic "):
            return None
        try:
            credentials = BasicAuth.decode(authorization, encoding="utf-8")
        except ValueError:
            return None
        try:
            users = self.load()
        except HtpasswdError as exc:
            # Refusing is the safe answer; the file may be mid-edit.
            log.warning("refusing a push: %s", exc)
            return None
        hashed = users.get(credentials.login)
        if hashed is None:
            return None
        key = hashlib.sha256(b"\0".join([credentials.login.encode(), credentials.password.encode(), hashed]))
        if key.digest() in self._verified:
            return credentials.login
        if not await asyncio.to_thread(_checkpw, credentials.password, hashed):
            return None
        self._verified[key.digest()] = credentials.login
        return credentials.login


def _checkpw(password: str, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password.encode(), hashed)
    except ValueError:  # longer than bcrypt's 72 bytes, or a malformed hash
        return False
