"""Zero-copy on Docker 28.5 with the containerd image store (a fresh Docker 29's default): images served
from containerd's content store as they are. Docker's event stream proves no `docker save` ran; images only
dockerd has (docker.io is unreachable here) or the registry's access log prove the node's bytes came
through the registry."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import oci_client
from .daemons import DOCKER28_USR, Containerd, Dockerd, RegistryFactory, UpstreamRegistry, make_temp_dir
from .images import MiB, MultiPlatformImage, build_image, inspect_raw, push_multiplatform, seeded_bytes
from .test_mirror import ACCEPT, ctr_ok, exports, node_digest, served_blobs

CTR = DOCKER28_USR / "bin" / "ctr"


def content_file(docker: Dockerd, digest: str) -> Path:
    return (
        docker.data_root / "containerd" / "daemon" / "io.containerd.content.v1.content" / "blobs" / "sha256"
        / digest.removeprefix("sha256:")
    )  # fmt: skip


def docker_ctr(docker: Dockerd, *args: str) -> subprocess.CompletedProcess[str]:
    """`ctr` against Docker's own containerd, in Docker's namespace."""
    argv = [str(CTR), "--address", str(docker.containerd_socket), "-n", "moby", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)


def build_with_buildkit(docker: Dockerd, ref: str, *, seed: str, size: int) -> None:
    context = make_temp_dir("bk")
    (context / "data").write_bytes(seeded_bytes(seed, size))
    (context / "Dockerfile").write_text("FROM scratch\nCOPY data /data\n")
    docker.docker("build", "-q", "-t", ref, str(context), env={"DOCKER_BUILDKIT": "1"}, timeout=600)


def test_a_local_image_is_served_from_containerd_without_an_export(
    docker28_containerd: Dockerd, node: Containerd, registry_under_test: RegistryFactory
) -> None:
    docker = docker28_containerd
    build_image(docker, "zc-legacy:1", layers=3, size=6 * MiB, seed="zc-legacy")
    build_with_buildkit(docker, "zc-buildkit:1", seed="zc-buildkit", size=4 * MiB)
    since = time.time()
    registry = registry_under_test(docker)
    assert "zero-copy from containerd is on" in registry.log_text()
    node.set_mirror(registry.addr)

    for name in ("zc-legacy", "zc-buildkit"):
        ctr_ok(node, f"docker.io/library/{name}:1")
        pulled = oci_client.pull(registry.url, f"library/{name}", "1", ns="docker.io")
        # Docker's image ID on this store is the target's digest: served as it is, not regenerated.
        assert node_digest(node, f"docker.io/library/{name}:1") == docker.image_id(f"{name}:1")
        # BuildKit's image is an index (its manifest and an attestation): `blobs` are the platform's.
        assert set(pulled.blobs) <= served_blobs(registry) | served_blobs(registry, "Python-urllib")
        assert set(pulled.blobs) & served_blobs(registry)
    assert docker.image_saves(since) == []
    assert exports(registry) == 0
    # Nothing was copied into the cache.
    assert not any(path.is_file() for path in (registry.cache_dir / "blobs").rglob("*"))
    state = oci_client.request(f"{registry.url}/status.json").json()["docker"]
    assert state["zero_copy"].startswith("zero-copy from containerd at ")


def test_docker_26_reports_no_containerd_so_it_is_given(
    docker26_containerd: Dockerd, node: Containerd, registry_under_test: RegistryFactory
) -> None:
    """Engine API 1.45 does not say where its containerd is: without the address the export path serves
    (logged), with `--containerd-address` containerd 1.7's API serves it as on Docker 28."""
    docker = docker26_containerd
    build_image(docker, "zc-26:1", layers=2, size=2 * MiB, seed="zc-26")
    plain = registry_under_test(docker)
    assert "zero-copy from containerd is off: no socket at" in plain.log_text()
    since = time.time()
    registry = registry_under_test(docker, extra_args=["--containerd-address", str(docker.containerd_socket)])
    assert "zero-copy from containerd is on: containerd 1.7" in registry.log_text()
    node.set_mirror(registry.addr)
    ctr_ok(node, "docker.io/library/zc-26:1")
    assert node_digest(node, "docker.io/library/zc-26:1") == docker.image_id("zc-26:1")
    assert docker.image_saves(since) == []


def test_pull_through_an_index_byte_for_byte_and_digest_pinned(
    docker28_containerd: Dockerd,
    upstream: UpstreamRegistry,
    node: Containerd,
    registry_under_test: RegistryFactory,
) -> None:
    docker = docker28_containerd
    multi = push_multiplatform(upstream, "zc/multi", "1", seed="zc-multi", layer_size=2 * MiB)
    pinned = push_multiplatform(upstream, "zc/pinned", "1", seed="zc-pinned")
    since, mark = time.time(), upstream.log_mark()
    registry = registry_under_test(docker)
    node.set_mirror(registry.addr)

    ctr_ok(node, f"{upstream.addr}/zc/multi:1")
    assert node_digest(node, f"{upstream.addr}/zc/multi:1") == multi.index_digest
    served = oci_client.request(f"{registry.url}/v2/zc/multi/manifests/1?ns={upstream.addr}", headers=ACCEPT)
    assert served.body == inspect_raw(f"{upstream.addr}/zc/multi:1")  # the upstream's bytes
    assert set(multi.manifests["linux/amd64"].layer_digests) <= served_blobs(registry)

    # Pinned to a digest Docker does not have yet: pulled through Docker by digest, then served.
    ctr_ok(node, pinned.digest_ref)
    assert set(pinned.manifests["linux/amd64"].layer_digests) <= served_blobs(registry)

    # dockerd pulled (it lists both now); the node went to the upstream only for what Docker does not
    # hold: other platforms' manifests and configs of the index, which containerd 2 reads too.
    assert docker.image_id(f"{upstream.addr}/zc/multi:1") == multi.index_digest
    ours = {"/manifests/1 ", multi.index_digest, *(d for m in (multi, pinned) for d in _host_digests(m))}
    bypassed = [line for line in upstream.log_text()[mark:].splitlines() if "containerd/" in line]
    assert [line for line in bypassed if any(digest in line for digest in ours)] == []
    assert docker.image_saves(since) == []


def _host_digests(image: MultiPlatformImage) -> list[str]:
    amd64 = image.manifests["linux/amd64"]
    return [amd64.digest, amd64.config_digest, *amd64.layer_digests]


def test_a_corrupted_blob_is_never_served_whole(
    docker28_containerd: Dockerd, registry_under_test: RegistryFactory
) -> None:
    docker = docker28_containerd
    build_image(docker, "zc-rot:1", layers=1, size=2 * MiB, seed="zc-rot")
    registry = registry_under_test(docker)
    manifest = oci_client.request(f"{registry.url}/v2/zc-rot/manifests/1", headers=ACCEPT).json()
    layer = manifest["layers"][-1]["digest"]
    path = content_file(docker, layer)
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    try:
        path.write_bytes(bytes(damaged))
        with pytest.raises(Exception, match=r"(?i)incomplete|closed|broken|reset|remote end"):
            oci_client.request(f"{registry.url}/v2/zc-rot/blobs/{layer}")
        assert "does not match its digest" in registry.log_text()
    finally:
        path.write_bytes(original)
    whole = oci_client.request(f"{registry.url}/v2/zc-rot/blobs/{layer}")
    assert whole.status == 200 and hashlib.sha256(whole.body).hexdigest() == layer.removeprefix("sha256:")


def test_a_blob_removed_from_containerd_underneath(
    docker28_containerd: Dockerd, registry_under_test: RegistryFactory
) -> None:
    docker = docker28_containerd
    build_image(docker, "zc-gone:1", layers=2, size=2 * MiB, seed="zc-gone")
    registry = registry_under_test(docker)
    pulled = oci_client.pull(registry.url, "zc-gone", "1")
    layer = pulled.manifest["layers"][-1]["digest"]
    # What containerd's garbage collector does to a blob nothing references: the record, then the file.
    docker_ctr(docker, "content", "rm", layer)
    content_file(docker, layer).unlink(missing_ok=True)
    gone = oci_client.request(f"{registry.url}/v2/zc-gone/blobs/{layer}")
    assert gone.status == 404
    assert "gone from containerd's content store" in registry.log_text()
    # The next tag request resolves again: the image is incomplete in containerd now, so it is exported,
    # or, when Docker cannot produce the blob either, answered 404 so the client falls back.
    since = time.time()
    again = oci_client.request(f"{registry.url}/v2/zc-gone/manifests/1", headers=ACCEPT)
    assert "lacks blobs of it" in registry.log_text()
    assert len(docker.image_saves(since)) == 1
    assert again.status in (200, 404), again.body


def test_containerd_unreachable_means_the_export_path_with_a_reason(
    docker28_containerd: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    docker = docker28_containerd
    build_image(docker, "zc-off:1", layers=1, size=1 * MiB, seed="zc-off")
    since = time.time()
    registry = registry_under_test(docker, extra_args=["--containerd-address", str(tmp_path / "none.sock")])
    pulled = oci_client.pull(registry.url, "zc-off", "1")
    assert pulled.digest == docker.image_id("zc-off:1")
    log = registry.log_text()
    assert re.search(r"zero-copy from containerd is off: .*none\.sock.*; images are exported", log), log
    assert len(docker.image_saves(since)) == 1


def test_restart_and_docker_down(
    docker28_containerd: Dockerd, node: Containerd, registry_under_test: RegistryFactory
) -> None:
    docker = docker28_containerd
    build_image(docker, "zc-restart:1", layers=2, size=3 * MiB, seed="zc-restart")
    since = time.time()
    registry = registry_under_test(docker)
    first = oci_client.pull(registry.url, "zc-restart", "1")
    registry.stop()
    registry.start()
    node.set_mirror(registry.addr)
    ctr_ok(node, "docker.io/library/zc-restart:1")
    assert node_digest(node, "docker.io/library/zc-restart:1") == first.digest

    # dockerd dies, its containerd lives on (as the system containerd does when Docker 29 stops): the
    # image records are read from containerd directly, as Docker last described where it is, across a
    # restart of the registry too.
    docker.kill()
    try:
        again = oci_client.pull(registry.url, "zc-restart", "1")
        assert again.digest == first.digest
        assert registry.log_text().count("serving from containerd's content store while Docker is down") == 1
        registry.stop()
        registry.start()
        assert oci_client.pull(registry.url, "zc-restart", first.digest).blobs == again.blobs
        assert oci_client.pull(registry.url, "zc-restart", "1").digest == first.digest
        state = oci_client.request(f"{registry.url}/status.json").json()["docker"]
        assert state["serving"] == "serving from containerd's content store while Docker is down"
    finally:
        docker.start()
    assert docker.image_saves(since) == []


def test_doctor_says_zero_copy_is_on(docker28_containerd: Dockerd, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(DOCKER_HOST=docker28_containerd.host, PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    result = subprocess.run(
        [sys.executable, "-m", "k3d_registry_dockerd", "doctor", "--cache-dir", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "zero-copy from containerd: on" in result.stdout, result.stdout
    assert str(docker28_containerd.containerd_socket) in result.stdout
