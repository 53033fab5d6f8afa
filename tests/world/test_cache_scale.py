"""The export cache's bookkeeping against Docker 26's real `docker save` (an OCI layout with the legacy
files beside it): an export stores only what its manifest uses, the totals the size limit and the
status page go by match the cache dir, after an eviction and after a crash, and the status page lists the
images a page at a time."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
import urllib.parse
from pathlib import Path

from . import oci_client
from .daemons import NO_ZERO_COPY, Dockerd, RegistryFactory, RegistryProcess
from .images import build_image, seeded_bytes

UNUSED = "stored but nothing uses"
EXPORTED = re.compile(r"exported (\S+) in [0-9.]+s: oci layout, (\d+) new blobs")


def stored(registry: RegistryProcess) -> dict[str, int]:
    blobs = registry.cache_dir / "blobs" / "sha256"
    return {f"sha256:{p.name}": p.stat().st_size for p in blobs.rglob("*") if p.is_file()}


def referenced(registry: RegistryProcess) -> set[str]:
    found: set[str] = set()
    for path in (registry.cache_dir / "repositories").glob("*.json"):
        record = json.loads(path.read_bytes())
        found |= set(record["manifests"]) | set(record["blobs"])
        for entry in record["manifests"].values():
            found |= set(entry["references"])
    return found


def status(registry: RegistryProcess) -> dict:
    response = oci_client.request(f"{registry.url}/status.json")
    assert response.status == 200
    return response.json()


def assert_consistent(registry: RegistryProcess) -> None:
    """Every blob hashes to its name, every referenced one is there, and status.json's total is the dir's."""
    blobs = stored(registry)
    for digest in blobs:
        path = registry.cache_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
        assert f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}" == digest
    assert referenced(registry) <= set(blobs)
    cache = status(registry)["cache"]
    assert (cache["bytes"], cache["blobs"]) == (sum(blobs.values()), len(blobs))


def test_an_export_of_a_small_image_stores_only_what_its_manifest_uses(
    docker26: Dockerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker26, "scale-small:1", layers=2, size=8192, seed="scale-small")
    registry = registry_under_test(docker26, extra_args=NO_ZERO_COPY)
    pulled = oci_client.pull(registry.url, "scale-small", "1")
    log = registry.log_text()
    assert UNUSED not in log
    (match,) = EXPORTED.finditer(log)
    # Manifest, config and the three layers (busybox and two data layers): Docker's save stream has three
    # more blobs (the legacy per-layer metadata), which are neither written nor removed.
    assert int(match.group(2)) == 1 + len(pulled.blobs) == 5
    assert set(stored(registry)) == referenced(registry) == {pulled.digest, *pulled.blobs}
    assert_consistent(registry)


def test_eviction_of_half_the_cache_keeps_the_totals_right_across_a_crash(
    docker26: Dockerd, registry_under_test: RegistryFactory
) -> None:
    names = [f"scale-evict-{i}" for i in range(7)]
    for name in names:
        build_image(docker26, f"{name}:1", layers=1, size=64 << 10, seed=name, busybox=False)
    registry = registry_under_test(docker26, extra_args=(*NO_ZERO_COPY, "--cache-max-size", "1GiB"))
    for name in names[:6]:
        oci_client.pull(registry.url, name, "1")
    assert_consistent(registry)
    assert status(registry)["image_count"] == 6
    full = sum(stored(registry).values())

    registry.stop()
    registry.extra_args = (*NO_ZERO_COPY, "--cache-max-size", str(full // 2))
    registry.start()
    oci_client.pull(registry.url, names[6], "1")
    evicted = re.findall(r"evicted docker\.io/library/(scale-evict-\d) ", registry.log_text())
    assert evicted == names[: len(evicted)] and 3 <= len(evicted) < 6
    assert sum(stored(registry).values()) <= full // 2
    assert_consistent(registry)

    registry.kill()
    registry.start()
    assert_consistent(registry)
    assert status(registry)["image_count"] == 7 - len(evicted)
    since = len(registry.log_text())
    for name in names[len(evicted) :]:
        oci_client.pull(registry.url, name, "1")
    assert "exporting" not in registry.log_text()[since:]  # what was kept is served as it was
    oci_client.pull(registry.url, names[0], "1")  # what was evicted is exported again
    assert_consistent(registry)


def import_tiny_image(daemon: Dockerd, name: str) -> None:
    """`docker import` of a tar holding one small file of its own: a distinct one-layer image, quickly."""
    data = seeded_bytes(name, 1024)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("data.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    query = urllib.parse.urlencode({"fromSrc": "-", "repo": name, "tag": "1"})
    status_code, body = daemon.api("POST", f"/images/create?{query}", body=buffer.getvalue())
    assert status_code == 200, body


def test_the_status_page_lists_a_large_cache_a_page_at_a_time(
    chromium: str, docker26: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    names = [f"scale-page-{i:02d}" for i in range(53)]
    for name in names:
        import_tiny_image(docker26, name)
    registry = registry_under_test(docker26, extra_args=NO_ZERO_COPY)
    for name in names:
        oci_client.pull(registry.url, name, "1")
    first = status(registry)
    assert (first["image_count"], first["pushed_count"]) == (53, 0)
    assert first["images_page"] == {"page": 1, "pages": 2, "per_page": 50}
    # Most recently used first: the last pulled leads page 1, the first pulled is on page 2.
    assert first["images"][0]["repository"] == f"docker.io/library/{names[-1]}"
    second = oci_client.request(f"{registry.url}/status.json?page=2").json()
    assert [i["repository"] for i in second["images"]] == [f"docker.io/library/{n}" for n in names[2::-1]]
    assert oci_client.request(f"{registry.url}/status.json?page=x").status == 400
    dom = subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000", "--dump-dom", f"{registry.url}/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout  # fmt: skip
    assert '<div class="value" id="count">53</div>' in dom
    assert "page 1 of 2, most recently used first (3 more)" in dom
    assert dom.count('<span class="badge docker">from Docker</span>') == 50
