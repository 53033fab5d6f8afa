"""Deterministic test images, built and pushed without any network access.

Docker images are ``FROM scratch`` with Debian's static busybox plus files of seeded random bytes
(incompressible, so layer sizes are real and gzip cannot hide bugs). The multi-platform image is an
OCI layout written by Python and pushed with skopeo, because the classic builder cannot make
indexes and buildx/QEMU are not available offline; so is a runnable single-platform image of any size
(write_image_layout), streamed to disk layer by layer, for push tests.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .daemons import (
    CommandError,
    Dockerd,
    Podman,
    UpstreamRegistry,
    make_temp_dir,
    remove_tree,
    require_binary,
    run,
)

MiB = 1024 * 1024
BUSYBOX = Path("/bin/busybox")
FIXED_MTIME = 1_700_000_000
"""File mtimes in build contexts: identical inputs give identical layer tars."""

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def seeded_bytes(seed: str, size: int) -> bytes:
    """``size`` pseudo-random (incompressible) bytes, the same for the same seed."""
    return random.Random(seed).randbytes(size)


def _write_seeded_file(path: Path, seed: str, size: int, chunk: int = 8 * MiB) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        remaining = size
        while remaining > 0:
            n = min(chunk, remaining)
            f.write(rng.randbytes(n))
            remaining -= n
    os.utime(path, (FIXED_MTIME, FIXED_MTIME))


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# --------------------------------------------------------------------------- docker build


@dataclass(frozen=True)
class BuiltImage:
    """An image built in one dockerd by build_image()."""

    ref: str
    image_id: str
    layer_seeds: tuple[str, ...]
    """Seed of each generated data layer, bottom to top."""
    layer_sizes: tuple[int, ...]
    busybox: bool
    small_files: int = 0

    @property
    def layer_count(self) -> int:
        """Layers in the image: the data layers plus busybox's and the small files'."""
        return len(self.layer_seeds) + (1 if self.busybox else 0) + (1 if self.small_files else 0)

    @property
    def data_bytes(self) -> int:
        return sum(self.layer_sizes)

    def file_paths(self) -> list[str]:
        """Paths of the generated files inside the image."""
        return [f"/data/layer-{i:03d}.bin" for i in range(len(self.layer_seeds))]


def _write_small_files(directory: Path, seed: str, count: int) -> None:
    """`count` files of 256 B to 4 KiB, 1,000 to a directory, seeded: a layer that costs per file."""
    rng = random.Random(seed)
    for i in range(count):
        path = directory / f"d{i // 1000:03d}" / f"f{i:06d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(256, 4096)))
        os.utime(path, (FIXED_MTIME, FIXED_MTIME))
    for sub in directory.iterdir():
        os.utime(sub, (FIXED_MTIME, FIXED_MTIME))


def build_image(
    daemon: Dockerd | Podman,
    ref: str,
    *,
    layers: int = 2,
    size: int = 1 * MiB,
    seed: str = "0",
    top_seed: str | None = None,
    busybox: bool = True,
    labels: Mapping[str, str] | None = None,
    layer_seeds: Sequence[str] | None = None,
    small_files: int = 0,
) -> BuiltImage:
    """A FROM scratch image tagged ``ref``, built by the daemon's own builder (Docker's legacy one).

    ``layers`` data layers share ``size`` bytes (one generated file each, seeded by ``seed`` and the
    layer number), on top of a busybox layer (``/bin/busybox``, so containers can run). ``top_seed``
    changes only the topmost layer (a typical dev-loop rebuild); equal inputs give equal layers.
    ``small_files`` adds one layer of that many small files under /files.
    """
    if layers < 1:
        raise ValueError("layers must be >= 1")
    seeds = tuple(layer_seeds) if layer_seeds is not None else tuple(f"{seed}/{i}" for i in range(layers))
    if top_seed is not None:
        seeds = (*seeds[:-1], top_seed)
    sizes = tuple(_split(size, len(seeds)))
    context = make_temp_dir("ctx")
    try:
        lines = ["FROM scratch"]
        if busybox:
            shutil.copy2(require_binary(BUSYBOX), context / "busybox")
            os.utime(context / "busybox", (FIXED_MTIME, FIXED_MTIME))
            lines.append("COPY busybox /bin/busybox")
        for i, (layer_seed, layer_size) in enumerate(zip(seeds, sizes, strict=True)):
            _write_seeded_file(context / f"layer-{i:03d}.bin", layer_seed, layer_size)
            lines.append(f"COPY layer-{i:03d}.bin /data/layer-{i:03d}.bin")
        if small_files:
            _write_small_files(context / "files", f"{seed}/files", small_files)
            lines.append("COPY files /files")
        all_labels = {"org.k3rd.seeds": ",".join(seeds), **(labels or {})}
        lines += [f"LABEL {k}={json.dumps(v)}" for k, v in all_labels.items()]
        if busybox:
            lines.append('CMD ["/bin/busybox", "sh"]')
        (context / "Dockerfile").write_text("\n".join(lines) + "\n")
        daemon.build(ref, context)
    finally:
        remove_tree(context)
    return BuiltImage(ref, daemon.image_id(ref), seeds, sizes, busybox, small_files)


def rebuild_image(
    daemon: Dockerd, image: BuiltImage, *, salt: str = "rebuilt", top_only: bool = True
) -> BuiltImage:
    """Build ``image.ref`` again with different content, giving a new image ID for the same tag.

    ``top_only`` changes just the last data layer (lower layers stay identical and shared).
    """
    seeds = list(image.layer_seeds)
    for i in [len(seeds) - 1] if top_only else range(len(seeds)):
        seeds[i] = f"{seeds[i]}+{salt}"
    return build_image(
        daemon, image.ref, size=image.data_bytes, busybox=image.busybox, layers=len(seeds), layer_seeds=seeds
    )


# --------------------------------------------------------------------------- docker push


@dataclass(frozen=True)
class PushedImage:
    """An image in the upstream registry, pushed by a dockerd."""

    ref: str
    """``127.0.0.1:PORT/repository:tag``."""
    registry: str
    repository: str
    tag: str
    digest: str
    """Manifest digest as reported by ``docker push`` (what the upstream registry serves)."""

    @property
    def digest_ref(self) -> str:
        return f"{self.registry}/{self.repository}@{self.digest}"


def registry_login(
    daemon: Dockerd, registry: str, credentials: tuple[str, str], config_dir: Path
) -> dict[str, str]:
    """``docker login`` into a private DOCKER_CONFIG dir; returns env overrides to use it."""
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.json").write_text("{}\n")
    env = {"DOCKER_CONFIG": str(config_dir)}
    user, password = credentials
    daemon.docker("login", registry, "--username", user, "--password-stdin", input=password, env=env)
    return env


def push_image(
    daemon: Dockerd,
    image: str | BuiltImage,
    registry: UpstreamRegistry | str,
    repository: str,
    tag: str = "latest",
    *,
    credentials: tuple[str, str] | None = None,
) -> PushedImage:
    """``docker tag`` + ``docker push 127.0.0.1:PORT/repository:tag`` (127.0.0.0/8 is insecure-allowed).

    An UpstreamRegistry with auth logs in with its own credentials unless others are given.
    """
    source = image.ref if isinstance(image, BuiltImage) else image
    addr = registry.addr if isinstance(registry, UpstreamRegistry) else registry
    if credentials is None and isinstance(registry, UpstreamRegistry):
        credentials = registry.credentials
    target = f"{addr}/{repository}:{tag}"
    daemon.docker("tag", source, target)
    env: dict[str, str] = {}
    login_dir = None
    if credentials:
        login_dir = make_temp_dir("login")
        env = registry_login(daemon, addr, credentials, login_dir)
    try:
        out = daemon.docker("push", target, env=env, timeout=1800).stdout
    finally:
        if login_dir:
            remove_tree(login_dir)
    match = re.search(r"digest: (sha256:[0-9a-f]{64})", out)
    if not match:
        raise RuntimeError(f"no digest in docker push output:\n{out}")
    return PushedImage(target, addr, repository, tag, match.group(1))


# --------------------------------------------------------------------------- multi-platform OCI


@dataclass(frozen=True)
class PlatformManifest:
    """One platform's image inside a MultiPlatformImage."""

    platform: str
    digest: str
    size: int
    config_digest: str
    layer_digests: tuple[str, ...]


@dataclass(frozen=True)
class MultiPlatformImage:
    """An OCI image index written as an OCI layout on disk (and maybe pushed)."""

    layout: Path
    tag: str
    index_digest: str
    index_size: int
    manifests: Mapping[str, PlatformManifest]
    """By platform string, e.g. "linux/arm64"."""
    ref: str | None = None
    """``127.0.0.1:PORT/repository:tag`` once pushed."""

    def blob(self, digest: str) -> bytes:
        return (self.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()

    @property
    def digest_ref(self) -> str:
        if self.ref is None:
            raise ValueError("not pushed")
        return f"{self.ref.rsplit(':', 1)[0]}@{self.index_digest}"


def _gzip_tar(files: Mapping[str, bytes]) -> tuple[bytes, bytes]:
    """Deterministic (tar, tar.gz) of ``files``: fixed mtimes, owners and gzip header."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o644
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return raw, gzip.compress(raw, compresslevel=6, mtime=0)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def write_oci_layout(
    layout: Path,
    *,
    tag: str = "1",
    platforms: Sequence[str] = ("linux/amd64", "linux/arm64"),
    seed: str = "multi",
    layer_size: int = 256 * 1024,
) -> MultiPlatformImage:
    """Write an OCI layout holding one index: per platform a shared layer plus its own layer."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(data: bytes) -> str:
        digest = sha256_digest(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return digest

    shared_raw, shared_gz = _gzip_tar({"k3rd/shared.bin": seeded_bytes(f"{seed}/shared", layer_size)})
    index_entries: list[dict[str, Any]] = []
    manifests: dict[str, PlatformManifest] = {}
    for platform in platforms:
        os_name, arch, *variant = platform.split("/")
        own_raw, own_gz = _gzip_tar(
            {
                "k3rd/platform": platform.encode() + b"\n",
                "k3rd/own.bin": seeded_bytes(f"{seed}/{platform}", layer_size),
            }
        )
        layer_digests = (put(shared_gz), put(own_gz))
        config: dict[str, Any] = {
            "created": "2024-01-01T00:00:00Z",
            "architecture": arch,
            "os": os_name,
            "config": {"Cmd": ["/k3rd/platform"], "Labels": {"org.k3rd.platform": platform}},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(shared_raw), sha256_digest(own_raw)]},
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "k3rd tests"}] * 2,
        }
        platform_obj = {"architecture": arch, "os": os_name}
        if variant:
            config["variant"] = platform_obj["variant"] = variant[0]
        config_bytes = _canonical(config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": put(config_bytes), "size": len(config_bytes)},
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": layer_digests[0], "size": len(shared_gz)},
                {"mediaType": OCI_LAYER_GZIP, "digest": layer_digests[1], "size": len(own_gz)},
            ],
        }
        manifest_bytes = _canonical(manifest)
        manifest_digest = put(manifest_bytes)
        index_entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "platform": platform_obj,
            }
        )
        manifests[platform] = PlatformManifest(
            platform, manifest_digest, len(manifest_bytes), sha256_digest(config_bytes), layer_digests
        )
    index_bytes = _canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries})
    index_digest = put(index_bytes)
    top = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_INDEX,
                "digest": index_digest,
                "size": len(index_bytes),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(top))
    return MultiPlatformImage(layout, tag, index_digest, len(index_bytes), manifests)


HOST_ARCHITECTURES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}


def host_platform() -> str:
    """This machine's platform as Docker names it ("linux/amd64"): what the test daemons run."""
    machine = os.uname().machine
    return f"linux/{HOST_ARCHITECTURES.get(machine, machine)}"


@dataclass(frozen=True)
class LayoutImage:
    """A single-platform image written as an OCI layout by write_image_layout()."""

    layout: Path
    tag: str
    digest: str
    """Digest of the image manifest (what a registry serves for the tag, byte for byte)."""
    config_digest: str
    layer_digests: tuple[str, ...]
    layer_sizes: tuple[int, ...]
    diff_ids: tuple[str, ...]
    platform: str

    @property
    def blob_digests(self) -> tuple[str, ...]:
        """Config and layers: every blob a push of this image uploads."""
        return (self.config_digest, *self.layer_digests)

    @property
    def bytes(self) -> int:
        """Bytes of the layers as stored (compressed when they are)."""
        return sum(self.layer_sizes)

    def blob(self, digest: str) -> bytes:
        return (self.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through to ``target``."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return int(self.target.write(data))

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.target.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


class _SeededReader:
    """seeded_bytes(seed, size) read in pieces, never all in memory (the same bytes as long as every
    read but the last asks for a multiple of 4 bytes, as tarfile's 8 MiB copy buffer does)."""

    def __init__(self, seed: str, size: int) -> None:
        self.rng = random.Random(seed)
        self.remaining = size

    def read(self, n: int = -1) -> bytes:
        n = self.remaining if n < 0 else min(n, self.remaining)
        self.remaining -= n
        return self.rng.randbytes(n)


LayerFile = tuple[str, int, bytes | tuple[str, int]]
"""(path, mode, content): bytes, or (seed, size) for seeded random data streamed to disk."""


def _write_layer_blob(blobs: Path, files: Sequence[LayerFile], compress: bool) -> tuple[str, str, int]:
    """Streams a deterministic layer tar (gzip or not) into ``blobs``; (digest, diff_id, size)."""
    partial = blobs / ".partial"
    with open(partial, "wb") as out:
        stored = _HashingWriter(out)
        gz = gzip.GzipFile(fileobj=stored, mode="wb", compresslevel=1, mtime=0) if compress else None
        raw = _HashingWriter(gz or stored)
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, copybufsize=8 * MiB) as tar:
            for name, mode, content in files:
                info = tarfile.TarInfo(name)
                info.mtime, info.mode = FIXED_MTIME, mode
                if isinstance(content, bytes):
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
                else:
                    seed, info.size = content
                    tar.addfile(info, _SeededReader(seed, info.size))
        if gz is not None:
            gz.close()
    partial.rename(blobs / stored.digest.removeprefix("sha256:"))
    return stored.digest, raw.digest, stored.size


def write_image_layout(
    layout: Path,
    *,
    tag: str = "1",
    layer_sizes: Sequence[int] = (1 * MiB, 1 * MiB),
    seed: str = "image",
    busybox: bool = True,
    compress: bool = True,
    platform: str | None = None,
) -> LayoutImage:
    """Write an OCI layout holding one image manifest tagged ``tag``, streaming each layer to disk.

    A busybox layer (``/bin/busybox`` and ``/k3rd/hello.txt``; CMD cats the latter, so the image runs)
    comes first, then one layer per size with a file of seeded random bytes at
    ``/data/layer-NNN.bin``. Layers are gzip (level 1) or, with ``compress=False``, plain tars.
    ``platform`` defaults to the host's. Equal arguments give equal digests.
    """
    platform = platform or host_platform()
    os_name, arch, *variant = platform.split("/")
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layer_files: list[list[LayerFile]] = []
    if busybox:
        hello = f"hello from {seed}\n".encode()
        layer_files.append([("bin/busybox", 0o755, BUSYBOX.read_bytes()), ("k3rd/hello.txt", 0o644, hello)])
    for i, size in enumerate(layer_sizes):
        layer_files.append([(f"data/layer-{i:03d}.bin", 0o644, (f"{seed}/{i}", size))])
    written = [_write_layer_blob(blobs, files, compress) for files in layer_files]

    def put(data: bytes) -> str:
        digest = sha256_digest(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return digest

    config: dict[str, Any] = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch,
        "os": os_name,
        "config": {"Cmd": ["/bin/busybox", "cat", "/k3rd/hello.txt"] if busybox else ["/none"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id, _ in written]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "k3rd tests"}] * len(written),
    }
    if variant:
        config["variant"] = variant[0]
    config_bytes = _canonical(config)
    media_type = OCI_LAYER_GZIP if compress else OCI_LAYER
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": put(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": media_type, "digest": d, "size": size} for d, _, size in written],
    }
    manifest_bytes = _canonical(manifest)
    digest = put(manifest_bytes)
    top = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(top))
    return LayoutImage(
        layout,
        tag,
        digest,
        sha256_digest(config_bytes),
        tuple(d for d, _, _ in written),
        tuple(size for _, _, size in written),
        tuple(diff_id for _, diff_id, _ in written),
        platform,
    )


def skopeo(*args: str, timeout: float = 600) -> str:
    """Run skopeo (no signature policy: these are throwaway local registries); returns stdout."""
    return run([require_binary("skopeo"), "--insecure-policy", *args], timeout=timeout).stdout


def push_multiplatform(
    registry: UpstreamRegistry | str,
    repository: str,
    tag: str = "1",
    *,
    platforms: Sequence[str] = ("linux/amd64", "linux/arm64"),
    seed: str = "multi",
    layer_size: int = 256 * 1024,
    credentials: tuple[str, str] | None = None,
    layout: Path | None = None,
) -> MultiPlatformImage:
    """Write the OCI layout and ``skopeo copy --all`` it to ``registry/repository:tag`` (digests kept)."""
    addr = registry.addr if isinstance(registry, UpstreamRegistry) else registry
    if credentials is None and isinstance(registry, UpstreamRegistry):
        credentials = registry.credentials
    layout = layout or make_temp_dir("oci") / "layout"
    image = write_oci_layout(layout, tag=tag, platforms=platforms, seed=seed, layer_size=layer_size)
    creds = ["--dest-creds", ":".join(credentials)] if credentials else []
    ref = f"{addr}/{repository}:{tag}"
    skopeo("copy", "--all", "--dest-tls-verify=false", *creds, f"oci:{layout}:{tag}", f"docker://{ref}")
    return dataclasses.replace(image, ref=ref)


def inspect_raw(ref: str, *, credentials: tuple[str, str] | None = None) -> bytes:
    """The manifest/index bytes the registry serves for ``ref`` (``skopeo inspect --raw``)."""
    creds = ["--creds", ":".join(credentials)] if credentials else []
    argv = [require_binary("skopeo"), "--insecure-policy", "inspect", "--raw", "--tls-verify=false", *creds]
    proc = subprocess.run([*argv, f"docker://{ref}"], capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc.stdout


def build_with_podman(podman: Podman, ref: str, context: Path, *, seed: str, size: int = 2 * MiB) -> None:
    """A FROM scratch image (busybox + seeded data) built by Podman under ``ref``."""
    context.mkdir(parents=True)
    shutil.copy(BUSYBOX, context / "busybox")
    (context / "data").write_bytes(seeded_bytes(seed, size))
    (context / "Containerfile").write_text("FROM scratch\nCOPY busybox /bin/busybox\nCOPY data /data\n")
    podman.podman("build", "-q", "-t", ref, str(context))
