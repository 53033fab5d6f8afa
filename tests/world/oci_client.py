"""A plain OCI pull client (manifest + every blob, in parallel, each digest verified) for tests and bench."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "*/*",
    ]
)
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Pulled:
    digest: str
    media_type: str
    manifest: dict[str, Any]
    blobs: dict[str, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(self.blobs.values())


def request(
    url: str, *, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 300
) -> Response:
    """One HTTP request; errors come back as a Response, not an exception."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        return Response(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


def metric(base: str, name: str, **labels: str) -> float:
    """A sample of the registry's /metrics at `base`; 0 for a labelled child not yet counted."""
    text = request(f"{base}/metrics").body.decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _url(base: str, name: str, kind: str, ref: str, ns: str | None) -> str:
    url = f"{base}/v2/{name}/{kind}/{ref}"
    return f"{url}?{urllib.parse.urlencode({'ns': ns})}" if ns else url


def fetch_blob(base: str, name: str, digest: str, ns: str | None) -> int:
    """Streams a blob, hashing it; returns its size. Raises if the bytes do not match the digest."""
    hasher = hashlib.sha256()
    size = 0
    with urllib.request.urlopen(_url(base, name, "blobs", digest, ns), timeout=600) as resp:
        while chunk := resp.read(1 << 20):
            hasher.update(chunk)
            size += len(chunk)
    got = f"sha256:{hasher.hexdigest()}"
    if got != digest:
        raise AssertionError(f"blob {digest} hashed to {got}")
    return size


def pull(
    base: str,
    name: str,
    ref: str,
    *,
    ns: str | None = None,
    platform: tuple[str, str] = ("linux", "amd64"),
    parallel: int = 8,
) -> Pulled:
    """Fetches the manifest (resolving an index to `platform`) and all blobs; verifies every digest."""
    resp = request(_url(base, name, "manifests", ref, ns), headers={"Accept": MANIFEST_ACCEPT})
    if resp.status != 200:
        raise AssertionError(f"manifest {name}:{ref} -> {resp.status} {resp.body[:500]!r}")
    digest = resp.headers["docker-content-digest"]
    if f"sha256:{hashlib.sha256(resp.body).hexdigest()}" != digest:
        raise AssertionError(f"manifest body does not hash to {digest}")
    manifest = resp.json()
    media_type = resp.headers["content-type"]
    if media_type in INDEX_TYPES:
        child = next(
            m
            for m in manifest["manifests"]
            if (m.get("platform") or {}).get("os") == platform[0]
            and (m.get("platform") or {}).get("architecture") == platform[1]
        )
        inner = pull(base, name, child["digest"], ns=ns, platform=platform, parallel=parallel)
        return Pulled(digest, media_type, manifest, inner.blobs)
    digests = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    with ThreadPoolExecutor(parallel) as pool:
        sizes = list(pool.map(lambda d: fetch_blob(base, name, d, ns), digests))
    return Pulled(digest, media_type, manifest, dict(zip(digests, sizes, strict=True)))
