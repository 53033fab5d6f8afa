"""The fuzz corpus and a smaller hypothesis run against the real registry process on Docker 26.

Same requests and properties as tests/unit/test_fuzz.py (tests/fuzz_requests.py), sent with raw
`http.client` so encoded paths arrive unnormalized; afterwards the process is alive, still answers `/v2/`,
its log has no traceback, and nothing appeared in its directory outside the cache or in the cache outside
the store's layout. `ns` only ever names a closed local port, so Docker's pulls fail fast instead of
reaching for the internet.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile

import pytest

from ..fuzz_requests import (
    CORPUS,
    Request,
    Seeds,
    Tally,
    cache_strays,
    corpus_fields,
    fuzz,
    send,
    send_recorded,
    tree,
)
from .daemons import Dockerd, RegistryFactory, RegistryProcess
from .images import build_image

EXAMPLES = int(os.environ.get("K3RD_FUZZ_WORLD_EXAMPLES", "600"))
CLOSED_REGISTRY = "127.0.0.1:1"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def tiny_image() -> tuple[bytes, bytes, dict[str, object]]:
    """Config, one layer (a tar with one file) and the OCI manifest of a small image Docker can load."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        data = b"fuzzed into existence\n"
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mtime = len(data), 1_700_000_000
        tar.addfile(info, io.BytesIO(data))
    layer = buffer.getvalue()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/hello.txt"]},
            "rootfs": {"type": "layers", "diff_ids": [sha(layer)]},
        },
        sort_keys=True,
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha(layer), "size": len(layer)}],
    }
    return config, layer, manifest


_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+) ", re.MULTILINE)


def records_with_tracebacks(log: str) -> list[tuple[str, str]]:
    """(level, text) of every log record that carries a traceback."""
    starts = list(_RECORD_START.finditer(log))
    found = []
    for match, following in zip(starts, [*starts[1:], None], strict=True):
        text = log[match.start() : following.start() if following else len(log)]
        if "Traceback (most recent call last)" in text:
            found.append((match["level"], text))
    return found


def last_line(record: str) -> str:
    """The exception line of a traceback record (`ValueError: …`)."""
    lines = [line for line in record.strip().splitlines() if line and not line.startswith(" ")]
    return lines[-1][:200]


def seed(registry: RegistryProcess, daemon: Dockerd) -> Seeds:
    """An image exported from Docker, one pushed into the registry, and open uploads."""
    build_image(daemon, "fuzz-app:1", layers=1, size=64 << 10, seed="fuzz", busybox=False)
    host, port = "127.0.0.1", registry.port
    pulled = send(host, port, Request("GET", "/v2/fuzz-app/manifests/1", (("Accept", OCI_MANIFEST),)))
    assert pulled.status == 200, pulled.describe()
    exported = json.loads(pulled.body)
    layer_digest = exported["layers"][0]["digest"]

    config, layer, manifest = tiny_image()
    for blob in (config, layer):
        answer = send(
            host, port, Request("POST", f"/v2/fuzz/pushed/blobs/uploads/?digest={sha(blob)}", (), blob)
        )
        assert answer.status == 201, answer.describe()
    body = json.dumps(manifest).encode()
    answer = send(
        host, port, Request("PUT", "/v2/fuzz/pushed/manifests/v1", (("Content-Type", OCI_MANIFEST),), body)
    )
    assert answer.status == 201, answer.describe()
    uploads = []
    for _ in range(3):
        answer = send(host, port, Request("POST", "/v2/fuzz/pushed/blobs/uploads/"))
        assert answer.status == 202, answer.describe()
        uploads.append(("fuzz/pushed", answer.headers["location"].rpartition("/")[2]))
    return Seeds(
        names=["fuzz-app", "library/fuzz-app", "fuzz/pushed", "nothing/here"],
        tags=["1", "v1", "latest"],
        digests=[sha(pulled.body), exported["config"]["digest"], layer_digest, sha(config), sha(body)],
        blobs=[("fuzz-app", layer_digest), ("fuzz/pushed", sha(layer)), ("fuzz/pushed", sha(config))],
        pushed_repo="fuzz/pushed",
        config=sha(config),
        manifest_digest=sha(body),
        manifest=manifest,
        uploads=uploads,
        ns_values=[CLOSED_REGISTRY, "localhost:1"],
    )


def test_corpus_and_hypothesis_against_the_real_registry(
    docker: Dockerd, registry_under_test: RegistryFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = registry_under_test(docker)
    seeds = seed(registry, docker)
    before = tree(registry.root, skip=[registry.cache_dir, registry.log_path])
    host, port = "127.0.0.1", registry.port
    tally = Tally()

    fields = corpus_fields(seeds)
    for nasty in CORPUS:
        request = nasty.resolve(fields)
        if nasty.plain_4xx:
            answer = send(host, port, request)
            tally.record(request, answer, plain_4xx=True)
            assert 400 <= answer.status < 500, answer.describe()
        else:
            send_recorded(host, port, seeds, request, tally)
    corpus_count = tally.tried
    fuzz(host, port, seeds, tally, max_examples=EXAMPLES)
    with capsys.disabled():
        statuses = dict(sorted(tally.statuses.items()))
        print(
            f"\ntest_fuzz_world: {tally.tried} requests ({corpus_count} of the corpus), statuses {statuses}"
        )
    print(tally.report())

    base = send(host, port, Request("GET", "/v2/"))
    traced = records_with_tracebacks(registry.log_text())
    # The registry under test runs at --log-level debug: DEBUG records may carry tracebacks on purpose.
    # Anything above DEBUG with a traceback is a failure, including aiohttp's ERROR for a request its HTTP
    # parser refuses (the request line over 8190 bytes): any client can put those into the log.
    tracebacks = [text for level, text in traced if level != "DEBUG"]
    assert registry.running and base.status == 200, f"the registry died or stopped answering: {base}"
    assert tree(registry.root, skip=[registry.cache_dir, registry.log_path]) == before
    assert cache_strays(registry.cache_dir) == []
    assert tally.tried >= len(CORPUS) + EXAMPLES
    assert not tally.examples and not tracebacks, (
        f"problems found:\n{tally.report()}\n"
        f"{len(tracebacks)} log records with a traceback, ending in:\n"
        + "\n".join(f"  {last_line(text)}" for text in tracebacks)
        + (f"\nthe first:\n{tracebacks[0][:3000]}" if tracebacks else "")
    )
