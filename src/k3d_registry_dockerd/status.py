"""The status page: what the registry holds and is doing, as JSON and as a self-refreshing HTML page."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from importlib import resources
from typing import Any

from . import __version__, cache
from .mirror import Mirror

RECENT_PROBLEMS = 20


class RecentProblems(logging.Handler):
    """Keeps the last warnings and errors the registry logged, for the status page."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.entries: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_PROBLEMS)

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.appendleft(
            {"time": record.created, "level": record.levelname.lower(), "message": record.getMessage()}
        )


def _cache_counts(mirror: Mirror) -> dict[str, float]:
    registry = mirror.metrics.registry
    return {
        result: registry.get_sample_value("k3d_registry_manifest_cache_total", {"result": result}) or 0.0
        for result in ("hit", "miss", "stale")
    }


async def snapshot(mirror: Mirror, problems: RecentProblems) -> dict[str, Any]:
    """Everything the page shows; the cache walk runs off the event loop."""
    images = await asyncio.to_thread(cache.images, mirror.store)
    total = await asyncio.to_thread(cache.cache_bytes, mirror.store)
    counts = _cache_counts(mirror)
    answered = counts["hit"] + counts["miss"] + counts["stale"]
    now = time.time()
    return {
        "version": __version__,
        "time": now,
        "cache": {
            "dir": str(mirror.store.root),
            "bytes": total,
            "limit": mirror.cache_max_size,
            "hit_rate": (counts["hit"] + counts["stale"]) / answered if answered else None,
            "tag_requests": answered,
        },
        "images": [
            {
                "repository": image.repository,
                "tags": list(image.tags),
                "digest": image.digest,
                "bytes": image.size,
                "last_used": image.last_used,
            }
            for image in images
        ],
        "exports": [
            {
                "ref": export.ref,
                "seconds": now - export.started,
                "bytes": export.bytes_read,
                "expected_bytes": export.expected_bytes,
            }
            for export in list(mirror.in_progress.values())
        ],
        "problems": list(problems.entries),
    }


# Plain HTML with inline style and script: no external assets, works offline.
PAGE = resources.files(__package__).joinpath("status.html").read_text(encoding="utf-8")
