from __future__ import annotations

from pathlib import Path

import pytest

from k3d_registry_dockerd.cache.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    opened = Store(tmp_path / "cache")
    opened.open()
    return opened
