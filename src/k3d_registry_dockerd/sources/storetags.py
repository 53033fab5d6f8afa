"""What a daemon's own files say its tags name, read while the daemon cannot be asked: Docker's classic store
keeps its tags in `image/<driver>/repositories.json`, Podman's storage in each image's `names` in
`<driver>-images/images.json`. The daemon rewrites those files whole whenever a tag moves, so they are as
fresh as its answer would be.

Both become one map: a fully qualified `name:tag` (as `Repository.docker_ref` writes it) to an image ID.
References by digest are left out: they are the upstream's digests, which serving in place never serves.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..oci.reference import split_repo_tag
from .pieces import identity

log = logging.getLogger(__package__)
_IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")


def _add(tags: dict[str, str], ref: Any, image_id: Any) -> None:
    if not isinstance(ref, str) or "@" in ref or not isinstance(image_id, str):
        return
    named = split_repo_tag(ref)
    if named is not None and _IMAGE_ID.fullmatch(image_id):
        tags[f"{named[0]}:{named[1]}"] = image_id


def classic_tags(raw: bytes) -> dict[str, str]:
    """Docker's `repositories.json`: `{"Repositories": {name: {"name:tag": image ID, "name@digest": image
    ID}}}`, names as `docker images` shows them (`app`, `127.0.0.1:5001/team/app`). ValueError when it is not
    that."""
    try:
        repositories = json.loads(raw)["Repositories"] or {}
        tags: dict[str, str] = {}
        for refs in repositories.values():
            for ref, image_id in refs.items():
                _add(tags, ref, image_id)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not Docker's record of its tags ({exc!r})") from exc
    return tags


def podman_tags(raw: bytes) -> dict[str, str]:
    """Podman's `images.json`: `[{"id": hex, "names": ["localhost/app:dev", …], …}, …]`, names fully
    qualified. ValueError when it is not that."""
    try:
        tags: dict[str, str] = {}
        for image in json.loads(raw) or []:
            for name in image.get("names") or []:
                _add(tags, name, f"sha256:{image['id']}")
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not Podman's list of images ({exc!r})") from exc
    return tags


class TagRecord:
    """One store's file of tags, parsed again only when the file changed (the daemon replaces it whole)."""

    def __init__(self, path: Path, parse: Callable[[bytes], dict[str, str]]) -> None:
        self.path = path
        self._parse = parse
        # The identity of the file read last, and what it said.
        self._read: tuple[tuple[int, ...], dict[str, str]] | None = None
        self._problem: str | None = None

    def version(self) -> tuple[int, ...] | None:
        """The file's identity now (one stat: cheap enough for every request); None when it is not there."""
        try:
            return identity(self.path.stat())
        except OSError:
            return None

    def tags(self) -> dict[str, str]:
        """`name:tag` -> image ID as the file has it now; empty (logged once) when it cannot be read
        (blocking)."""
        try:
            with open(self.path, "rb") as handle:
                seen = identity(os.fstat(handle.fileno()))
                if self._read is not None and self._read[0] == seen:
                    return self._read[1]
                tags = self._parse(handle.read())
        except (OSError, ValueError) as exc:
            problem = f"{self.path} cannot be read: {getattr(exc, 'strerror', None) or exc}"
            if problem != self._problem:
                log.info("%s; tags are served as the registry last knew them", problem)
            self._problem = problem
            return {}
        self._read, self._problem = (seen, tags), None
        return tags
