"""Free space in the cache dir against what exports need: an export that cannot fit is refused before it
writes anything (507) instead of failing midway, and `/readyz` and the status page say when the next one
may not fit. Serving in place and zero-copy write nothing here, so only exports ask."""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..common import units
from ..oci.errors import RegistryError

# The exports whose size counts as what the next one may need.
RECENT_EXPORTS = 20
INSUFFICIENT_STORAGE = 507


@dataclass(frozen=True)
class Room:
    """Free bytes in the cache dir, the bytes an export may need, and what that figure is."""

    free: int
    needed: int
    because: str

    @property
    def short(self) -> bool:
        return self.free < self.needed

    def as_json(self) -> dict[str, int | str | bool]:
        return {"free": self.free, "needed": self.needed, "because": self.because, "short": self.short}


class FreeSpace:
    """The one owner of what exports wrote lately and of the `--min-free` floor."""

    def __init__(self, root: Path, min_free: int = 0) -> None:
        self.root = root
        self.min_free = min_free
        self._recent: collections.deque[int] = collections.deque(maxlen=RECENT_EXPORTS)
        # What the exports running now may still write: each counts against the free space of the next.
        self._reserved = 0

    def free(self) -> int:
        """Bytes this (unprivileged) process may still write in the cache dir's filesystem."""
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize

    def exported(self, written: int) -> None:
        """An export finished having written `written` bytes into the cache."""
        self._recent.append(written)

    def room(self) -> Room:
        """What the next export may need: as much as the largest recent one wrote, plus --min-free."""
        largest = max(self._recent, default=0)
        if not largest:
            return Room(self.free(), self.min_free, "--min-free")
        because = f"the largest of the last {len(self._recent)} exports wrote"
        if self.min_free:
            because += f" ({units.size(largest)}) plus --min-free"
        return Room(self.free(), largest + self.min_free, because)

    def problem(self) -> str | None:
        """Why the next export may not fit, with the numbers; None when it should."""
        room = self.room()
        if not room.short:
            return None
        return (
            f"{units.size(room.free)} free in the cache dir {self.root}, below the {units.size(room.needed)} "
            f"{room.because}: the next export may be refused; free space there"
        )

    @contextlib.contextmanager
    def reserve(self, ref: str, size: int) -> Iterator[None]:
        """Holds `size` bytes (the image's size, as Docker says) for an export of `ref` while it runs;
        refuses it (507) before anything is written when that, what running exports hold and --min-free
        do not fit in the free space: the client gets the numbers."""
        free = self.free()
        if free < size + self._reserved + self.min_free:
            running = f", exports running hold {units.size(self._reserved)}" if self._reserved else ""
            floor = f" and --min-free keeps {units.size(self.min_free)}" if self.min_free else ""
            raise RegistryError(
                "UNAVAILABLE",
                f"not exporting {ref}: the cache dir {self.root} has {units.size(free)} free, the export "
                f"needs up to {units.size(size)} (the image's size){running}{floor}; free space there",
                status=INSUFFICIENT_STORAGE,
            )
        self._reserved += size
        try:
            yield
        finally:
            self._reserved -= size
