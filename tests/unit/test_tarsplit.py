"""Putting a layer's tar together from its tar-split record and its diff directory: byte for byte, from
any offset, never through a symlink, and never past what the record says."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import tarfile
from pathlib import Path

import pytest

from k3d_registry_dockerd.common.hashing import CHUNK
from k3d_registry_dockerd.sources import tarsplit
from k3d_registry_dockerd.sources.pieces import read_all
from k3d_registry_dockerd.sources.tarsplit import LayerTar, LayerUnservable

from .saves import tar_split, write_diff_dir


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime, info.mode = kind, size, 1_700_000_000, 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def awkward_layer() -> bytes:
    """A layer with what real layers hold: nested and empty files, a hardlink, a symlink, a whiteout and an
    opaque directory, a file capability (PAX xattr), a long name, a name that is not UTF-8, a file larger
    than a chunk, and a file of zeros as a sparse file would read."""
    big = random.Random("big").randbytes(CHUNK + 12_345)
    entries: list[tuple[tarfile.TarInfo, bytes]] = [
        (_info("etc/", tarfile.DIRTYPE, mode=0o755), b""),
        (_info("etc/hostname", size=6), b"alpha\n"),
        (_info("etc/empty"), b""),
        (_info("etc/linked", tarfile.LNKTYPE, linkname="etc/hostname"), b""),
        (_info("etc/symlinked", tarfile.SYMTYPE, linkname="hostname"), b""),
        (_info("etc/.wh.removed"), b""),
        (_info("var/.wh..wh..opq"), b""),
        (
            _info("bin/ping", size=4, pax_headers={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"}),
            b"ping",
        ),
        (_info("deep/" + "n" * 120 + "/file.txt", size=5), b"long\n"),
        (_info("caf\udce9/menu", size=4), b"menu"),
        (_info("data/big.bin", size=len(big)), big),
        (_info("data/sparse.bin", size=300_000), bytes(300_000)),
    ]
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for info, content in entries:
            tar.addfile(info, io.BytesIO(content) if content else None)
    return out.getvalue()


def stored(tmp_path: Path, data: bytes) -> LayerTar:
    record, files = tar_split(data)
    diff = tmp_path / "diff"
    diff.mkdir()
    write_diff_dir(diff, files)
    (tmp_path / "tar-split.json.gz").write_bytes(record)
    return tarsplit.read(tmp_path / "tar-split.json.gz", diff)


def whole(layer: LayerTar, start: int = 0) -> bytes:
    return b"".join(read_all(layer.reader(start)))


def test_a_layer_is_put_together_byte_for_byte(tmp_path: Path) -> None:
    data = awkward_layer()
    layer = stored(tmp_path, data)
    assert layer.size == len(data)
    layer.check()
    assert whole(layer) == data
    # Chunks stay about a chunk long: a file's bytes fill up what headers began.
    assert all(len(chunk) <= CHUNK + 4096 for chunk in read_all(layer.reader()))


@pytest.mark.parametrize("start", [0, 1, 511, 512, 4096, CHUNK, CHUNK + 700, -1])
def test_any_offset_starts_where_asked(tmp_path: Path, start: int) -> None:
    data = awkward_layer()
    layer = stored(tmp_path, data)
    start = start if start >= 0 else len(data) - 1
    assert whole(layer, start) == data[start:]
    assert whole(layer, len(data)) == b""


def test_non_utf8_names_come_as_raw_bytes(tmp_path: Path) -> None:
    record, _files = tar_split(awkward_layer())
    entries = [json.loads(line) for line in gzip.decompress(record).splitlines()]
    assert any("name_raw" in entry for entry in entries)
    assert whole(stored(tmp_path, awkward_layer())) == awkward_layer()


def test_a_file_gone_or_shorter_than_recorded_fails_the_stream(tmp_path: Path) -> None:
    layer = stored(tmp_path, awkward_layer())
    (tmp_path / "diff" / "data" / "big.bin").write_bytes(b"short")
    with pytest.raises(OSError, match="shorter"):
        whole(layer)
    with pytest.raises(OSError, match="shorter"):
        layer.digest()
    (tmp_path / "diff" / "data" / "big.bin").unlink()
    with pytest.raises(FileNotFoundError):
        whole(layer)
    with pytest.raises(LayerUnservable):
        layer.check()


def test_no_file_is_read_through_a_symlink(tmp_path: Path) -> None:
    secret = tmp_path / "host" / "secret"
    secret.parent.mkdir()
    secret.write_bytes(b"host!")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.addfile(_info("etc/secret", size=5), io.BytesIO(b"layer"))
    layer = stored(tmp_path, out.getvalue())
    # The layer's directory turned into a link to the host's: the layer is not served from here.
    (tmp_path / "diff" / "etc" / "secret").unlink()
    (tmp_path / "diff" / "etc").rmdir()
    os.symlink(secret.parent, tmp_path / "diff" / "etc")
    with pytest.raises(LayerUnservable, match="symlink"):
        layer.check()
    with pytest.raises(OSError):
        whole(layer)
    os.unlink(tmp_path / "diff" / "etc")
    (tmp_path / "diff" / "etc").mkdir()
    os.symlink(secret, tmp_path / "diff" / "etc" / "secret")
    with pytest.raises(LayerUnservable, match="symlink"):
        layer.check()


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/../../b"])
def test_names_leading_outside_the_layer_are_refused(tmp_path: Path, name: str) -> None:
    record = json.dumps({"type": 1, "name": name, "size": 3}).encode()
    with pytest.raises(LayerUnservable, match="not a path inside"):
        tarsplit.parse(io.BytesIO(record), tmp_path)


@pytest.mark.parametrize(
    "record", [b"not json", b'{"type": 7}', b'{"type": 1}', b"", gzip.compress(b"x")[:5]]
)
def test_a_damaged_record_makes_the_layer_unservable(tmp_path: Path, record: bytes) -> None:
    (tmp_path / "t.gz").write_bytes(gzip.compress(record) if record != gzip.compress(b"x")[:5] else record)
    with pytest.raises(LayerUnservable):
        tarsplit.read(tmp_path / "t.gz", tmp_path)
    with pytest.raises(LayerUnservable, match="no tar-split record"):
        tarsplit.read(tmp_path / "missing.gz", tmp_path)


def test_a_record_is_parsed_again_only_when_its_file_changed(tmp_path: Path) -> None:
    stored(tmp_path, awkward_layer())
    records = tarsplit.ParsedRecords()
    record, diff = tmp_path / "tar-split.json.gz", tmp_path / "diff"
    first = records.read(record, diff)
    assert records.read(record, diff) is first
    # Replaced (the daemon recreated the layer): parsed again.
    data = record.read_bytes()
    record.unlink()
    record.write_bytes(data)
    again = records.read(record, diff)
    assert again is not first and whole(again) == awkward_layer()
    # Past its budget nothing is kept.
    small = tarsplit.ParsedRecords(budget=10)
    assert small.read(record, diff) is not small.read(record, diff)


def test_a_run_of_entries_without_files_longer_than_a_block(tmp_path: Path) -> None:
    """Raw bytes are cut into entries of their own past a block: 300 directories, then a file."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for index in range(300):
            tar.addfile(_info(f"d{index:03}/", tarfile.DIRTYPE, mode=0o755))
        tar.addfile(_info("d000/file", size=70_000), io.BytesIO(bytes(range(256)) * 273 + b"x" * 112))
    data = out.getvalue()
    layer = stored(tmp_path, data)
    assert len(layer.blocks) > 1
    for start in (0, 1, tarsplit.BLOCK, len(data) - 70_500):
        assert whole(layer, start) == data[start:]
    # The file as a range to send as it lies, the raw bytes around it read.
    assert b"".join(read_all(layer.reader(0, None, 1 << 10))) == data


@pytest.mark.parametrize("inline_below", [None, 1, 4096])
def test_any_span_is_what_the_tar_holds_there(tmp_path: Path, inline_below: int | None) -> None:
    data = awkward_layer()
    layer = stored(tmp_path, data)
    cuts = sorted({0, 1, 511, 512, 513, 1024, 1536, 5000, CHUNK, len(data) - 1024, len(data) - 1, len(data)})
    for start in cuts:
        for stop in cuts:
            if start < stop:
                assert b"".join(read_all(layer.reader(start, stop, inline_below))) == data[start:stop]
