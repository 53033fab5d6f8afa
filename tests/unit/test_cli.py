"""Process set-up the server does at start."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from k3d_registry_dockerd import cli


@pytest.fixture
def open_files_limit() -> Iterator[tuple[int, int]]:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield before
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_open_files_limit_is_raised_to_the_hard_limit(open_files_limit: tuple[int, int]) -> None:
    _, hard = open_files_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    wanted = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    assert cli._raise_open_files_limit() == wanted
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (wanted, hard)


def test_a_soft_limit_already_at_the_hard_one_is_kept(open_files_limit: tuple[int, int]) -> None:
    _, hard = open_files_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert cli._raise_open_files_limit() == hard
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
