"""Free space in the cache dir, against a running registry whose cache dir is a small tmpfs this test mounts
(and grows): `/readyz` and the status page say when the next export may not fit, with the numbers; an export
that cannot fit is refused with 507 before Docker is asked (its event stream shows no `docker save`) and
leaves nothing in the cache dir; served in place, nothing is written there, so nothing is refused."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import oci_client
from .daemons import NO_ZERO_COPY, Dockerd, RegistryFactory, make_temp_dir, remove_tree
from .images import MiB, build_image

ACCEPT = {"Accept": oci_client.MANIFEST_ACCEPT}


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 32 MiB tmpfs; `_resize` grows or shrinks it (never below what it holds)."""
    mount_point = make_temp_dir("small-disk")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        remove_tree(mount_point)


def _resize(mount_point: Path, megabytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(mount_point)], check=True)


def _readyz(url: str) -> tuple[int, dict[str, object]]:
    response = oci_client.request(f"{url}/readyz")
    return response.status, json.loads(response.body)


def _space(url: str) -> dict[str, object]:
    status: dict[str, object] = oci_client.request(f"{url}/status.json").json()["space"]
    return status


def _files(cache: Path) -> list[Path]:
    """What the cache dir holds besides its lock and empty directories."""
    return [path for path in cache.rglob("*") if path.is_file() and path.name != ".lock"]


def _page(chromium: str, url: str, profile: Path) -> str:
    """The status page as headless Chromium renders it (its script filled in)."""
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    return subprocess.run(
        [*browser, "--virtual-time-budget=5000", "--dump-dom", f"{url}/"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


def test_an_export_that_cannot_fit_is_refused_and_served_once_there_is_room(
    chromium: str, docker26: Dockerd, registry_under_test: RegistryFactory, small_disk: Path, tmp_path: Path
) -> None:
    build_image(docker26, "roomy:1", layers=2, size=48 * MiB, seed="roomy")
    cache = small_disk / "cache"
    registry = registry_under_test(
        docker26, cache_dir=cache, extra_args=(*NO_ZERO_COPY, "--min-free", "40MiB")
    )
    before = _files(cache)

    status, body = _readyz(registry.url)
    assert status == 503
    problem = body["problems"]["space"]  # type: ignore[index]
    assert "free in the cache dir" in problem and "below the 40 MiB --min-free" in problem, problem
    space = _space(registry.url)
    assert (space["needed"], space["short"]) == (40 * MiB, True)
    assert int(space["free"]) <= 32 * MiB  # type: ignore[call-overload]
    assert "MiB free, an export may need 40 MiB (--min-free)</span>" in _page(
        chromium, registry.url, tmp_path
    )

    since = time.time()
    refused = oci_client.request(f"{registry.url}/v2/library/roomy/manifests/1?ns=docker.io", headers=ACCEPT)
    assert refused.status == 507, refused.body
    (error,) = refused.json()["errors"]
    assert error["code"] == "UNAVAILABLE"
    assert error["message"].startswith("not exporting docker.io/library/roomy:1: the cache dir ")
    assert "--min-free keeps 40 MiB; free space there" in error["message"]
    assert docker26.image_saves(since) == []
    assert _files(cache) == before
    assert sum("507 UNAVAILABLE: not exporting" in line for line in registry.log_text().splitlines()) == 1

    _resize(small_disk, 256)
    assert _readyz(registry.url)[0] == 200
    pulled = oci_client.pull(registry.url, "library/roomy", "1", ns="docker.io")
    assert pulled.bytes > 48 * MiB
    assert len(docker26.image_saves(since)) == 1

    # Room for --min-free but not for another export as large as that one: not ready, with its numbers.
    used = sum(path.stat().st_size for path in _files(cache)) // MiB
    _resize(small_disk, used + 44)
    status, body = _readyz(registry.url)
    assert status == 503
    assert "the largest of the last 1 exports wrote" in body["problems"]["space"]  # type: ignore[index]
    assert _space(registry.url)["needed"] > 48 * MiB  # type: ignore[operator]


def test_in_place_serving_writes_nothing_so_is_never_refused(
    docker26: Dockerd, registry_under_test: RegistryFactory, small_disk: Path
) -> None:
    if not docker26.zero_copy:
        pytest.skip(f"{docker26.name}'s store ({docker26.driver}) is exported, not served in place")
    build_image(docker26, "in-place-roomy:1", layers=2, size=48 * MiB, seed="in-place-roomy")
    registry = registry_under_test(
        docker26, cache_dir=small_disk / "cache", extra_args=("--min-free", "1TiB")
    )
    assert _readyz(registry.url)[0] == 503
    since = time.time()
    pulled = oci_client.pull(registry.url, "library/in-place-roomy", "1", ns="docker.io")
    assert pulled.bytes > 48 * MiB
    assert docker26.image_saves(since) == []
