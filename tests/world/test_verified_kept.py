"""Verified once, not once per start: on Docker 26's classic store, Docker 28.5's containerd image store
(zero-copy) and Podman 4.3 and 5.4, a fresh registry verifies the images the store took in last without a
pull, a restart on the same cache dir hashes none of them again (the registry's debug log names every blob
it hashes), the cache dir holds no byte of them, and a layer whose files changed is hashed again."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from k3d_registry_dockerd.cache.verified import FILE, HEADER, MARGIN_NS
from k3d_registry_dockerd.sources.classic import chain_ids

from . import oci_client
from .daemons import Dockerd, Podman, RegistryFactory, RegistryProcess, wait_until
from .images import MiB, build_image, build_with_podman
from .test_mirror import exports
from .test_zero_copy import build_with_buildkit, content_file

STORES = ["docker26", "docker28_containerd", "podman4", "podman5"]


@dataclass
class Built:
    """An image just built in the daemon's store."""

    daemon: Dockerd | Podman
    # As the registry's log names it (the daemon's first tag of it), and as a client pulls it.
    ref: str
    repository: str
    ns: str

    def layer_file(self, layer: str) -> Path:
        """A file holding (part of) the layer's bytes in the daemon's store."""
        if isinstance(self.daemon, Podman):
            store = self.daemon.root / "store"
            layers = json.loads((store / "overlay-layers" / "layers.json").read_text())
            layer_id = next(entry["id"] for entry in layers if entry.get("diff-digest") == layer)
            return store / "overlay" / layer_id / "diff" / "data"
        if self.daemon.variant.containerd_store:
            return content_file(self.daemon, layer)
        diff_ids = self.daemon.layers(self.ref)
        chain = list(chain_ids(diff_ids))[diff_ids.index(layer)]
        record = self.daemon.data_root / "image" / "overlay2" / "layerdb" / "sha256" / chain[7:]
        cache_id = (record / "cache-id").read_text().strip()
        return next(path for path in (self.daemon.data_root / "overlay2" / cache_id / "diff").rglob("*.bin"))

    def remove(self) -> None:
        """Out of the store: a registry started later on this daemon would find its damaged layer."""
        if isinstance(self.daemon, Podman):
            self.daemon.podman("rmi", "-f", self.ref)
        else:
            self.daemon.docker("rmi", "-f", self.ref, check=False)


def build(store: str, request: pytest.FixtureRequest, tmp_path: Path) -> Built:
    daemon: Dockerd | Podman = request.getfixturevalue(store)
    name = f"kept-{store}-{time.monotonic_ns()}"
    if isinstance(daemon, Podman):
        build_with_podman(daemon, f"localhost/{name}:1", tmp_path / "context", seed=name, size=3 * MiB)
        return Built(daemon, f"localhost/{name}:1", name, "localhost")
    if daemon.variant.containerd_store:
        # BuildKit writes the layer's compressed blob into containerd's content store.
        build_with_buildkit(daemon, f"{name}:1", seed=name, size=3 * MiB)
    else:
        build_image(daemon, f"{name}:1", layers=2, size=3 * MiB, seed=name, busybox=False)
    return Built(daemon, f"{name}:1", f"library/{name}", "docker.io")


def settled() -> None:
    """Waits until what was just written is older than the margin, as an image built a while before a
    registry starts is: a match of files changed within it is not kept across a restart (racy)."""
    time.sleep(MARGIN_NS / 1e9 + 0.1)


def hashed(registry: RegistryProcess, since: int) -> set[str]:
    """Digests of the blobs the registry hashed where they lie since that point of its log."""
    return set(re.findall(r"hashed (sha256:[0-9a-f]{64}) where it lies", registry.log_text()[since:]))


def verified_ahead(registry: RegistryProcess, since: int, ref: str) -> bool:
    """Whether verification ahead hashed blobs of the image since that point of its log."""
    return f"blobs of {ref} where they lie, ahead" in registry.log_text()[since:]


def found_verified(registry: RegistryProcess, since: int, ref: str) -> bool:
    """Whether verification ahead found nothing of the image to hash since that point of its log."""
    return f"verifying {ref} ahead: nothing to hash" in registry.log_text()[since:]


def restart(registry: RegistryProcess) -> int:
    """Stops and starts the registry on the same cache dir; the point of its log it started at."""
    registry.stop()
    since = len(registry.log_text())
    registry.start()
    return since


@pytest.fixture(params=STORES)
def image(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Built]:
    built = build(request.param, request, tmp_path)
    yield built
    built.remove()


def test_verified_once_not_once_per_start(image: Built, registry_under_test: RegistryFactory) -> None:
    settled()
    registry = registry_under_test(image.daemon if isinstance(image.daemon, Dockerd) else image.daemon.host)

    # A fresh registry verifies the images the store took in last, without a pull; the first pull then
    # hashes nothing.
    wait_until(lambda: verified_ahead(registry, 0, image.ref), timeout=120, what="verification at start")
    assert oci_client.metric(registry.url, "k3d_registry_blobs_verified_ahead_total") >= 1
    since = len(registry.log_text())
    pulled = oci_client.pull(registry.url, image.repository, "1", ns=image.ns)
    blobs = set(pulled.blobs)
    assert not hashed(registry, since) & blobs
    # Config first, the layers bottom up.
    last_layer = list(pulled.blobs)[-1]
    changed_file = image.layer_file(last_layer)
    assert changed_file.is_file(), changed_file

    # Restarted on the same cache dir: nothing of it is hashed again, at start or by the pull.
    since = restart(registry)
    assert "verified by an earlier run are taken as verified" in registry.log_text()[since:]
    wait_until(lambda: found_verified(registry, since, image.ref), timeout=120, what="verification at start")
    again = oci_client.pull(registry.url, image.repository, "1", ns=image.ns)
    assert again.digest == pulled.digest
    assert not hashed(registry, since) & blobs
    assert oci_client.metric(registry.url, "k3d_registry_blobs_verified_before_total") >= 1
    # The cache dir holds no byte of the image: the records are digests.
    assert not [path for path in (registry.cache_dir / "blobs").rglob("*") if path.is_file()]
    records = (registry.cache_dir / FILE).read_bytes()
    assert records.startswith(HEADER)
    assert all(
        re.fullmatch(rb"sha256:[0-9a-f]{64} sha256:[0-9a-f]{64}", line) for line in records.splitlines()[1:]
    )

    # A file of its last layer changes (touched, as root): at the next start that layer is hashed again,
    # and only that one.
    os.utime(changed_file)
    since = restart(registry)
    wait_until(lambda: last_layer in hashed(registry, since), timeout=120, what="the layer hashed again")
    assert f"hashed {last_layer} where it lies" in registry.log_text()[since:]
    assert hashed(registry, since) & blobs == {last_layer}
    assert oci_client.pull(registry.url, image.repository, "1", ns=image.ns).digest == pulled.digest

    if isinstance(image.daemon, Dockerd) and image.daemon.variant.containerd_store:
        return
    # Its bytes change (same size): hashed again at the next start, no match, and the image goes to the
    # export path as when a layer does not match on its first pull.
    data = bytearray(changed_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed_file.write_bytes(bytes(data))
    since = restart(registry)
    mismatch = f"layer {last_layer} of"
    wait_until(lambda: mismatch in registry.log_text()[since:], timeout=120, what="the mismatch found")
    assert "does not hash to its digest" in registry.log_text()[since:]
    before = exports(registry)
    oci_client.request(
        f"{registry.url}/v2/{image.repository}/manifests/1?ns={image.ns}",
        headers={"Accept": oci_client.MANIFEST_ACCEPT},
    )
    assert exports(registry) == before + 1
