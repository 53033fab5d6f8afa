"""What the registry knew of the daemon's images, kept in the cache dir, so that what it served (or verified
ahead) from the daemon's own store is served again while the daemon is down, across its own restarts too.

The daemon's files stay where they are when dockerd or Podman's service stops, but two things come only from
the daemon's API: its facts (product, version, storage, data root, containerd), without which the store
cannot even be found, and which image a tag or digest served before stood for. Both are kept here: the facts
as they were when the daemon last answered, and per repository tag -> image ID and manifest digest -> image
ID, for everything served in place or verified ahead. The store's own files say what a tag names now; this
says which tags were ever served (a tag never seen is not served without the daemon) and what they were.

It belongs to the sources, the lowest layer that needs it: a blob request reads the store as the daemon last
described it. It is saved as one state file of the cache dir (`Store.save_state`: replaced atomically, so a
crash leaves the old or the new one), in a thread, only after something changed, and never for requests
that find it as it was. It is bounded, and written for one daemon: a cache dir moved to another endpoint
starts afresh.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict
from typing import Any

from ..cache.store import Store
from ..common.bounded import BoundedDict
from ..docker.engine import DaemonInfo
from ..oci.platform import Platform

log = logging.getLogger(__package__)

STATE_FILE = "known.json"
STATE_VERSION = 1
REPOSITORIES_LIMIT = 1024
# Per repository: its tags, and the manifests served by digest (a tag rebuilt often leaves one per image).
TAGS_LIMIT = 64
DIGESTS_LIMIT = 64


class KnownRepository:
    """A repository's tags and manifest digests, each to the image ID it was served as."""

    def __init__(self) -> None:
        self.tags: BoundedDict[str, str] = BoundedDict(TAGS_LIMIT)
        self.digests: BoundedDict[str, str] = BoundedDict(DIGESTS_LIMIT)

    def images(self) -> list[str]:
        """Its image IDs, each once: those of its tags, then of its digests, the newest first."""
        return list(dict.fromkeys([*reversed(self.tags.values()), *reversed(self.digests.values())]))


def _info_of(data: dict[str, Any]) -> DaemonInfo:
    return DaemonInfo(**{**data, "platform": Platform(**data["platform"])})


class KnownImages:
    """The daemon's facts and the images served from its store, as last known (see the module's
    docstring). `endpoint` is the daemon's (`DOCKER_HOST`): what was known of another is not used."""

    def __init__(self, store: Store, endpoint: str) -> None:
        self._store = store
        self.endpoint = endpoint
        # The daemon's facts when it last answered; None when it never did.
        self.info: DaemonInfo | None = None
        # Docker name -> what was served under it.
        self._repos: BoundedDict[str, KnownRepository] = BoundedDict(REPOSITORIES_LIMIT)
        self._dirty = False
        self._saving: asyncio.Task[None] | None = None

    def open(self) -> None:
        """Reads what was known from the cache dir (blocking); an unreadable file counts as nothing known."""
        raw = self._store.read_state(STATE_FILE)
        if raw is None:
            return
        try:
            data = json.loads(raw)
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
            if data.get("endpoint") != self.endpoint:
                log.info(
                    "%s describes the images of %s, not of %s: not used",
                    self._store.root / STATE_FILE,
                    data.get("endpoint"),
                    self.endpoint,
                )
                return
            info = _info_of(data["daemon"]) if data.get("daemon") else None
            repos: BoundedDict[str, KnownRepository] = BoundedDict(REPOSITORIES_LIMIT)
            for name, entry in data["repositories"].items():
                known = repos[str(name)] = KnownRepository()
                known.tags.update({str(k): str(v) for k, v in entry["tags"].items()})
                known.digests.update({str(k): str(v) for k, v in entry["digests"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning(
                "ignoring %s, which cannot be read (%s): while the daemon is down, only what is served from "
                "now on is served again",
                self._store.root / STATE_FILE,
                exc,
            )
            return
        self.info, self._repos = info, repos

    def saw(self, info: DaemonInfo) -> None:
        """The daemon answered with these facts (the same object on every request until it answers anew)."""
        if info is self.info:
            return
        changed = info != self.info
        self.info = info
        if changed:
            self._changed()

    def served(
        self, docker_name: str, image_id: str, *, tag: str | None = None, digest: str | None = None
    ) -> None:
        """The repository's tag and/or manifest digest was served (or verified) as the image `image_id`."""
        known = self._repos.get(docker_name) or KnownRepository()
        changed = False
        for entries, key in ((known.tags, tag), (known.digests, digest)):
            if key is not None and entries.get(key) != image_id:
                entries[key] = image_id
                changed = True
        if changed:
            # The newest again: what is forgotten first is what changed longest ago.
            self._repos[docker_name] = known
            self._changed()

    def tag(self, docker_name: str, tag: str) -> str | None:
        """The image ID the tag was last served as; None for a tag never served."""
        known = self._repos.get(docker_name)
        return known.tags.get(tag) if known is not None else None

    def digest(self, docker_name: str, digest: str) -> str | None:
        """The image ID a manifest digest was served for; None for one never served."""
        known = self._repos.get(docker_name)
        return known.digests.get(digest) if known is not None else None

    def images(self, docker_name: str) -> list[str]:
        """The IDs of the images served under the repository (`KnownRepository.images`)."""
        known = self._repos.get(docker_name)
        return known.images() if known is not None else []

    def _changed(self) -> None:
        self._dirty = True
        if self._saving is None or self._saving.done():
            self._saving = asyncio.ensure_future(self._save())

    async def _save(self) -> None:
        """Writes what is known while anything changed since it was last written; changes made while it is
        being written are written after."""
        while self._dirty:
            self._dirty = False
            # A copy made here, on the event loop: the maps change only there.
            data = {
                "version": STATE_VERSION,
                "endpoint": self.endpoint,
                "daemon": asdict(self.info) if self.info is not None else None,
                "repositories": {
                    name: {"tags": dict(known.tags), "digests": dict(known.digests)}
                    for name, known in self._repos.items()
                },
            }
            try:
                await asyncio.to_thread(self._write, data)
            except OSError as exc:
                log.warning("could not save %s: %s", self._store.root / STATE_FILE, exc.strerror or exc)
                return

    def _write(self, data: dict[str, Any]) -> None:
        self._store.save_state(STATE_FILE, json.dumps(data, indent=1, sort_keys=True).encode())

    async def close(self) -> None:
        """Returns once what changed is written."""
        if self._saving is not None:
            await asyncio.gather(self._saving, return_exceptions=True)
