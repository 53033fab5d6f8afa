"""The first line of the status page and of `doctor` says how the registry gets bytes for this Docker: in
place from Docker's classic store, zero-copy from its containerd content store, or export. (A registry
container without the mounts, which exports and names them, is in test_container_image.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from . import oci_client
from .daemons import NO_ZERO_COPY, Dockerd, RegistryFactory

WAYS = {"docker26": "in place: ", "docker28_containerd": "zero-copy: "}


def _doctor(daemon: Dockerd, cache_dir: Path, *args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(DOCKER_HOST=daemon.host, PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    result = subprocess.run(
        [sys.executable, "-m", "k3d_registry_dockerd", "doctor", "--cache-dir", str(cache_dir), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return result.stdout.splitlines()


def _page_line(chromium: str, url: str, profile: Path) -> str:
    """The status page's first line, as the page's script renders it."""
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom", f"{url}/"],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    start = dom.index('id="bytes-path">') + len('id="bytes-path">')
    return dom[start : dom.index("</div>", start)]


@pytest.mark.parametrize("store", sorted(WAYS))
def test_first_line_says_how_bytes_are_served(
    store: str,
    chromium: str,
    registry_under_test: RegistryFactory,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    daemon: Dockerd = request.getfixturevalue(store)
    way = WAYS[store]
    registry = registry_under_test(daemon)
    line = oci_client.request(f"{registry.url}/status.json").json()["bytes_path"]
    assert line.startswith(way) and f"Docker Engine {daemon.version}" in line, line
    assert line.endswith("never exported")
    assert _page_line(chromium, registry.url, tmp_path / "profile") == line
    first = _doctor(daemon, tmp_path / "doctor-cache")[0]
    assert first.startswith(way) and first.endswith("never exported"), first
    # Turned off, both say export.
    off = registry_under_test(daemon, extra_args=NO_ZERO_COPY)
    exported = oci_client.request(f"{off.url}/status.json").json()["bytes_path"]
    assert exported.startswith("export: every image is exported"), exported
    assert _doctor(daemon, tmp_path / "doctor-cache", *NO_ZERO_COPY)[0] == exported
