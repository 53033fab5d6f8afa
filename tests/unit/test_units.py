"""Sizes in binary units, the same everywhere."""

from __future__ import annotations

import pytest

from k3d_registry_dockerd.common import units


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (312, "312 B"),
        (1024, "1 KiB"),
        (1 << 20, "1 MiB"),
        (1_500_000, "1.4 MiB"),
        (20 << 30, "20 GiB"),
        (int(240.5 * (1 << 20)), "240 MiB"),
        (3 << 40, "3 TiB"),
    ],
)
def test_size(count: int, text: str) -> None:
    assert units.size(count) == text


def test_duration_and_rate() -> None:
    assert units.duration(4.25) == "4.2s"
    assert units.duration(185) == "3m05s"
    assert units.duration(3720) == "1h02m"
    assert units.duration(7 * 86400) == "7d"
    assert units.duration(2 * 86400 + 3 * 3600 + 60) == "2d03h"
    assert units.rate(10 << 20, 2) == "5 MiB/s"
    assert units.rate(1, 0) == "?/s"
