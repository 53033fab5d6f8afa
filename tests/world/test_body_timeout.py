"""A client that stops sending a request body (manifest PUT, upload PATCH or PUT) gets an error within
--body-timeout, its upload is dropped with its temp file and its slot freed; uploads beyond --max-uploads
get 429. Against a running registry, with a raw socket that sends the headers and part of the body."""

from __future__ import annotations

import json
import random
import socket

from . import oci_client
from .daemons import Dockerd, RegistryFactory, RegistryProcess, wait_until
from .test_faults import PROMPT, blob_temp_files, call, sha256, status_of

REPO = "stalled/app"
UPLOADS = f"/v2/{REPO}/blobs/uploads/"


def stall(registry: RegistryProcess, method: str, path: str, announced: int, sent: bytes) -> tuple[int, dict]:
    """Sends the headers announcing `announced` bytes and only `sent`, then waits: the registry's answer
    (status, OCI error JSON) once it has closed the connection."""
    with socket.create_connection(("127.0.0.1", registry.port), timeout=PROMPT) as sock:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {registry.addr}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {announced}\r\n\r\n"
        )
        sock.sendall(head.encode() + sent)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    header, _, body = received.partition(b"\r\n\r\n")
    assert b"connection: close" in header.lower()
    return status_of(received), json.loads(body)


def test_a_stalled_body_is_given_up_on_and_frees_its_upload(
    docker26: Dockerd, registry_under_test: RegistryFactory
) -> None:
    registry = registry_under_test(docker26, extra_args=["--body-timeout", "2s", "--max-uploads", "2"])
    data = random.Random("stalled").randbytes(1 << 20)
    stalled = call(registry, "POST", UPLOADS).headers["location"]
    waiting = call(registry, "POST", UPLOADS).headers["location"]
    # Both slots are taken.
    refused = call(registry, "POST", UPLOADS)
    assert refused.status == 429 and int(refused.headers["retry-after"]) > 0
    assert refused.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert len(blob_temp_files(registry.cache_dir)) == 2

    # A PATCH that sends 64 KiB of the 1 MiB it announces, then nothing.
    status, error = stall(registry, "PATCH", stalled, len(data), data[: 64 * 1024])
    assert status == 408 and error["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
    assert "no bytes of the body arrived for 2" in error["errors"][0]["message"]
    assert call(registry, "GET", stalled).status == 404
    wait_until(lambda: len(blob_temp_files(registry.cache_dir)) == 1, timeout=PROMPT, what="one temp file")
    assert f"to docker.io/{REPO} dropped" in registry.log_text()

    # Its slot is free: a whole upload in one POST goes through.
    done = call(registry, "POST", f"{UPLOADS}?digest={sha256(data)}", body=data)
    assert done.status == 201, done.body

    # A final PUT that stalls commits nothing.
    status, error = stall(registry, "PUT", f"{waiting}?digest={sha256(b'x' * 1000)}", 1000, b"x" * 10)
    assert status == 408
    assert call(registry, "HEAD", f"/v2/{REPO}/blobs/{sha256(b'x' * 1000)}").status == 404

    # A manifest PUT that stalls stores nothing.
    status, error = stall(registry, "PUT", f"/v2/{REPO}/manifests/v1", 1000, b'{"schemaVersion": 2')
    assert status == 408 and error["errors"][0]["code"] == "MANIFEST_INVALID"
    assert call(registry, "GET", f"/v2/{REPO}/manifests/v1").status == 404

    wait_until(lambda: blob_temp_files(registry.cache_dir) == [], timeout=PROMPT, what="no upload temp file")
    assert oci_client.metric(registry.url, "k3d_registry_uploads_in_progress") == 0
    assert oci_client.metric(registry.url, "k3d_registry_stalled_bodies_total", kind="upload") == 2
    assert oci_client.metric(registry.url, "k3d_registry_stalled_bodies_total", kind="manifest") == 1
    assert registry.running and oci_client.request(f"{registry.url}/v2/").status == 200
