"""Free space in the cache dir against what exports need: an export that cannot fit is refused before it
writes anything (507) instead of failing midway, and `/readyz` and the status page say when the next one
may not fit. Serving in place and zero-copy write nothing here, so only exports ask."""

from __future__ import annotations

import collections
import os
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

    def free(self) -> int:
        """Bytes this (unprivileged) process may still write in the cache dir's filesystem."""
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize

    def exported(self, written: int) -> None:
        """An export finished having written `written` bytes into the cache."""
        self._recent.append(written)

    def room(self) -> Room:
        largest = max(self._recent, default=0)
        if largest > self.min_free:
            return Room(self.free(), largest, f"the largest of the last {len(self._recent)} exports wrote")
        return Room(self.free(), self.min_free, "--min-free")

    def problem(self) -> str | None:
        """Why the next export may not fit, with the numbers; None when it should."""
        room = self.room()
        if not room.short:
            return None
        return (
            f"{units.size(room.free)} free in the cache dir {self.root}, below the {units.size(room.needed)} "
            f"{room.because}: the next export may be refused; free space there"
        )

    def check_export(self, ref: str, size: int) -> None:
        """Refuses (507) an export of `ref`, whose image Docker says is `size` bytes, that would leave less
        than --min-free: nothing is written, and the client gets the numbers."""
        free = self.free()
        if free >= size + self.min_free:
            return
        floor = f" and --min-free keeps {units.size(self.min_free)}" if self.min_free else ""
        raise RegistryError(
            "UNAVAILABLE",
            f"not exporting {ref}: the cache dir {self.root} has {units.size(free)} free, the export needs "
            f"up to {units.size(size)} (the image's size){floor}; free space there",
            status=INSUFFICIENT_STORAGE,
        )
