"""Synthetic `docker save` streams, built in memory with tarfile, in the three shapes export.py reads.

- `classic_save`: the OCI layout Docker >= 25 writes from its classic (graph driver) store;
- `oci_layout`: any OCI layout, e.g. what the containerd image store writes (indexes, absent children);
- `legacy_save`: ``<id>/layer.tar`` + ``<config>.json`` + ``manifest.json`` of older Docker and Podman.

Everything is deterministic: fixed mtimes, owners and entry order, so equal inputs give equal bytes.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
OCI_LAYOUT_FILE = b'{"imageLayoutVersion":"1.0.0"}'


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def hex_of(digest: str) -> str:
    return digest.removeprefix("sha256:")


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


class TarBuilder:
    """A tar archive in memory; entries in the order they are added."""

    def __init__(self) -> None:
        self._entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def _info(self, name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def directory(self, name: str) -> TarBuilder:
        self._entries.append((self._info(name, tarfile.DIRTYPE, 0o755), None))
        return self

    def file(self, name: str, data: bytes) -> TarBuilder:
        info = self._info(name, tarfile.REGTYPE, 0o644)
        info.size = len(data)
        self._entries.append((info, data))
        return self

    def symlink(self, name: str, target: str) -> TarBuilder:
        info = self._info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self._entries.append((info, None))
        return self

    def hardlink(self, name: str, target: str) -> TarBuilder:
        info = self._info(name, tarfile.LNKTYPE, 0o644)
        info.linkname = target
        self._entries.append((info, None))
        return self

    def getvalue(self) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for info, data in self._entries:
                tar.addfile(info, None if data is None else io.BytesIO(data))
        return buffer.getvalue()


def members(data: bytes) -> list[tarfile.TarInfo]:
    """The entries of a tar archive, for tests that look at what a builder wrote."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


def layer_tar(files: Mapping[str, bytes]) -> bytes:
    """An uncompressed layer: a tar of a few files (what a diff_id hashes)."""
    builder = TarBuilder()
    for name, data in files.items():
        builder.file(name, data)
    return builder.getvalue()


@dataclass(frozen=True)
class Image:
    """One image manifest with its config and layers, all as bytes."""

    config: bytes
    layers: tuple[bytes, ...]
    manifest: bytes
    media_type: str = OCI_MANIFEST

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    @property
    def config_digest(self) -> str:
        return digest_of(self.config)

    @property
    def layer_digests(self) -> list[str]:
        return [digest_of(layer) for layer in self.layers]

    def blobs(self) -> dict[str, bytes]:
        """Manifest, config and layers by digest."""
        found = {self.digest: self.manifest, self.config_digest: self.config}
        found.update((digest_of(layer), layer) for layer in self.layers)
        return found


def make_config(seed: str, layers: Sequence[bytes], *, os: str = "linux", arch: str = "amd64") -> bytes:
    return canonical_json(
        {
            "architecture": arch,
            "os": os,
            "config": {"Cmd": ["/bin/sh"], "Labels": {"seed": seed}},
            "rootfs": {"type": "layers", "diff_ids": [digest_of(layer) for layer in layers]},
        }
    )


def make_image(
    seed: str,
    *,
    os: str = "linux",
    arch: str = "amd64",
    layer_count: int = 2,
    layers: Sequence[bytes] | None = None,
    docker_media_types: bool = False,
) -> Image:
    """A small image whose bytes depend only on its arguments."""
    if layers is None:
        layers = [
            layer_tar({f"{seed}/file{i}.txt": f"{seed} layer {i}\n".encode() * (i + 3)})
            for i in range(layer_count)
        ]
    config = make_config(seed, layers, os=os, arch=arch)
    media_type, config_type, layer_type = (
        (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
        if docker_media_types
        else (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_TAR)
    )
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": config_type, "digest": digest_of(config), "size": len(config)},
            "layers": [
                {"mediaType": layer_type, "digest": digest_of(layer), "size": len(layer)} for layer in layers
            ],
        }
    )
    return Image(config=config, layers=tuple(layers), manifest=manifest, media_type=media_type)


def make_index(children: Iterable[tuple[Image | bytes, Mapping[str, str]]]) -> bytes:
    """An OCI image index over (manifest, platform) pairs; a child may be given as raw manifest bytes."""
    manifests = []
    for child, platform in children:
        raw, media_type = (
            (child.manifest, child.media_type) if isinstance(child, Image) else (child, OCI_MANIFEST)
        )
        manifests.append(
            {"mediaType": media_type, "digest": digest_of(raw), "size": len(raw), "platform": dict(platform)}
        )
    return canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})


def descriptor(
    data: bytes, media_type: str, *, name: str | None = None, platform: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """An index.json entry; `name` (``docker.io/library/alpine:latest``) becomes both annotations."""
    entry: dict[str, Any] = {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}
    if platform is not None:
        entry["platform"] = dict(platform)
    if name is not None:
        entry["annotations"] = {
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": name.rpartition(":")[2],
        }
    return entry


def oci_layout(
    blobs: Mapping[str, bytes],
    index_entries: Sequence[Mapping[str, Any]],
    *,
    manifest_json: Any = None,
    repositories: Any = None,
    symlinks: Mapping[str, str] | None = None,
    include_index: bool = True,
    extra_files: Mapping[str, bytes] | None = None,
) -> bytes:
    """An OCI layout as Docker's `archive.Tar` writes it: directories, sorted blobs, then the metadata.

    `blobs` maps the digest a file is *named* after to the bytes stored under that name, so a corrupt
    blob is ``{real_digest: other_bytes}``.
    """
    builder = TarBuilder()
    for name, data in (extra_files or {}).items():
        builder.file(name, data)
    builder.directory("blobs/").directory("blobs/sha256/")
    for digest in sorted(blobs):
        builder.file(f"blobs/sha256/{hex_of(digest)}", blobs[digest])
    for name, target in (symlinks or {}).items():
        builder.directory(name.rpartition("/")[0] + "/")
        builder.symlink(name, target)
    if include_index:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(index_entries)}
        builder.file("index.json", canonical_json(index))
    if manifest_json is not None:
        builder.file("manifest.json", canonical_json(manifest_json))
    builder.file("oci-layout", OCI_LAYOUT_FILE)
    if repositories is not None:
        builder.file("repositories", canonical_json(repositories))
    return builder.getvalue()


def familiar(name: str) -> str:
    return name.removeprefix("docker.io/").removeprefix("library/")


def classic_save(image: Image, name: str = "docker.io/library/alpine:latest", **kwargs: Any) -> bytes:
    """`docker save` of Docker >= 25 with the classic store: Docker's own manifest, annotated with the name.

    Includes the legacy-compatible ``manifest.json``, ``repositories`` and a ``<v1id>/layer.tar`` symlink
    into ``blobs/`` as Docker writes for old loaders.
    """
    v1id = hashlib.sha256(f"v1 {name}".encode()).hexdigest()
    repo, _, tag = familiar(name).rpartition(":")
    blobs = image.blobs()
    blobs.update(kwargs.pop("blobs", {}))
    return oci_layout(
        blobs,
        [descriptor(image.manifest, OCI_MANIFEST, name=name)],
        manifest_json=[
            {
                "Config": f"blobs/sha256/{hex_of(image.config_digest)}",
                "RepoTags": [familiar(name)],
                "Layers": [f"blobs/sha256/{hex_of(d)}" for d in image.layer_digests],
            }
        ],
        repositories={repo: {tag: v1id}},
        symlinks={f"{v1id}/layer.tar": f"../blobs/sha256/{hex_of(image.layer_digests[-1])}"},
        **kwargs,
    )


def legacy_save(image: Image, repo_tags: Sequence[str] = ("alpine:latest",)) -> bytes:
    """The pre-25 format: a directory per layer, a repeated layer as a symlink to its first copy."""
    builder = TarBuilder()
    first_path: dict[bytes, str] = {}
    layer_paths = []
    parent = ""
    for position, layer in enumerate(image.layers):
        v1id = hashlib.sha256(f"{parent} {position} {digest_of(layer)}".encode()).hexdigest()
        builder.directory(f"{v1id}/")
        builder.file(f"{v1id}/VERSION", b"1.0")
        builder.file(f"{v1id}/json", canonical_json({"id": v1id, "parent": parent or None}))
        if layer in first_path:
            builder.symlink(f"{v1id}/layer.tar", f"../{first_path[layer]}")
        else:
            builder.file(f"{v1id}/layer.tar", layer)
            first_path[layer] = f"{v1id}/layer.tar"
        layer_paths.append(f"{v1id}/layer.tar")
        parent = v1id
    config_name = f"{hex_of(image.config_digest)}.json"
    builder.file(config_name, image.config)
    builder.file(
        "manifest.json",
        canonical_json([{"Config": config_name, "RepoTags": list(repo_tags), "Layers": layer_paths}]),
    )
    repositories: dict[str, dict[str, str]] = {}
    for repo_tag in repo_tags:
        repo, _, tag = repo_tag.rpartition(":")
        repositories.setdefault(repo, {})[tag] = parent
    builder.file("repositories", canonical_json(repositories))
    return builder.getvalue()


def tar_split(data: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """The tar-split record of a tar (gzipped JSON lines: raw segments between the files' bytes, and the
    files' names and sizes), and the files' bytes by name, as a layer store keeps them."""
    lines: list[dict[str, Any]] = []
    files: dict[bytes, bytes] = {}
    position = 0

    def segment(raw: bytes) -> None:
        if raw:
            lines.append({"type": 2, "payload": base64.b64encode(raw).decode(), "position": len(lines)})

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            name = member.name.encode("utf-8", "surrogateescape")
            segment(data[position : member.offset_data])
            entry: dict[str, Any] = {"type": 1, "position": len(lines)}
            try:
                entry["name"] = name.decode()
            except UnicodeDecodeError:
                entry["name_raw"] = base64.b64encode(name).decode()
            if member.isfile() and member.size:
                entry["size"] = member.size
                files[name] = data[member.offset_data : member.offset_data + member.size]
            lines.append(entry)
            position = member.offset_data + (member.size if member.isfile() else 0)
    segment(data[position:])
    return gzip.compress(b"".join(json.dumps(line).encode() + b"\n" for line in lines)), files


def write_diff_dir(root: Path, files: Mapping[bytes, bytes]) -> None:
    """The files of a layer as its diff directory holds them."""
    for name, content in files.items():
        path = os.path.join(os.fsencode(root), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(content)
