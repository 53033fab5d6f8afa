"""FreeSpace: what the next export may need, and exports running at once counted against each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from k3d_registry_dockerd.cache.space import FreeSpace
from k3d_registry_dockerd.oci.errors import RegistryError

MiB = 1 << 20


def _space(tmp_path: Path, free: int, min_free: int = 0) -> FreeSpace:
    space = FreeSpace(tmp_path, min_free)
    space.free = lambda: free  # type: ignore[method-assign]
    return space


def test_the_next_export_may_need_the_largest_recent_one_plus_min_free(tmp_path: Path) -> None:
    space = _space(tmp_path, free=100 * MiB, min_free=40 * MiB)
    assert (space.room().needed, space.room().because) == (40 * MiB, "--min-free")
    space.exported(70 * MiB)
    room = space.room()
    assert room.needed == 110 * MiB and room.short
    assert room.because == "the largest of the last 1 exports wrote (70 MiB) plus --min-free"
    # What /readyz calls short is what the export check would refuse for an export as large.
    with pytest.raises(RegistryError), space.reserve("big:1", 70 * MiB):
        pass


def test_exports_running_at_once_are_counted_against_each_other(tmp_path: Path) -> None:
    space = _space(tmp_path, free=100 * MiB, min_free=10 * MiB)
    with space.reserve("a:1", 60 * MiB):
        with pytest.raises(RegistryError) as refused, space.reserve("b:1", 40 * MiB):
            pass
        assert refused.value.status == 507
        assert "exports running hold 60 MiB" in str(refused.value)
    # Released when the first ends, refused or not.
    with space.reserve("b:1", 40 * MiB):
        pass
