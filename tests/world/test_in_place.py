"""Docker's classic store served in place, on Docker 20.10, 26.1 and 28.5, and Podman's storage: layers put
together from their tar-split records and files, no `docker save` (the daemon's event stream shows none),
nothing copied into the cache dir, and the digests the export path and `docker save` give.

The awkward image is made of layer tars written here and loaded with `docker load`: Docker keeps those very
tars' records, so every layer served must hash to the tar written (its diff ID)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from k3d_registry_dockerd.sources.classic import chain_ids

from . import oci_client
from .cri import CriNode
from .daemons import (
    NO_ZERO_COPY,
    ROOTLESS_UID,
    Containerd,
    Dockerd,
    Podman,
    RegistryFactory,
    make_temp_dir,
    remove_tree,
    require_binary,
    run,
    wait_until,
)
from .images import BUSYBOX, MiB, build_image, build_with_podman, host_platform
from .test_mirror import ctr_ok, exports, node_digest, node_name, served_blobs

CLASSIC = ["docker20", "docker26", "docker28"]
# A file capability (cap_net_raw, effective) as `setcap` stores it: security.capability, VFS revision 2.
CAPABILITY = "\x01\x00\x00\x02\x00\x20\x00\x00" + "\x00" * 12


@pytest.fixture(params=CLASSIC)
def classic(request: pytest.FixtureRequest) -> Dockerd:
    daemon: Dockerd = request.getfixturevalue(request.param)
    return daemon


def _entry(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime, info.mode = kind, size, 1_700_000_000, 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _layer(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for info, content in entries:
            tar.addfile(info, io.BytesIO(content) if content else None)
    return out.getvalue()


def awkward_layers() -> list[bytes]:
    """Layers with what real images hold: nested and empty files, a hardlink, symlinks, a file capability
    (xattr), a name over 100 bytes and one that is not UTF-8, a big file of zeros; a layer removing a file
    (whiteout) and replacing a directory (opaque); an empty layer; and the first layer again."""
    zeros = bytes(3 * MiB)
    first = _layer(
        [
            (_entry("etc/", tarfile.DIRTYPE, mode=0o755), b""),
            (_entry("etc/hostname", size=6), b"alpha\n"),
            (_entry("etc/gone", size=5), b"gone\n"),
            (_entry("etc/empty"), b""),
            (_entry("etc/linked", tarfile.LNKTYPE, linkname="etc/hostname"), b""),
            (_entry("etc/relative", tarfile.SYMTYPE, linkname="hostname"), b""),
            (_entry("etc/absolute", tarfile.SYMTYPE, linkname="/etc/hostname"), b""),
            (_entry("var/", tarfile.DIRTYPE, mode=0o755), b""),
            (_entry("var/old", size=4), b"old\n"),
            (
                _entry("bin/", tarfile.DIRTYPE, mode=0o755),
                b"",
            ),
            (
                _entry(
                    "bin/ping",
                    size=5,
                    mode=0o755,
                    pax_headers={"SCHILY.xattr.security.capability": CAPABILITY},
                ),
                b"ping\n",
            ),
            (_entry("deep/", tarfile.DIRTYPE, mode=0o755), b""),
            (_entry("deep/" + "n" * 120 + "/", tarfile.DIRTYPE, mode=0o755), b""),
            (_entry("deep/" + "n" * 120 + "/file.txt", size=5), b"long\n"),
            (_entry("caf\udce9/", tarfile.DIRTYPE, mode=0o755), b""),
            (_entry("caf\udce9/menu", size=5), b"menu\n"),
            (_entry("data/", tarfile.DIRTYPE, mode=0o755), b""),
            (_entry("data/zeros.bin", size=len(zeros)), zeros),
        ]
    )
    second = _layer(
        [
            (_entry("etc/", tarfile.DIRTYPE, mode=0o755), b""),
            (_entry("etc/.wh.gone"), b""),
            (_entry("var/", tarfile.DIRTYPE, mode=0o755), b""),
            (_entry("var/.wh..wh..opq"), b""),
            (_entry("var/new", size=4), b"new\n"),
        ]
    )
    empty = _layer([])
    return [first, second, empty, first]


def load_awkward_image(docker: Dockerd, ref: str) -> list[str]:
    """`docker load` of an image made of `awkward_layers()`; returns their diff IDs, in order."""
    layers = awkward_layers()
    diff_ids = [f"sha256:{hashlib.sha256(layer).hexdigest()}" for layer in layers]
    os_name, _, arch = host_platform().partition("/")
    config = json.dumps(
        {
            "architecture": arch,
            "os": os_name,
            "config": {"Cmd": ["/bin/ping"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
        }
    ).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        names = []
        for number, layer in enumerate(layers):
            names.append(f"layer{number}/layer.tar")
            info = tarfile.TarInfo(names[-1])
            info.size = len(layer)
            tar.addfile(info, io.BytesIO(layer))
        for name, data in (
            (config_name, config),
            (
                "manifest.json",
                json.dumps([{"Config": config_name, "RepoTags": [ref], "Layers": names}]).encode(),
            ),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context = make_temp_dir("awkward")
    try:
        archive = context / "image.tar"
        archive.write_bytes(out.getvalue())
        docker.docker("load", "-i", str(archive))
    finally:
        remove_tree(context)
    return diff_ids


def cache_blobs(cache_dir: Path) -> list[Path]:
    return [path for path in (cache_dir / "blobs").rglob("*") if path.is_file()]


def saved_manifest_digest(docker: Dockerd, ref: str) -> str:
    """The manifest digest `docker save` (Docker >= 25) writes for the image into its index.json."""
    context = make_temp_dir("save")
    try:
        docker.docker("save", "-o", str(context / "save.tar"), ref)
        with tarfile.open(context / "save.tar") as tar:
            member = tar.extractfile("index.json")
            assert member is not None
            return str(json.load(member)["manifests"][0]["digest"])
    finally:
        remove_tree(context)


def test_every_kind_of_entry_is_served_byte_for_byte_in_place(
    classic: Dockerd, node: Containerd, registry_under_test: RegistryFactory
) -> None:
    docker = classic
    diff_ids = load_awkward_image(docker, "awkward:1")
    since = time.time()
    registry = registry_under_test(docker)
    assert "serving Docker's classic store in place" in registry.log_text()
    node.set_mirror(registry.addr)
    ctr_ok(node, "docker.io/library/awkward:1")
    pulled = oci_client.pull(registry.url, "library/awkward", "1", ns="docker.io")
    assert [layer["digest"] for layer in pulled.manifest["layers"]] == diff_ids
    assert pulled.manifest["config"]["digest"] == docker.image_id("awkward:1")
    # The node's bytes came from the registry (it has no other way to this image), none from an export.
    assert set(diff_ids) <= served_blobs(registry)
    assert docker.image_saves(since) == [] and exports(registry) == 0
    assert cache_blobs(registry.cache_dir) == []
    status = oci_client.request(f"{registry.url}/status.json").json()["docker"]
    assert status["zero_copy"].startswith("in place from Docker's classic store at ")

    # The same digests as the export path, and as `docker save` (Docker >= 25, which writes a manifest).
    exported = registry_under_test(docker, extra_args=NO_ZERO_COPY)
    again = oci_client.pull(exported.url, "library/awkward", "1", ns="docker.io")
    assert again.digest == pulled.digest == node_digest(node, "docker.io/library/awkward:1")
    if docker.name != "docker20":
        assert saved_manifest_digest(docker, "awkward:1") == pulled.digest


def test_ten_concurrent_cold_pulls_of_one_image_cost_nothing_extra(
    docker26: Dockerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker26, "crowd:1", layers=3, size=24 * MiB, seed="crowd")
    since = time.time()
    registry = registry_under_test(docker26)
    results: list[oci_client.Pulled | BaseException] = []

    def pull() -> None:
        try:
            results.append(oci_client.pull(registry.url, "library/crowd", "1", ns="docker.io"))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert all(isinstance(result, oci_client.Pulled) for result in results), results
    assert len({result.digest for result in results if isinstance(result, oci_client.Pulled)}) == 1
    assert docker26.image_saves(since) == [] and cache_blobs(registry.cache_dir) == []


def _layer_dir_file(docker: Dockerd, ref: str, layer: int, name: str) -> Path:
    """A file (``name`` under the image's root) of one of its layers in Docker's diff directories, found
    through its layer record."""
    chain = list(chain_ids(docker.layers(ref)))[layer]
    record = docker.data_root / "image" / "overlay2" / "layerdb" / "sha256" / chain.removeprefix("sha256:")
    cache_id = (record / "cache-id").read_text().strip()
    path = docker.data_root / "overlay2" / cache_id / "diff" / name
    assert path.is_file(), path
    return path


def test_a_sparse_file_is_served_as_the_zeros_its_layer_holds(
    docker26: Dockerd, registry_under_test: RegistryFactory
) -> None:
    # Docker writes every byte of a layer's files; a data root copied with `cp --sparse=always` or
    # `rsync -S` keeps runs of zeros as holes, which read as zeros.
    diff_ids = load_awkward_image(docker26, "sparse:1")
    for layer in (0, -1):
        zeros = _layer_dir_file(docker26, "sparse:1", layer, "data/zeros.bin")
        run([require_binary("fallocate"), "--dig-holes", str(zeros)])
        assert zeros.stat().st_blocks * 512 < zeros.stat().st_size // 2, "no hole dug"
    since = time.time()
    registry = registry_under_test(docker26)
    pulled = oci_client.pull(registry.url, "library/sparse", "1", ns="docker.io")
    assert [layer["digest"] for layer in pulled.manifest["layers"]] == diff_ids
    assert docker26.image_saves(since) == [] and cache_blobs(registry.cache_dir) == []


@pytest.fixture
def victim(docker26: Dockerd) -> Iterator[tuple[Dockerd, str]]:
    ref = f"victim-{time.monotonic_ns()}:1"
    build_image(docker26, ref, layers=2, size=4 * MiB, seed=ref, busybox=False)
    yield docker26, ref
    docker26.docker("rmi", "-f", ref, check=False)


def test_a_file_changed_on_disk_cuts_the_answer_and_the_next_pull_is_exported(
    victim: tuple[Dockerd, str], registry_under_test: RegistryFactory
) -> None:
    docker, ref = victim
    name = ref.partition(":")[0]
    registry = registry_under_test(docker)
    layer = docker.layers(ref)[-1]
    path = _layer_dir_file(docker, ref, -1, "data/layer-001.bin")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    manifest = oci_client.request(
        f"{registry.url}/v2/library/{name}/manifests/1?ns=docker.io",
        headers={"Accept": oci_client.MANIFEST_ACCEPT},
    )
    assert manifest.status == 200
    with pytest.raises(Exception):  # noqa: B017 - the connection is cut before the last bytes
        oci_client.request(f"{registry.url}/v2/library/{name}/blobs/{layer}?ns=docker.io")
    assert f"layer {layer} of" in registry.log_text() and "does not hash to its digest" in registry.log_text()
    # The image goes to the export path from now on; Docker's own save checks its layers against the same
    # records and fails for this one (so its event stream shows no completed save).
    oci_client.request(
        f"{registry.url}/v2/library/{name}/manifests/1?ns=docker.io",
        headers={"Accept": oci_client.MANIFEST_ACCEPT},
    )
    assert exports(registry) == 1
    assert f"exporting docker.io/library/{name}:1 from Docker" in registry.log_text()


def test_files_that_cannot_be_read_here_take_the_export_path_with_the_reason_logged(
    victim: tuple[Dockerd, str], registry_under_test: RegistryFactory
) -> None:
    docker, ref = victim
    name = ref.partition(":")[0]
    # As root every mode is readable: a file turned into a symlink cannot be read beneath its layer.
    path = _layer_dir_file(docker, ref, 0, "data/layer-000.bin")
    moved = path.with_name("moved.bin")
    path.rename(moved)
    path.symlink_to(moved)
    since = time.time()
    registry = registry_under_test(docker)
    pulled = oci_client.pull(registry.url, f"library/{name}", "1", ns="docker.io")
    assert pulled.manifest["config"]["digest"] == docker.image_id(ref)
    assert docker.image_saves(since) != []
    assert "not served in place, exported from the daemon instead" in registry.log_text()
    assert "lies behind a symlink" in registry.log_text()


def test_an_image_removed_while_it_is_pulled_fails_that_answer_and_is_resolved_again(
    victim: tuple[Dockerd, str], registry_under_test: RegistryFactory
) -> None:
    docker, ref = victim
    name = ref.partition(":")[0]
    registry = registry_under_test(docker)
    url = f"{registry.url}/v2/library/{name}/manifests/1?ns=docker.io"
    assert oci_client.request(url, headers={"Accept": oci_client.MANIFEST_ACCEPT}).status == 200
    layer = docker.layers(ref)[-1]
    docker.docker("rmi", "-f", ref)
    with pytest.raises(Exception):  # noqa: B017 - the files are gone: the answer fails
        response = oci_client.request(f"{registry.url}/v2/library/{name}/blobs/{layer}?ns=docker.io")
        assert response.status == 200
        raise AssertionError("a blob of a removed image was served")
    # Docker has no such image any more, and says so; nothing stale is served.
    assert oci_client.request(url, headers={"Accept": oci_client.MANIFEST_ACCEPT}).status in (404, 502)


def test_podman_s_storage_is_served_in_place_and_short_names_find_localhost_images(
    podman: Podman, node: Containerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    build_with_podman(podman, "pm-inplace:1", tmp_path / "context", seed="pm-inplace", size=6 * MiB)
    since = time.time()
    registry = registry_under_test(podman.host)
    assert "serving Podman's storage in place" in registry.log_text()
    node.set_mirror(registry.addr)
    # `podman build -t pm-inplace:1` made localhost/pm-inplace:1; a pod asks for docker.io's name. Docker
    # Hub is unreachable here: a pull that works came through the registry.
    ctr_ok(node, "docker.io/library/pm-inplace:1")
    ctr_ok(node, "localhost/pm-inplace:1")
    pulled = oci_client.pull(registry.url, "library/pm-inplace", "1", ns="docker.io")
    assert {layer["digest"] for layer in pulled.manifest["layers"]} <= served_blobs(registry)
    assert "serving its localhost/pm-inplace:1, as `podman run` would" in registry.log_text()
    assert podman.image_saves(since) == [] and exports(registry) == 0
    assert cache_blobs(registry.cache_dir) == []
    # The same image, by the same digests, as the export path serves it.
    exported = registry_under_test(podman.host, extra_args=NO_ZERO_COPY)
    again = oci_client.pull(exported.url, "pm-inplace", "1", ns="localhost")
    assert again.digest == pulled.digest == node_digest(node, "localhost/pm-inplace:1")
    # Podman's save event can come after the registry has read the whole stream (seen once under load).
    wait_until(lambda: podman.image_saves(since) != [], timeout=30, what="Podman's save event")


def test_rootless_podman_s_storage_is_served_in_place_to_its_user(
    podman5_rootless: Podman, node: Containerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    podman = podman5_rootless
    build_with_podman(podman, "localhost/rl-open:1", tmp_path / "open", seed="rl-open", size=4 * MiB)
    # A file of another owner than the image's root lies on disk under a subordinate ID of the user; kept
    # private (0600), its user cannot read it outside Podman's user namespace.
    closed = tmp_path / "closed"
    closed.mkdir()
    shutil.copy(BUSYBOX, closed / "busybox")
    (closed / "secret").write_bytes(b"only uid 1234 reads this\n")
    (closed / "Dockerfile").write_text(
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY --chown=1234:1234 --chmod=0600 secret /secret\n"
    )
    podman.build("localhost/rl-closed:1", closed)
    since = time.time()
    # The registry runs as the user rootless Podman runs as, as its user would start it.
    registry = registry_under_test(podman.host, user=ROOTLESS_UID)
    assert "serving Podman's storage in place" in registry.log_text()
    node.set_mirror(registry.addr)
    ctr_ok(node, "localhost/rl-open:1")
    pulled = oci_client.pull(registry.url, "rl-open", "1", ns="localhost")
    assert {layer["digest"] for layer in pulled.manifest["layers"]} <= served_blobs(registry)
    assert podman.image_saves(since) == [] and cache_blobs(registry.cache_dir) == []

    ctr_ok(node, "localhost/rl-closed:1")
    assert "not served in place, exported from the daemon instead" in registry.log_text()
    assert "Permission denied" in registry.log_text()
    # Podman's save event can come after the registry has read the whole stream (seen once under load).
    wait_until(lambda: podman.image_saves(since) != [], timeout=30, what="Podman's save event")


@pytest.mark.parametrize("store", ["docker20", "podman4", "podman5"])
def test_kubelet_pulls_in_place_with_no_save(
    store: str,
    cri_node: CriNode,
    registry_under_test: RegistryFactory,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """kubelet's path (CRI PullImage) on the stores test_cri.py does not run: Docker 20.10's classic store and
    Podman's storage, served in place."""
    daemon: Dockerd | Podman = request.getfixturevalue(store)
    name = f"cri-in-place-{store}-{node_name(cri_node)}"
    if isinstance(daemon, Podman):
        build_with_podman(daemon, f"localhost/{name}:1", tmp_path / "context", seed=name, size=3 * MiB)
        ref, repository, ns = f"localhost/{name}:1", name, "localhost"
    else:
        build_image(daemon, f"{name}:1", layers=2, size=3 * MiB, seed=name)
        ref, repository, ns = f"docker.io/library/{name}:1", f"library/{name}", "docker.io"
    since = time.time()
    registry = registry_under_test(daemon.host)
    cri_node.set_mirror(registry.addr)
    image_ref = cri_node.pull_image(ref)
    pulled = oci_client.pull(registry.url, repository, "1", ns=ns)
    assert image_ref == next(iter(pulled.blobs))
    # Nowhere else to get it from: every blob reached the node from the registry, none out of an export.
    assert set(pulled.blobs) <= served_blobs(registry)
    assert daemon.image_saves(since) == [] and exports(registry) == 0
    assert cache_blobs(registry.cache_dir) == []
