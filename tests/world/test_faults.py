"""Faults against the real test world: never lose, never corrupt, never hang.

The registry is SIGKILLed at random points of exports and uploads, dockerd is stopped under an export and
a pull, the cache filesystem fills up, clients vanish mid-transfer or trickle their headers. After each
fault: every stored blob hashes to its name, no temp file outlives a restart or a cancelled upload, what
was acknowledged is still there, and the same request succeeds once the fault is gone.

Timing is never asserted: "promptly" means within a generous deadline, not a hang. The SIGKILL trials
print their random seed; K3RD_FAULT_SEED=<seed> repeats the same choices (kill points still vary with
the machine's speed).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from k3d_registry_dockerd.cache.store import Store

from . import oci_client
from .daemons import (
    NO_ZERO_COPY,
    Dockerd,
    RegistryFactory,
    RegistryProcess,
    UpstreamRegistry,
    make_temp_dir,
    remove_tree,
    wait_until,
)
from .images import MiB, build_image, push_image

ACCEPT = {"Accept": oci_client.MANIFEST_ACCEPT}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
# "Promptly": an answer well within this, never a hang. Generous, for a loaded 2-CPU machine.
PROMPT = 30.0


# --------------------------------------------------------------------------- helpers


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def verify_blobs(cache: Path) -> int:
    """Every file under blobs/sha256 hashes to its name (nothing else is there); returns how many."""
    count = 0
    for path in (cache / "blobs" / "sha256").rglob("*"):
        if path.is_dir():
            continue
        hasher = hashlib.sha256()
        with open(path, "rb") as blob:
            while chunk := blob.read(1 << 20):
                hasher.update(chunk)
        assert hasher.hexdigest() == path.name, f"{path} does not hash to its name"
        assert path.parent.name == path.name[:2], f"{path} is in the wrong directory"
        count += 1
    return count


def temp_files(cache: Path) -> list[str]:
    tmp = cache / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


def blob_temp_files(cache: Path) -> list[str]:
    """Temp files of blobs being written: uploads and exports (not the readiness probe's)."""
    return [name for name in temp_files(cache) if name.startswith("blob-")]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def log_since(registry: RegistryProcess, mark: int) -> str:
    return registry.log_text()[mark:]


def wait_for_log(registry: RegistryProcess, pattern: str, mark: int = 0, timeout: float = 60) -> None:
    wait_until(
        lambda: re.search(pattern, log_since(registry, mark)),
        timeout=timeout,
        interval=0.01,
        what=f"{pattern!r} in the registry log",
    )


def cache_misses(registry: RegistryProcess) -> float:
    """Tag requests that needed an export (k3d_registry_manifest_cache{result="miss"})."""
    return oci_client.metric(registry.url, "k3d_registry_manifest_cache_total", result="miss")


def error_of(response: oci_client.Response) -> dict[str, Any]:
    """The first OCI error of a response; fails when the body is not OCI error JSON."""
    try:
        body = response.json()
    except ValueError as exc:
        raise AssertionError(f"{response.status} is not OCI error JSON: {response.body[:300]!r}") from exc
    assert isinstance(body, dict) and body.get("errors"), f"{response.status}: {body!r}"
    return body["errors"][0]


def call(
    registry: RegistryProcess,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120,
) -> oci_client.Response:
    """One request on a fresh connection (http.client, so it can carry a body)."""
    conn = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return oci_client.Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, timeout: float = PROMPT) -> bytes:
    """Sends raw bytes and reads until the server closes or the first response is complete enough."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received:
                    break
    return received


def status_of(raw: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", raw)
    assert match, f"no HTTP status line in {raw[:200]!r}"
    return int(match.group(1))


def delete_cached(registry: RegistryProcess, name: str, tag: str) -> None:
    """Evicts a mirrored tag (the next pull exports again); fine when it was not cached."""
    resp = call(registry, "DELETE", f"/v2/{name}/manifests/{tag}?ns=docker.io")
    assert resp.status in (202, 404), (resp.status, resp.body)


@dataclass
class PushableImage:
    """A one-layer OCI image to push into the registry's own namespace (random, incompressible layer)."""

    name: str
    tag: str
    layer: bytes
    config: bytes = b""
    manifest: bytes = b""

    def __post_init__(self) -> None:
        config = {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(self.layer)]},
        }
        self.config = json.dumps(config).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(self.config), "size": len(self.config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": sha256(self.layer), "size": len(self.layer)}],
        }
        self.manifest = json.dumps(manifest).encode()

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


@dataclass
class PushProgress:
    blobs: list[str] = field(default_factory=list)
    manifest_acknowledged: bool = False


def upload_blob(
    registry: RegistryProcess, name: str, data: bytes, *, chunk: int | None = None, timeout: float = 120
) -> None:
    """A monolithic `POST ?digest=`, or (with `chunk`) POST + PATCHes with Content-Range + final PUT."""
    digest = sha256(data)
    if chunk is None:
        resp = call(
            registry, "POST", f"/v2/{name}/blobs/uploads/?digest={digest}", body=data, timeout=timeout
        )
        assert resp.status == 201, (resp.status, resp.body[:500])
        return
    resp = call(registry, "POST", f"/v2/{name}/blobs/uploads/", timeout=timeout)
    assert resp.status == 202, (resp.status, resp.body[:500])
    location = resp.headers["location"]
    for start in range(0, len(data), chunk):
        part = data[start : start + chunk]
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{start}-{start + len(part) - 1}",
        }
        resp = call(registry, "PATCH", location, body=part, headers=headers, timeout=timeout)
        assert resp.status == 202, (resp.status, resp.body[:500])
        location = resp.headers["location"]
    resp = call(registry, "PUT", f"{location}?digest={digest}", timeout=timeout)
    assert resp.status == 201, (resp.status, resp.body[:500])


def push(
    registry: RegistryProcess,
    image: PushableImage,
    *,
    chunk: int | None = None,
    progress: PushProgress | None = None,
) -> str:
    """Uploads config and layer, then PUTs the manifest under the tag; returns the manifest digest."""
    progress = progress or PushProgress()
    for blob in (image.config, image.layer):
        upload_blob(registry, image.name, blob, chunk=chunk)
        progress.blobs.append(sha256(blob))
    resp = call(
        registry,
        "PUT",
        f"/v2/{image.name}/manifests/{image.tag}",
        body=image.manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert resp.status == 201, (resp.status, resp.body[:500])
    assert resp.headers["docker-content-digest"] == image.digest
    progress.manifest_acknowledged = True
    return image.digest


def forget_pushed(registry: RegistryProcess, image: PushableImage) -> None:
    """Deletes a pushed image and its blobs, so the cache does not grow from trial to trial."""
    call(registry, "DELETE", f"/v2/{image.name}/manifests/{image.digest}")
    for blob in (image.config, image.layer):
        call(registry, "DELETE", f"/v2/{image.name}/blobs/{sha256(blob)}")


def pull_pushed(registry: RegistryProcess, image: PushableImage) -> None:
    pulled = oci_client.pull(registry.url, image.name, image.tag)
    assert pulled.digest == image.digest
    assert set(pulled.blobs) == {sha256(image.config), sha256(image.layer)}


# --------------------------------------------------------------------------- 1. SIGKILL at random points


@dataclass(frozen=True)
class MirrorImage:
    name: str  # the repository under ns=docker.io, e.g. library/crash-a
    tag: str


TRIALS = 24


def test_sigkill_at_random_points_of_exports_and_uploads(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    seed = int(os.environ.get("K3RD_FAULT_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"seed {seed} (rerun with K3RD_FAULT_SEED={seed})")
    rng = random.Random(seed)
    images = []
    for label, size, layers in (("a", 20, 2), ("b", 36, 3), ("c", 52, 4)):
        build_image(docker, f"crash-{label}:1", layers=layers, size=size * MiB, seed=f"crash-{label}")
        images.append(MirrorImage(f"library/crash-{label}", "1"))
    # One cache dir for all trials: the registry keeps it across kill() and start().
    registry = registry_under_test(docker, extra_args=[*NO_ZERO_COPY, "--no-load-pushed"])
    cache = registry.cache_dir

    # How long a cold export and a push take here, so the kills land before, inside and after them.
    export_seconds: dict[str, float] = {}
    for image in images:
        began = time.monotonic()
        oci_client.pull(registry.url, image.name, image.tag, ns="docker.io")
        export_seconds[image.name] = time.monotonic() - began
    probe = PushableImage("crash/pushed", "probe", rng.randbytes(30 * MiB))
    began = time.monotonic()
    push(registry, probe, chunk=8 * MiB)
    push_seconds = time.monotonic() - began
    forget_pushed(registry, probe)

    print(f"cold pulls {export_seconds}, push {push_seconds:.2f}s")
    acknowledged: dict[str, PushableImage] = {}  # pushed images the registry confirmed, by tag
    caught_writing = 0
    with ThreadPoolExecutor(1) as pool:
        for trial in range(TRIALS):
            kind = rng.choice(["export", "export", "monolithic", "chunked"])
            mark = len(registry.log_text())
            pushed: PushableImage | None = None
            progress = PushProgress()
            action: Future[object]
            if kind == "export":
                image = rng.choice(images)
                delete_cached(registry, image.name, image.tag)
                delay = rng.uniform(0, 1.3 * export_seconds[image.name])
                action = pool.submit(oci_client.pull, registry.url, image.name, image.tag, ns="docker.io")
                what = f"the export of {image.name}"
                exported = image
            else:
                pushed = PushableImage("crash/pushed", f"t{trial}", rng.randbytes(30 * MiB))
                chunk = rng.choice([1, 4, 8]) * MiB if kind == "chunked" else None
                delay = rng.uniform(0, 1.3 * push_seconds)
                action = pool.submit(push, registry, pushed, chunk=chunk, progress=progress)
                what = f"a {kind} push" + (f" in {chunk // MiB} MiB chunks" if chunk else "")
                exported = None
            # Half of the kills count from the first temp file, so many land while blobs are written.
            after = "the request"
            if rng.random() < 0.5:
                after = "its first temp file"
                delay /= 2
                wait_until(
                    lambda action=action: blob_temp_files(cache) or action.done(),
                    timeout=PROMPT,
                    interval=0.002,
                    what="a temp file",
                )
            time.sleep(delay)
            registry.kill()
            try:
                action.result(timeout=PROMPT)
                finished = True
            except Exception:  # cut off by the kill, however it shows
                finished = False
            where = f"seed {seed}, trial {trial}: SIGKILL {delay:.3f}s after {after} of {what}"
            left = blob_temp_files(cache)
            caught_writing += bool(left)
            try:
                # The crash state: whatever reached a final name is complete and verified.
                verify_blobs(cache)
                restart = len(registry.log_text())
                registry.start()
                assert temp_files(cache) == [], "temp files survived the restart"
                assert "ignoring unreadable record" not in log_since(registry, mark), "a record was torn"
                if pushed is not None and progress.manifest_acknowledged:
                    acknowledged[pushed.tag] = pushed
                if exported is not None and finished:
                    # A pull that completed is served from the cache after the crash, not exported again.
                    oci_client.pull(registry.url, exported.name, exported.tag, ns="docker.io")
                    assert "exporting" not in log_since(registry, restart), "a finished export was lost"
                # Never lose: every push the registry acknowledged is still there, byte for byte.
                for earlier in acknowledged.values():
                    pull_pushed(registry, earlier)
                # Every image pulls (re-exported if the kill interrupted it), every digest verified.
                for image in images:
                    oci_client.pull(registry.url, image.name, image.tag, ns="docker.io")
                # Pushing works again; an interrupted push completes when sent again.
                again = pushed or PushableImage("crash/pushed", f"t{trial}", rng.randbytes(1 * MiB))
                push(registry, again, chunk=rng.choice([None, 4 * MiB]))
                pull_pushed(registry, again)
                acknowledged[again.tag] = again
                verify_blobs(cache)
            except BaseException as exc:
                exc.add_note(where)
                raise
            print(f"{where}: ok ({len(left)} temp files at the kill, {'finished' if finished else 'cut'})")
            # The cache does not grow from trial to trial: only the last pushed image stays.
            for tag in [t for t in acknowledged if t != again.tag]:
                forget_pushed(registry, acknowledged.pop(tag))
    print(f"{TRIALS} trials, {caught_writing} of them killed while blobs were being written")
    # Not a timing assertion: a guard that the trials test what they claim to.
    assert caught_writing > 0, f"seed {seed}: no kill landed while a blob was being written"


# --------------------------------------------------------------------------- 2. dockerd going away mid-way
# test_mirror.py covers dockerd SIGKILLed under one request waiting for an export. Here several requests
# wait for the same export, dockerd is also stopped the ordinary way (SIGTERM, then its containerd), and
# it goes away while it pulls from an upstream for the registry.


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_dockerd_going_away_mid_export_answers_every_waiter(
    how: str, docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    """`stop` is SIGTERM: dockerd may finish the save it is streaming before it exits, and then the
    waiters rightly get the image; or it ends the save early, with an error answer or by closing its
    stream cleanly before the tar's end (the proxy's `short` fault), and the export is rejected (502); or
    the connection drops (503). `kill` cuts the stream: every waiter gets 503. Either way all waiters get
    the same answer promptly, and nothing half-written stays."""
    name = f"gone-{how}"
    build_image(docker, f"{name}:1", layers=4, size=200 * MiB, seed=name)
    registry = registry_under_test(docker, extra_args=NO_ZERO_COPY)
    url = f"{registry.url}/v2/{name}/manifests/1"
    try:
        with ThreadPoolExecutor(3) as pool:
            waiters = [pool.submit(oci_client.request, url, headers=ACCEPT, timeout=120) for _ in range(3)]
            wait_for_log(registry, rf"exporting docker\.io/library/{name}:1")
            # Each waiter counts a cache miss right before it joins the export.
            wait_until(lambda: cache_misses(registry) == 3, timeout=PROMPT, what="three waiters")
            if how == "stop":
                docker.stop()
            else:
                docker.kill()
            responses = [waiter.result(timeout=PROMPT) for waiter in waiters]
        log = registry.log_text()
        assert temp_files(registry.cache_dir) == [], "the interrupted export left temp files"
        verify_blobs(registry.cache_dir)
    finally:
        docker.start()
    assert log.count(f"exporting docker.io/library/{name}:1") == 1, "the waiters did not share one export"
    statuses = {response.status for response in responses}
    trouble = [line for line in log.splitlines() if " ERROR " in line or " WARNING " in line]
    expected = ({503},) if how == "kill" else ({200}, {502}, {503})
    assert statuses in expected, f"{statuses}\n" + "\n".join(trouble)
    if statuses == {502}:
        # Docker's error answer ("failed") or its short stream ("rejected"), said in the log.
        export_lines = [line for line in trouble if f"export of docker.io/library/{name}:1 " in line]
        assert any(" rejected: " in line or " failed: " in line for line in export_lines), "\n".join(trouble)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_dockerd_going_away_mid_pull_answers_503_and_recovers(
    how: str,
    docker: Dockerd,
    docker20: Dockerd,
    upstream: UpstreamRegistry,
    registry_under_test: RegistryFactory,
) -> None:
    """dockerd pulling an image from the upstream for the registry goes away: that is Docker being
    unavailable (503, naming DOCKER_HOST), whether it was stopped (it then cancels the pull and says so
    in the progress stream) or killed (the stream breaks)."""
    built = build_image(docker20, f"pull-{how}-src:1", layers=4, size=100 * MiB, seed=f"pull-{how}")
    pushed = push_image(docker20, built, upstream, f"team/pull-{how}", "v1")
    registry = registry_under_test(docker)
    url = f"{registry.url}/v2/team/pull-{how}/manifests/v1?ns={upstream.addr}"
    try:
        with ThreadPoolExecutor(1) as pool:
            waiter = pool.submit(oci_client.request, url, headers=ACCEPT, timeout=120)
            wait_for_log(registry, re.escape(f"pulling {pushed.ref} through Docker"))
            if how == "stop":
                docker.stop()
            else:
                docker.kill()
            response = waiter.result(timeout=PROMPT)
        log = registry.log_text()
    finally:
        docker.start()
    assert "exporting" not in log, "the pull was not interrupted: make the image bigger"
    assert temp_files(registry.cache_dir) == []
    # Docker is back: the same pull succeeds.
    pulled = oci_client.pull(registry.url, f"team/pull-{how}", "v1", ns=upstream.addr)
    assert len(pulled.manifest["layers"]) == built.layer_count
    assert docker.image_id(pushed.ref)
    # What the interrupted request was told.
    error = error_of(response)
    assert (response.status, error["code"]) == (503, "UNAVAILABLE"), (response.status, error)
    assert docker.host in error["message"], error


# --------------------------------------------------------------------------- 3. dockerd down


def test_docker_down_serves_cached_tags_and_digests_and_readyz_says_why(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker, "down-cached:1", layers=2, size=2 * MiB, seed="down-cached")
    registry = registry_under_test(docker, extra_args=NO_ZERO_COPY)
    own = oci_client.pull(registry.url, "down-cached", "1")
    mirrored = oci_client.pull(registry.url, "library/down-cached", "1", ns="docker.io")
    assert oci_client.request(f"{registry.url}/readyz").status == 200
    mark = len(registry.log_text())
    docker.stop()
    try:
        assert oci_client.pull(registry.url, "down-cached", "1").digest == own.digest
        assert oci_client.pull(registry.url, "library/down-cached", "1", ns="docker.io").digest == own.digest
        # Served as it was, and the log says so.
        assert re.search(
            r"serving cached \S*down-cached:1 \(sha256:[0-9a-f]{64}\) as it was", log_since(registry, mark)
        )
        # Digests never need Docker.
        assert oci_client.pull(registry.url, "down-cached", own.digest).digest == own.digest
        by_digest = oci_client.pull(registry.url, "library/down-cached", mirrored.digest, ns="docker.io")
        assert by_digest.blobs == mirrored.blobs
        # A push needs no Docker either (loading it into Docker is what fails, in the background).
        pushed = PushableImage("down/pushed", "1", random.Random("down").randbytes(1 * MiB))
        push(registry, pushed)
        pull_pushed(registry, pushed)

        ready = oci_client.request(f"{registry.url}/readyz")
        assert ready.status == 503
        problems = ready.json()["problems"]
        assert set(problems) == {"docker"}, problems
        assert docker.host in problems["docker"]
        assert oci_client.request(f"{registry.url}/healthz").status == 200
    finally:
        docker.start()
    wait_until(
        lambda: oci_client.request(f"{registry.url}/readyz").status == 200, timeout=PROMPT, what="readyz 200"
    )
    pull_pushed(registry, pushed)


# --------------------------------------------------------------------------- 4. the cache fills up


@contextlib.contextmanager
def tmpfs(size_mib: int) -> Iterator[Path]:
    """A fresh tmpfs of `size_mib` MiB (needs root); unmounted when done."""
    root = make_temp_dir("tmpfs")
    mountpoint = root / "mnt"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        remove_tree(root)
        pytest.skip(f"cannot mount a tmpfs (root needed): {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        remove_tree(root)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def test_full_cache_filesystem_fails_cleanly_and_recovers(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker, "fits:1", layers=1, size=4 * MiB, seed="fits")
    build_image(docker, "too-big:1", layers=3, size=60 * MiB, seed="too-big")
    with tmpfs(128) as disk:
        cache = disk / "cache"
        registry = registry_under_test(
            docker, cache_dir=cache, extra_args=[*NO_ZERO_COPY, "--no-load-pushed"]
        )
        try:
            small = oci_client.pull(registry.url, "fits", "1")
            # Leave 30 MiB: the small image keeps serving, the big one cannot be stored.
            filler = disk / "filler"
            filler.write_bytes(b"\0" * (free_bytes(disk) - 30 * MiB))

            # Where the disk ends differs from one attempt to the next (stream chunks, buffered writes).
            for attempt in range(3):
                mark = len(registry.log_text())
                failed = oci_client.request(f"{registry.url}/v2/too-big/manifests/1", headers=ACCEPT)
                assert 500 <= failed.status < 600, (failed.status, failed.body)
                assert temp_files(cache) == [], f"attempt {attempt}: the failed export left temp files"
                verify_blobs(cache)
                error = error_of(failed)
                assert str(cache) in error["message"] + log_since(registry, mark), error
            assert oci_client.pull(registry.url, "fits", "1").digest == small.digest

            # A blob upload that does not fit: it fails, and nothing of it is left behind.
            big = PushableImage("full/pushed", "1", random.Random("full").randbytes(40 * MiB))
            digest = sha256(big.layer)
            mark = len(registry.log_text())
            path = f"/v2/{big.name}/blobs/uploads/"
            monolithic = call(registry, "POST", f"{path}?digest={digest}", body=big.layer)
            assert 500 <= monolithic.status < 600, (monolithic.status, monolithic.body)
            assert blob_temp_files(cache) == [], "the refused upload left its temp file"
            assert call(registry, "HEAD", f"/v2/{big.name}/blobs/{digest}").status == 404
            # Sent as one chunk: the upload is dropped (404, the client starts over), or it keeps what
            # reached the disk until the client cancels it, which frees the space...
            headers = {"Content-Range": f"0-{len(big.layer) - 1}", "Content-Type": "application/octet-stream"}
            cancelled = call(registry, "POST", path).headers["location"]
            chunked = call(registry, "PATCH", cancelled, body=big.layer, headers=headers)
            assert 500 <= chunked.status < 600, (chunked.status, chunked.body)
            if call(registry, "GET", cancelled).status == 204:
                assert call(registry, "DELETE", cancelled).status == 204
            assert call(registry, "GET", cancelled).status == 404
            assert blob_temp_files(cache) == [], "the failed upload left its temp file"
            # ... or, when kept, can be resumed once there is space again.
            kept = call(registry, "POST", path).headers["location"]
            assert 500 <= call(registry, "PATCH", kept, body=big.layer, headers=headers).status < 600
            verify_blobs(cache)

            # Space again: the same pull and push succeed.
            filler.unlink()
            assert len(oci_client.pull(registry.url, "too-big", "1").manifest["layers"]) == 4
            if call(registry, "GET", kept).status == 204:
                resume_upload(registry, kept, big.layer)
            push(registry, big)
            pull_pushed(registry, big)
            verify_blobs(cache)
            assert blob_temp_files(cache) == []

            # The upload errors were OCI errors that say what happened and where.
            for response in (monolithic, chunked):
                error = error_of(response)
                assert str(cache) in error["message"] + log_since(registry, mark), error
        finally:
            registry.stop()


def fill(disk: Path) -> None:
    """Writes a filler file until the filesystem has no byte left."""
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as filler:
        while True:
            filler.write(b"\0" * (1 << 20))
            filler.flush()


def test_blob_writer_that_hits_a_full_disk_leaves_no_temp_file() -> None:
    """What the test above catches now and then, every time: bytes still in the temp file's buffer
    meet a full disk when the blob is committed or aborted; the temp file must go all the same."""
    with tmpfs(4) as disk:
        store = Store(disk / "cache")
        store.open()
        fill(disk)
        committed = store.writer()
        committed.write(b"x" * 1000)  # small enough to wait in the file's buffer
        with pytest.raises(OSError):
            committed.commit()
        aborted = store.writer()
        aborted.write(b"y" * 1000)
        with contextlib.suppress(OSError):
            aborted.abort()
        assert temp_files(store.root) == [], "temp files of failed blob writes stay on the full disk"


# --------------------------------------------------------------------------- 5. clients that vanish


def wait_for_fds(pid: int, baseline: int) -> None:
    """The registry's open files come back to `baseline` (connections and temp files released)."""
    wait_until(lambda: fd_count(pid) <= baseline, timeout=PROMPT, what=f"at most {baseline} open fds")


def resume_upload(registry: RegistryProcess, location: str, data: bytes) -> int:
    """Finishes an upload the resumable way: asks where it stands, sends the rest from there, PUTs.

    A request the server has not finished noticing may still move the offset: a 416 says so, retry."""
    for _ in range(50):
        status = call(registry, "GET", location)
        assert status.status == 204, (status.status, status.body)
        offset = int(status.headers["range"].split("-")[1]) + 1 if status.headers["range"] != "0-0" else 0
        assert offset <= len(data)
        rest = data[offset:]
        headers = {"Content-Type": "application/octet-stream"}
        if rest:
            headers["Content-Range"] = f"{offset}-{len(data) - 1}"
        resp = call(registry, "PATCH", status.headers["location"], body=rest, headers=headers)
        if resp.status == 416:
            time.sleep(0.1)
            continue
        assert resp.status == 202, (resp.status, resp.body)
        done = call(registry, "PUT", f"{resp.headers['location']}?digest={sha256(data)}")
        assert done.status == 201, (done.status, done.body)
        return offset
    raise AssertionError(f"upload {location} never settled")


def vanish_mid_patch(registry: RegistryProcess, location: str, data: bytes, sent: int) -> None:
    """A PATCH that declares all of `data` but sends only `sent` bytes before the client goes away."""
    with socket.create_connection(("127.0.0.1", registry.port), timeout=PROMPT) as sock:
        head = (
            f"PATCH {location} HTTP/1.1\r\nHost: {registry.addr}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        sock.sendall(head.encode() + data[:sent])


def test_client_disconnects_mid_blob_and_mid_upload(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker, "vanishing:1", layers=1, size=64 * MiB, seed="vanishing", busybox=False)
    registry = registry_under_test(docker)
    pulled = oci_client.pull(registry.url, "vanishing", "1")
    layer = max(pulled.blobs, key=lambda digest: pulled.blobs[digest])
    assert registry.pid is not None
    baseline = fd_count(registry.pid)

    # Blob downloads abandoned after a few KB: half with a normal close, half with a reset.
    for attempt in range(10):
        sock = socket.create_connection(("127.0.0.1", registry.port), timeout=PROMPT)
        sock.sendall(f"GET /v2/vanishing/blobs/{layer} HTTP/1.1\r\nHost: {registry.addr}\r\n\r\n".encode())
        received = b""
        while len(received) < 16 * 1024:
            chunk = sock.recv(65536)
            assert chunk, "the registry closed the connection first"
            received += chunk
        assert status_of(received) == 200
        if attempt % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    assert oci_client.request(f"{registry.url}/v2/").status == 200
    assert oci_client.pull(registry.url, "vanishing", "1").blobs == pulled.blobs
    wait_for_fds(registry.pid, baseline)

    # An upload whose PATCH breaks off halfway resumes from the offset the registry reports.
    data = random.Random("vanishing-upload").randbytes(8 * MiB)
    location = call(registry, "POST", "/v2/vanishing/pushed/blobs/uploads/").headers["location"]
    sent = len(data) // 2 + 12345
    vanish_mid_patch(registry, location, data, sent=sent)
    resumed_from = resume_upload(registry, location, data)
    assert 0 <= resumed_from <= sent
    print(f"sent {sent} bytes before vanishing; the upload resumed from {resumed_from}")
    blob = call(registry, "GET", f"/v2/vanishing/pushed/blobs/{sha256(data)}")
    assert (blob.status, sha256(blob.body)) == (200, sha256(data))

    # One abandoned the same way and then cancelled leaves nothing.
    location = call(registry, "POST", "/v2/vanishing/pushed/blobs/uploads/").headers["location"]
    vanish_mid_patch(registry, location, data, sent=len(data) // 3)
    assert call(registry, "DELETE", location).status == 204
    assert call(registry, "GET", location).status == 404
    wait_until(lambda: blob_temp_files(registry.cache_dir) == [], timeout=PROMPT, what="no upload temp file")

    assert registry.running
    assert oci_client.request(f"{registry.url}/v2/").status == 200
    wait_for_fds(registry.pid, baseline)


# --------------------------------------------------------------------------- 6. slow and oversized requests


def test_slowloris_connections_do_not_block_other_clients(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker, "patient:1", layers=1, size=2 * MiB, seed="patient")
    registry = registry_under_test(docker)
    pulled = oci_client.pull(registry.url, "patient", "1")
    layer = next(iter(pulled.manifest["layers"]))["digest"]
    assert registry.pid is not None
    baseline = fd_count(registry.pid)

    header = f"GET /v2/ HTTP/1.1\r\nHost: {registry.addr}\r\nX-Slow: {'s' * 200}".encode()
    sockets = [socket.create_connection(("127.0.0.1", registry.port), timeout=PROMPT) for _ in range(50)]
    stop = threading.Event()

    def trickle() -> None:
        for position in range(len(header)):
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.send(header[position : position + 1])
            if stop.wait(1.0):
                return

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        for _ in range(6):
            time.sleep(0.5)
            assert oci_client.request(f"{registry.url}/v2/", timeout=PROMPT).status == 200
            manifest = oci_client.request(
                f"{registry.url}/v2/patient/manifests/1", headers=ACCEPT, timeout=PROMPT
            )
            assert manifest.status == 200
            blob = oci_client.request(f"{registry.url}/v2/patient/blobs/{layer}", timeout=PROMPT)
            assert sha256(blob.body) == layer
        assert trickler.is_alive(), "the slow clients were done before the others were served"
    finally:
        stop.set()
        trickler.join()
        for sock in sockets:
            sock.close()
    assert registry.running
    wait_for_fds(registry.pid, baseline)


@pytest.mark.parametrize(
    "request_head",
    [
        pytest.param(
            "GET /v2/{long}/manifests/1 HTTP/1.1\r\nHost: {addr}\r\n\r\n", id="request line over 8190 bytes"
        ),
        pytest.param(
            "GET /v2/ HTTP/1.1\r\nHost: {addr}\r\nX-Big: {long}\r\n\r\n", id="header over 8190 bytes"
        ),
        pytest.param("GET /v2/ HTTP/1.1\r\nHost: {addr}\r\n{many}\r\n", id="200 headers"),
        pytest.param(
            "PATCH {upload} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: -1\r\n\r\n",
            id="PATCH, negative Content-Length",
        ),
        pytest.param(
            "PATCH {upload} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {huge}\r\n\r\n",
            id="PATCH, Content-Length over 2^64",
        ),
        pytest.param(
            "PATCH {upload} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 12ab\r\n\r\n",
            id="PATCH, Content-Length not a number",
        ),
        pytest.param(
            "PATCH {upload} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            id="PATCH, two Content-Lengths",
        ),
        pytest.param(
            "PUT /v2/limits/manifests/1 HTTP/1.1\r\nHost: {addr}\r\nContent-Length: -5\r\n\r\n",
            id="PUT manifest, negative Content-Length",
        ),
        pytest.param(
            "PUT /v2/limits/manifests/1 HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {huge}\r\n\r\n",
            id="PUT manifest, Content-Length over 2^64",
        ),
        pytest.param(
            "PUT {upload}?digest=sha256:{zeros} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: -1\r\n\r\n",
            id="PUT upload, negative Content-Length",
        ),
    ],
)
def test_oversized_and_malformed_requests_get_4xx(
    request_head: str, docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    registry = registry_under_test(docker)
    upload = call(registry, "POST", "/v2/limits/blobs/uploads/").headers["location"]
    raw = request_head.format(
        addr=registry.addr,
        long="a" * 9000,
        many="".join(f"X-Header-{i}: {i}\r\n" for i in range(200)),
        upload=upload,
        huge="9" * 30,
        zeros="0" * 64,
    )
    answer = raw_exchange(registry.port, raw.encode())
    assert 400 <= status_of(answer) < 500, answer[:300]
    # The server stays up and the upload it refused data for is unharmed.
    assert oci_client.request(f"{registry.url}/v2/").status == 200
    status = call(registry, "GET", upload)
    assert (status.status, status.headers.get("range")) == (204, "0-0"), (status.status, status.headers)


def test_manifest_larger_than_the_limit_is_refused_without_reading_it_all(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    """A PUT declaring a 1 TiB manifest is refused (4xx) once more than the 4 MiB limit has arrived."""
    registry = registry_under_test(docker)
    with socket.create_connection(("127.0.0.1", registry.port), timeout=PROMPT) as sock:
        head = (
            f"PUT /v2/limits/manifests/1 HTTP/1.1\r\nHost: {registry.addr}\r\n"
            f"Content-Type: {OCI_MANIFEST}\r\nContent-Length: {1 << 40}\r\n\r\n"
        )
        sock.sendall(head.encode())
        with contextlib.suppress(OSError):  # the server may close while the client still sends
            sock.sendall(b"{" + b" " * (5 * MiB))
        answer = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
    assert 400 <= status_of(answer) < 500, answer[:300]
    assert oci_client.request(f"{registry.url}/v2/").status == 200
