"""Damaged `docker save` streams, made by a proxy in front of the real Docker socket.

The registry under test talks to dockerd only through `DockerProxy` (tests/world/docker_proxy.py), which
can cut the save stream's connection (`cut`), end its chunked body early (`short`) or invert one byte in the
middle of a layer (`flip`), for Docker 26 (OCI layout) and Docker 20 (legacy format). Whatever the damage:

- the client gets a prompt 5xx OCI error (503 for a broken connection, 502 for a rejected stream), the log
  says what was wrong and names the damaged member, no blob fails to hash to its name, `<cache>/tmp` is
  empty, and the same pull succeeds once the proxy passes the stream through intact again;
- nothing of the rejected export stays in the cache (README: "nothing of it was stored");

and an intact export stores only blobs its record references.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from k3d_registry_dockerd.oci.errors import STATUS_BY_CODE

from . import oci_client
from .daemons import NO_ZERO_COPY, Dockerd, RegistryFactory, RegistryProcess
from .docker_proxy import DockerProxy, FaultKind, SaveFault, SaveRecord
from .images import MiB, build_image

ACCEPT = {"Accept": oci_client.MANIFEST_ACCEPT}
VARIANTS = ["docker26", "docker28", "docker28_containerd", "docker20"]
# The client must get its answer well within this; a hang fails the test instead of blocking it.
ANSWER_TIMEOUT = 120


@pytest.fixture
def docker_proxy() -> Iterator[Callable[[Dockerd], DockerProxy]]:
    """Factory: a started pass-through proxy in front of a dockerd's socket; stopped after the test."""
    made: list[DockerProxy] = []

    def factory(daemon: Dockerd) -> DockerProxy:
        proxy = DockerProxy(daemon.socket).start()
        made.append(proxy)
        return proxy

    yield factory
    for proxy in made:
        proxy.stop()


def stored_blobs(registry: RegistryProcess) -> dict[str, Path]:
    blobs = registry.cache_dir / "blobs" / "sha256"
    return {f"sha256:{p.name}": p for p in blobs.rglob("*") if p.is_file()}


def assert_every_blob_matches_its_name(registry: RegistryProcess) -> None:
    for digest, path in stored_blobs(registry).items():
        got = f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
        assert got == digest, f"{path} holds bytes hashing to {got}"


def exports_started(registry: RegistryProcess, ref: str) -> int:
    return len(re.findall(rf"exporting {re.escape(ref)} from Docker", registry.log_text()))


def damaged_digest(record: SaveRecord) -> str | None:
    """The digest a damaged OCI-layout member was delivered under (legacy layer tars have none)."""
    assert record.member is not None
    match = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", record.member.name)
    return f"sha256:{match.group(1)}" if match else None


@dataclass
class Rejected:
    """A pull whose save stream was damaged, and what the registry made of it."""

    name: str
    ref: str
    registry: RegistryProcess
    proxy: DockerProxy
    record: SaveRecord
    response: oci_client.Response
    log: str
    # Blobs in the cache right after the rejection (the cache was empty before).
    left: set[str] = field(default_factory=set)


def reject_damaged_pull(
    variant: str,
    kind: FaultKind,
    request: pytest.FixtureRequest,
    docker_proxy: Callable[[Dockerd], DockerProxy],
    registry_under_test: RegistryFactory,
) -> Rejected:
    daemon: Dockerd = request.getfixturevalue(variant)
    name = f"damaged-{variant}-{kind}"
    # Three data layers (and busybox's): the damage strikes the third big member of the stream, so
    # complete blobs come before it whatever the format and the order of digests.
    build_image(daemon, f"{name}:1", layers=3, size=6 * MiB, seed=name)
    proxy = docker_proxy(daemon)
    proxy.fault = SaveFault(kind, nth=2)
    registry = registry_under_test(proxy.host, extra_args=NO_ZERO_COPY)
    response = oci_client.request(
        f"{registry.url}/v2/{name}/manifests/1", headers=ACCEPT, timeout=ANSWER_TIMEOUT
    )
    (record,) = proxy.saves
    assert record.damaged_at is not None, f"the fault never struck: {record}"
    assert record.member is not None and record.member.size >= MiB, record
    # Well past the member's tar header, inside its data.
    assert record.offset_in_member is not None and record.offset_in_member >= 4096, record
    return Rejected(
        name,
        f"docker.io/library/{name}:1",
        registry,
        proxy,
        record,
        response,
        registry.log_text(),
        set(stored_blobs(registry)),
    )


def recover(rejected: Rejected) -> oci_client.Pulled:
    """Pass-through again: the same pull exports afresh and succeeds, every digest verified."""
    rejected.proxy.fault = None
    pulled = oci_client.pull(rejected.registry.url, rejected.name, "1")
    assert exports_started(rejected.registry, rejected.ref) == 2
    last = rejected.proxy.saves[-1]
    assert last.finished and last.damaged_at is None
    assert_every_blob_matches_its_name(rejected.registry)
    assert "Traceback" not in rejected.registry.log_text()
    return pulled


KINDS = ["cut", "short", "flip"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_damaged_save_stream_is_rejected_with_a_reason_and_recovers(
    variant: str,
    kind: FaultKind,
    request: pytest.FixtureRequest,
    docker_proxy: Callable[[Dockerd], DockerProxy],
    registry_under_test: RegistryFactory,
) -> None:
    rejected = reject_damaged_pull(variant, kind, request, docker_proxy, registry_under_test)
    response, log, member = rejected.response, rejected.log, rejected.record.member
    assert member is not None
    assert 500 <= response.status < 600, (response.status, response.body[:500])
    assert response.headers["content-type"].startswith("application/json")
    (error,) = response.json()["errors"]
    assert error["code"] in STATUS_BY_CODE and error["message"], error
    assert "Traceback" not in log, log
    ref = re.escape(rejected.ref)
    if kind == "cut":
        # The connection dropped mid-body: the stream from Docker broke, 503 like Docker going away.
        assert response.status == 503 and error["code"] == "UNAVAILABLE", error
        assert re.search(rf"export of {ref} failed: the stream from Docker broke: \S", log), log
        assert "TransferEncodingError" not in log and "ClientPayloadError" not in log, log
    else:
        assert response.status == 502 and error["code"] == "UNAVAILABLE", error
        (line,) = [line for line in log.splitlines() if f"export of {rejected.ref} rejected: " in line]
        if kind == "short":
            # The member's bytes ran short in the middle of its data.
            assert (
                f"rejected: {member.name}: got {rejected.record.offset_in_member} of {member.size} bytes"
                in line
            )
        elif damaged_digest(rejected.record) is not None:
            # OCI layout: the log names the blob and the digest it was delivered under.
            delivered = damaged_digest(rejected.record)
            assert re.search(
                rf"rejected: {re.escape(member.name)}: content hashes to sha256:[0-9a-f]{{64}}, "
                rf"expected {delivered}$",
                line,
            ), line
        else:
            # Legacy format: a layer tar has no digest of its own, the config's rootfs.diff_ids has. The
            # rejection must still say which layer did not match.
            assert "do not match its rootfs.diff_ids" in line, line
            assert member.name in line, f"the rejection does not name the damaged layer {member.name}: {line}"

    assert_every_blob_matches_its_name(rejected.registry)
    assert list((rejected.registry.cache_dir / "tmp").iterdir()) == []
    recover(rejected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rejected_export_stores_nothing(
    variant: str,
    kind: FaultKind,
    request: pytest.FixtureRequest,
    docker_proxy: Callable[[Dockerd], DockerProxy],
    registry_under_test: RegistryFactory,
) -> None:
    """README: "export of X rejected: … nothing of it was stored". The cache was empty before."""
    rejected = reject_damaged_pull(variant, kind, request, docker_proxy, registry_under_test)
    assert 500 <= rejected.response.status < 600
    assert list((rejected.registry.cache_dir / "tmp").iterdir()) == []
    pulled = recover(rejected)
    image_blobs = {pulled.digest, *pulled.blobs}
    damaged = {rejected.record.member_digest} - {None}
    kept = sorted(rejected.left & image_blobs)
    stored_damage = sorted(rejected.left & damaged)
    other = sorted(rejected.left - image_blobs - damaged)
    assert rejected.left == set(), (
        f"the rejected export left {len(rejected.left)} blobs in the cache, none referenced by any record: "
        f"{len(kept)} of the image's own {kept}; {len(stored_damage)} holding the damaged member's bytes "
        f"under their own hash {stored_damage}; {len(other)} others {other}"
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_successful_export_stores_only_what_it_serves(
    variant: str,
    request: pytest.FixtureRequest,
    docker_proxy: Callable[[Dockerd], DockerProxy],
    registry_under_test: RegistryFactory,
) -> None:
    """The pass-through proxy changes nothing; every blob an export stores is one the record serves."""
    daemon: Dockerd = request.getfixturevalue(variant)
    name = f"intact-{variant}"
    build_image(daemon, f"{name}:1", layers=3, size=6 * MiB, seed=name)
    proxy = docker_proxy(daemon)
    registry = registry_under_test(proxy.host, extra_args=NO_ZERO_COPY)
    pulled = oci_client.pull(registry.url, name, "1")
    (save,) = proxy.saves
    assert save.finished and save.damaged_at is None
    assert_every_blob_matches_its_name(registry)
    referenced: set[str] = set()
    for path in (registry.cache_dir / "repositories").glob("*.json"):
        record = json.loads(path.read_bytes())
        referenced |= set(record["manifests"]) | set(record["blobs"])
        for entry in record["manifests"].values():
            referenced |= set(entry["references"])
    assert {pulled.digest, *pulled.blobs} <= referenced
    unreferenced = sorted(set(stored_blobs(registry)) - referenced)
    sizes = {d: stored_blobs(registry)[d].stat().st_size for d in unreferenced}
    assert not unreferenced, f"the export stored blobs no record references (digest: bytes): {sizes}"
