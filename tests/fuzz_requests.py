"""Hostile HTTP requests for the registry, and the properties every answer must have.

Shared by tests/unit/test_fuzz.py (the in-process app over a fake Docker) and tests/world/test_fuzz_world.py
(the real registry process): hypothesis strategies for requests, a fixed corpus of nasty ones, a raw
`http.client` sender (paths go out exactly as written: `..`, `%2e%2e`, `%2F`, `%00` are not normalized)
and the checks:

- no answer is a 5xx (and every request gets an answer), except the README's 502/503 UNAVAILABLE for a
  request whose `ns` names a registry Docker cannot pull from;
- a 4xx under /v2/ carries OCI error JSON with a code from `errors.STATUS_BY_CODE` (a 416 that answers a
  `Range` on a blob is exempt: it is aiohttp's FileResponse with `Content-Range: bytes */<size>`, the
  spec's JSON body being a MAY);
- a 206 carries exactly the bytes its Content-Range names.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from k3d_registry_dockerd.cache.verified import FILE as VERIFIED_FILE
from k3d_registry_dockerd.oci.errors import STATUS_BY_CODE
from k3d_registry_dockerd.sources.known import STATE_FILE as KNOWN_FILE

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
METHODS = ("GET", "HEAD", "PUT", "POST", "PATCH", "DELETE")
# aiohttp refuses request lines and header fields over 8190 bytes in its HTTP parser, before the app
# sees them (400, text/plain); generated requests stay below that.
MAX_LINE = 8000
# Python refuses to turn more than 4300 digits into an int (ValueError): a number the registry parses.
HUGE_DIGITS = "9" * 4400


def enc(text: str) -> str:
    """Percent-encodes everything but unreserved characters: safe in a path segment or query value."""
    return urllib.parse.quote(text, safe="")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# ---- requests ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    # Sent as written: already percent-encoded where it must be, hostile where it should be.
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None

    def describe(self) -> str:
        headers = "".join(f" [{k}: {v[:80]}]" for k, v in self.headers)
        body = "" if self.body is None else f" body={self.body[:120]!r}{'…' if len(self.body) > 120 else ''}"
        path = self.path if len(self.path) <= 300 else f"{self.path[:300]}…({len(self.path)} chars)"
        return f"{self.method} {path}{headers}{body}"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def describe(self) -> str:
        return f"{self.status} {self.headers.get('content-type', '-')} {self.body[:300]!r}"


def send(host: str, port: int, request: Request, timeout: float = 60.0) -> Answer:
    """One request on a fresh connection; the path is not validated or normalized by the client."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.putrequest(request.method, request.path, skip_accept_encoding=True)
        for key, value in request.headers:
            connection.putheader(key, value)
        if request.body is not None:
            connection.putheader("Content-Length", str(len(request.body)))
        connection.endheaders(request.body)
        response = connection.getresponse()
        body = response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
    finally:
        connection.close()


# ---- what the registry holds, so that valid paths exist ------------------------------------------


@dataclass
class Seeds:
    """Names, tags, digests and uploads that exist in the registry under test."""

    names: list[str]
    tags: list[str]
    digests: list[str]
    # (repository, digest) pairs the registry serves: blob GETs that reach FileResponse.
    blobs: list[tuple[str, str]]
    # A pushed image: its repository, config digest and manifest (digest and JSON, to mutate).
    pushed_repo: str
    config: str
    manifest_digest: str
    manifest: dict[str, Any]
    uploads: list[tuple[str, str]] = field(default_factory=list)
    # Registries an `ns` may name (Docker pulls from them): against a real Docker, ones that fail fast.
    ns_values: list[str] = field(default_factory=lambda: ["docker.io", "index.docker.io"])


# ---- strategies ------------------------------------------------------------------------------------

# Hypothesis draws the first entries of a sampled_from list more often: the nastiest values come first.
HEX = "0123456789abcdef"
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
HOSTILE_COMPONENTS = [
    "..",
    ".",
    "%2e%2e",
    "%2E%2E",
    "%2e",
    ".%2e",
    "..%2F..",
    "%2F",
    "%2f",
    "a%2Fb",
    "%2F..%2F..%2Fetc%2Fpasswd",
    "%00",
    "a%00",
    "%",
    "%zz",
    "%C0%AE%C0%AE",
    "%E2%80%A4%E2%80%A4",
    "%5C..%5C",
    "ALPINE",
    "Alpine",
    "a" * 256,
    "%C3%A9t%C3%A9",
    "%F0%9F%90%B3",
    "-a",
    "a-",
    "a__b",
    "a...b",
    "_",
    "",
    "~root",
    "_catalog",
    "blobs",
    "manifests",
    "uploads",
]
HOSTILE_NAMES = [
    "/etc/passwd",
    "//etc",
    "etc/passwd/",
    "../../../../etc/passwd",
    "%2e%2e/%2e%2e/etc/passwd",
    "library%2F..%2F..%2Fetc",
    "a/" * 130 + "a",
    "x" * 300,
    "127.0.0.1:5000/app",
    "localhost/app",
    "docker.io/library/alpine",
    "index.docker.io/alpine",
]
HOSTILE_TAGS = [
    "",
    "a" * 128,
    "a" * 129,
    "-x",
    ".x",
    "..",
    "%2e%2e",
    "%00",
    "x%00",
    "%2F",
    "x%3Ay",
    "x%20y",
    "%C3%A9",
    "LATEST",
    "latest%0D%0AX-Injected:%201",
]
JUNK_DIGESTS = [
    "sha256:",
    "sha256",
    ":",
    "md5:d41d8cd98f00b204e9800998ecf8427e",
    "sha256:..%2F..%2Fetc%2Fpasswd",
    "sha256:..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564",
    "sha256:%00",
    "SHA256:" + "a" * 64,
    "sha256:" + "g" * 64,
    "sha256:" + "a" * 64 + "%00",
    "sha256:" + "a" * 64 + "%2F",
    "sha512:" + "a" * 128,
    "sha384:" + "a" * 96,
    "sha256:" + "a" * 4000,
]
RANGES = [
    "bytes=0-0",
    "bytes=0-",
    "bytes=-1",
    "bytes=-0",
    "bytes=5-1",
    "bytes=0-1,3-4",
    "bytes=1-2, 3-4",
    "bytes=abc",
    "bytes=",
    "bytes=-",
    "bytes=--1",
    "bytes=99999999999999999999-",
    "bytes=0-99999999999999999999",
    "bytes=-99999999999999999999",
    f"bytes={HUGE_DIGITS}-",
    f"bytes=0-{HUGE_DIGITS}",
    "items=0-1",
    "bytes= 0-1",
    "bytes=0-0,-1",
    "bytes=-1-2",
    "BYTES=0-1",
]
CONTENT_RANGES = [
    f"0-{HUGE_DIGITS}",
    f"{HUGE_DIGITS}-{HUGE_DIGITS}",
    "0-0",
    "bytes 0-0/*",
    "bytes=0-0",
    "0-",
    "-1",
    "5-1",
    "0-99999999999999999999",
    "abc",
    "",
    "0-1/2/3",
    "bytes */5",
    "1-1",
]
CONTENT_TYPES = [
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
    "application/octet-stream",
    "text/plain",
    "",
    ";;;",
    "a/b/c",
    f"{OCI_MANIFEST}; charset=utf-8",
    f"{OCI_MANIFEST.upper()}",
    "multipart/form-data; boundary=x",
]
AUTHORIZATIONS = [
    "Basic",
    "Basic ",
    "Basic !!!!",
    "Basic " + b64(b"nocolon"),
    "Basic " + b64(b":"),
    "Basic " + b64(b"user:"),
    "Basic " + b64(b":pass"),
    "Basic " + b64(bytes(range(256))),
    "Basic " + b64(b"\xff\xfe:\x00"),
    "Basic " + "A" * 6000,
    "basic " + b64(b"a:b"),
    "BASIC " + b64(b"a:b"),
    "Bearer x",
    "Bearer",
    "Digest username=x",
    "",
]
NS_JUNK = [
    "..",
    "../..",
    "/etc",
    "%2Fetc%2Fpasswd",
    "a" * 300,
    "127.0.0.1:99999999",
    "-bad-",
    "",
    "docker.io/library",
    "[::1",
    "[zz::1]:5000",
    "http://evil",
    "%00",
    "a b",
]
N_VALUES = [
    HUGE_DIGITS,
    "\u00b2",  # '²': str.isdigit() says yes, int() says no
    "\u0661",  # Arabic-Indic one: a Unicode decimal digit, int() takes it
    "0",
    "1",
    "2",
    "-1",
    "+1",
    " 1",
    "1.5",
    "1e3",
    "0x10",
    "99999999999999999999",
    "",
]
RAW_QUERIES = [
    "?",
    "?&",
    "?&&&",
    "?ns",
    "?ns=",
    "?ns=%",
    "?ns=%ZZ",
    "?n=",
    "?=",
    "?%00=%00",
    "?ns=%2F&ns=docker.io",
]
MEDIA_TYPES = [OCI_MANIFEST, "application/vnd.oci.image.config.v1+json", "application/vnd.example+json", ""]


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(["sha256:" + "a" * 64, OCI_MANIFEST, OCI_INDEX, "", "2"]),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=8,
    )


FIELD_PATHS: list[tuple[Any, ...]] = [
    ("schemaVersion",),
    ("mediaType",),
    ("config",),
    ("config", "digest"),
    ("config", "size"),
    ("config", "mediaType"),
    ("layers",),
    ("layers", 0),
    ("layers", 0, "digest"),
    ("layers", 0, "size"),
    ("layers", 0, "mediaType"),
    ("layers", 0, "urls"),
    ("subject",),
    ("subject", "digest"),
    ("subject", "size"),
    ("artifactType",),
    ("annotations",),
    ("manifests",),
    ("manifests", 0),
    ("manifests", 0, "digest"),
    ("manifests", 0, "platform"),
]


def _mutate(document: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    """A copy of `document` with the value at `path` replaced (or removed); missing containers are made."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        items = list(document) if isinstance(document, list) else []
        if not items:
            items = [{}]
        if delete and not rest:
            return items[1:]
        items[0] = _mutate(items[0], rest, value, delete)
        return items
    mapping = dict(document) if isinstance(document, dict) else {}
    if delete and not rest:
        mapping.pop(head, None)
        return mapping
    mapping[head] = _mutate(mapping.get(head, {}), rest, value, delete)
    return mapping


def nasty_bodies(manifest: dict[str, Any]) -> list[bytes]:
    """Bodies no JSON-happy code path should choke on."""
    valid = json.dumps(manifest).encode()
    return [
        b"",
        b"null",
        b"[]",
        b"{}",
        b"2",
        b'"x"',
        b"\xef\xbb\xbf" + valid,  # UTF-8 BOM
        b"\xff\xfe\x00{",  # not UTF-8
        valid[: len(valid) // 2],
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than Python's recursion limit
        b'{"schemaVersion":2,"config":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001,
        b'{"schemaVersion":' + HUGE_DIGITS.encode() + b"}",
        b'{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"x","digest":"sha256:%s","size":1e400}}'
        % (OCI_MANIFEST.encode(), b"a" * 64),
        b'{"schemaVersion":2,"schemaVersion":"2","mediaType":"%s","mediaType":1}' % OCI_MANIFEST.encode(),
        b'{"schemaVersion":2,"mediaType":"%s","config":NaN,"layers":Infinity}' % OCI_MANIFEST.encode(),
        json.dumps({**manifest, "layers": [manifest.get("config")] * 2000}).encode(),
        json.dumps({**manifest, "config": {**manifest.get("config", {}), "size": 2**64}}).encode(),
        json.dumps({**manifest, "config": {**manifest.get("config", {}), "size": -1}}).encode(),
        json.dumps({**manifest, "config": {**manifest.get("config", {}), "size": True}}).encode(),
        json.dumps({**manifest, "subject": "sha256:" + "a" * 64}).encode(),
        json.dumps({**manifest, "layers": {"0": manifest.get("config")}}).encode(),
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [None, 1, "x", []]}).encode(),
        json.dumps({"schemaVersion": 2, "manifests": {"a": 1}}).encode(),
    ]


def manifest_bodies(seeds: Seeds) -> st.SearchStrategy[bytes]:
    mutation = st.tuples(st.sampled_from(FIELD_PATHS), _json_values(), st.booleans())

    def build(mutations: list[tuple[tuple[Any, ...], Any, bool]]) -> bytes:
        document: Any = seeds.manifest
        for path, value, delete in mutations:
            document = _mutate(document, path, value, delete)
        return json.dumps(document).encode()

    return st.one_of(
        st.lists(mutation, min_size=1, max_size=3).map(build),
        st.sampled_from(nasty_bodies(seeds.manifest)),
        st.binary(max_size=512),
    )


def _encoded_text(max_size: int = 16) -> st.SearchStrategy[str]:
    return st.text(max_size=max_size).map(enc)


def names(seeds: Seeds) -> st.SearchStrategy[str]:
    component = st.one_of(
        st.sampled_from([part for name in seeds.names for part in name.split("/")]),
        st.sampled_from(HOSTILE_COMPONENTS),
        st.from_regex(r"[a-z0-9]{1,6}(?:[._-][a-z0-9]{1,4})?", fullmatch=True),
        _encoded_text(12),
    )
    return st.one_of(
        st.sampled_from(seeds.names),
        st.sampled_from(HOSTILE_NAMES),
        st.lists(component, min_size=1, max_size=4).map("/".join),
    )


def tags(seeds: Seeds) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([*seeds.tags, "latest"]),
        st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True),
        st.sampled_from(HOSTILE_TAGS),
        _encoded_text(20),
    )


def digests(seeds: Seeds) -> st.SearchStrategy[str]:
    hex64 = st.text(alphabet=HEX, min_size=64, max_size=64)
    return st.one_of(
        st.sampled_from(seeds.digests),
        hex64.map(lambda h: f"sha256:{h}"),
        st.sampled_from(seeds.digests).map(str.upper),
        st.sampled_from(seeds.digests).map(lambda d: d[:-1]),
        st.sampled_from(seeds.digests).map(lambda d: d + "0"),
        st.sampled_from(seeds.digests).map(lambda d: d.replace("sha256:", "sha512:")),
        st.sampled_from(JUNK_DIGESTS),
        st.text(alphabet=HEX + ":sha", max_size=70),
        _encoded_text(40),
    )


def upload_ids(seeds: Seeds) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([upload for _name, upload in seeds.uploads] or ["none"]),
        st.uuids().map(str),
        st.sampled_from(["..", "%2e%2e", "%00", "a" * 300, "%2F..%2F..", ""]),
        _encoded_text(40),
    )


def query_values(seeds: Seeds, key: str) -> st.SearchStrategy[str]:
    encoded = _encoded_text(16)
    if key == "ns":
        return st.sampled_from([*map(enc, seeds.ns_values), *map(enc, NS_JUNK)])
    if key == "n":
        return st.one_of(
            st.sampled_from([enc(n) for n in N_VALUES]), st.integers(-5, 10**12).map(str), encoded
        )
    if key in ("digest", "mount"):
        return digests(seeds)
    if key in ("from", "last"):
        return st.one_of(names(seeds), encoded)
    return st.one_of(st.sampled_from([enc(t) for t in MEDIA_TYPES]), encoded)


QUERY_KEYS = ("ns", "n", "last", "digest", "mount", "from", "artifactType")


def queries(seeds: Seeds, likely: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """A query string; keys from `likely` (what the endpoint reads) more often than the others."""

    def pairs(chosen: list[str]) -> st.SearchStrategy[str]:
        if not chosen:
            return st.just("")
        values = st.tuples(*(query_values(seeds, key) for key in chosen))
        return values.map(lambda vs: "?" + "&".join(f"{k}={v}" for k, v in zip(chosen, vs, strict=True)))

    keys = st.sampled_from([*likely, *likely, *likely, *QUERY_KEYS])
    structured = st.lists(keys, max_size=3, unique=True).flatmap(pairs)
    return st.one_of(structured, st.sampled_from(RAW_QUERIES))


@dataclass(frozen=True)
class Endpoint:
    """A path, the methods its route has (tried more often than the others), the query keys it reads."""

    path: str
    methods: tuple[str, ...]
    keys: tuple[str, ...] = ("ns",)


def endpoints(seeds: Seeds) -> st.SearchStrategy[Endpoint]:
    name = names(seeds)
    reference = st.one_of(tags(seeds), digests(seeds))
    manifest = ("GET", "HEAD", "PUT", "DELETE")
    blob = ("GET", "HEAD", "DELETE")
    upload = ("GET", "PATCH", "PUT", "DELETE")
    start = ("POST",)
    listing = ("GET",)
    return st.one_of(
        st.builds(lambda n, r: Endpoint(f"/v2/{n}/manifests/{r}", manifest), name, reference),
        st.builds(lambda n, d: Endpoint(f"/v2/{n}/blobs/{d}", blob), name, digests(seeds)),
        st.sampled_from(seeds.blobs).map(lambda pair: Endpoint(f"/v2/{pair[0]}/blobs/{pair[1]}", blob)),
        st.builds(lambda n: Endpoint(f"/v2/{n}/blobs/uploads/", start, ("digest", "mount", "from")), name),
        st.sampled_from(seeds.names).map(
            lambda n: Endpoint(f"/v2/{n}/blobs/uploads/", start, ("digest", "mount", "from"))
        ),
        st.builds(
            lambda n, u: Endpoint(f"/v2/{n}/blobs/uploads/{u}", upload, ("digest",)), name, upload_ids(seeds)
        ),
        st.sampled_from(seeds.uploads or [("x", "none")]).map(
            lambda p: Endpoint(f"/v2/{p[0]}/blobs/uploads/{p[1]}", upload, ("digest",))
        ),
        st.builds(lambda n: Endpoint(f"/v2/{n}/tags/list", listing, ("n", "last", "ns")), name),
        st.builds(
            lambda n, d: Endpoint(f"/v2/{n}/referrers/{d}", listing, ("artifactType",)), name, digests(seeds)
        ),
        st.sampled_from(["/v2/_catalog", "/v2/_catalog/"]).map(lambda p: Endpoint(p, listing, ("n", "last"))),
        st.sampled_from(["/v2/", "/v2", "/v2//", "/v3/", "/v2/%2e%2e/"]).map(lambda p: Endpoint(p, listing)),
        st.builds(lambda tail: Endpoint(f"/v2/{tail}", listing), _encoded_text(30)),
        st.sampled_from(
            ["/", "/status.json", "/healthz", "/readyz", "/metrics", "/..%2F..%2Fetc%2Fpasswd"]
        ).map(lambda p: Endpoint(p, listing, ())),
    )


def header_values(seeds: Seeds) -> dict[str, st.SearchStrategy[str]]:
    junk = st.text(alphabet=PRINTABLE, max_size=40)
    return {
        "Range": st.one_of(
            st.sampled_from(RANGES),
            st.builds(
                lambda a, b: f"bytes={a}-{b}",
                st.integers(-5, 2**70) | st.just(""),
                st.integers(-5, 2**70) | st.just(""),
            ),
            junk,
        ),
        "Content-Range": st.one_of(
            st.sampled_from(CONTENT_RANGES),
            st.builds(lambda a, b: f"{a}-{b}", st.integers(-5, 2**70), st.integers(-5, 2**70)),
            junk,
        ),
        "Content-Type": st.one_of(st.sampled_from(CONTENT_TYPES), junk),
        "Authorization": st.one_of(
            st.sampled_from(AUTHORIZATIONS),
            st.binary(max_size=40).map(lambda raw: "Basic " + b64(raw)),
            junk.map(lambda text: "Basic " + text),
        ),
        "Accept": st.one_of(st.sampled_from([OCI_MANIFEST, OCI_INDEX, "*/*", ""]), junk),
        "If-Range": junk,
        "If-None-Match": st.one_of(st.sampled_from([f'"{d}"' for d in seeds.digests]), junk),
    }


def headers(seeds: Seeds) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    choices = header_values(seeds)
    return st.lists(st.sampled_from(sorted(choices)), max_size=3, unique=True).flatmap(
        lambda keys: st.tuples(*(st.tuples(st.just(k), choices[k]) for k in keys))
    )


NEW_UPLOAD = "{new-upload}"


def requests(seeds: Seeds) -> st.SearchStrategy[Request]:
    """Any request (`generic`), or one aimed at a part of the API where parsing happens, equally often.

    A path holding NEW_UPLOAD is sent after starting an upload in the pushed repository (see `fuzz`).
    """
    values = header_values(seeds)
    body = st.one_of(st.none(), manifest_bodies(seeds))

    def query(*keys: str) -> st.SearchStrategy[str]:
        return queries(seeds, keys)

    @st.composite
    def generic(draw: st.DrawFn) -> Request:
        endpoint = draw(endpoints(seeds))
        method = draw(st.sampled_from([*endpoint.methods * 4, *METHODS]))
        full = endpoint.path + draw(queries(seeds, endpoint.keys))
        payload = draw(body) if method in ("PUT", "POST", "PATCH") else None
        return Request(method, full, draw(headers(seeds)), payload)

    @st.composite
    def listing(draw: st.DrawFn) -> Request:
        path = draw(st.one_of(st.just("/v2/_catalog"), names(seeds).map(lambda n: f"/v2/{n}/tags/list")))
        return Request(draw(st.sampled_from(["GET", "HEAD"])), path + draw(query("n", "last")))

    @st.composite
    def manifest_push(draw: st.DrawFn) -> Request:
        name = draw(st.one_of(st.just(seeds.pushed_repo), names(seeds)))
        reference = draw(st.one_of(tags(seeds), digests(seeds)))
        content_type = draw(values["Content-Type"])
        return Request(
            "PUT", f"/v2/{name}/manifests/{reference}", (("Content-Type", content_type),), draw(body)
        )

    @st.composite
    def blob_range(draw: st.DrawFn) -> Request:
        repo, digest = draw(st.sampled_from(seeds.blobs))
        pairs = [("Range", draw(values["Range"]))]
        if draw(st.booleans()):
            pairs.append(("If-Range", draw(values["If-Range"])))
        return Request(draw(st.sampled_from(["GET", "HEAD"])), f"/v2/{repo}/blobs/{digest}", tuple(pairs))

    @st.composite
    def upload_chunk(draw: st.DrawFn) -> Request:
        method = draw(st.sampled_from(["PATCH", "PUT"]))
        chunk = draw(st.binary(min_size=1, max_size=64))
        path = f"/v2/{seeds.pushed_repo}/blobs/uploads/{NEW_UPLOAD}" + draw(query("digest"))
        pairs = (("Content-Range", draw(values["Content-Range"])),) if draw(st.booleans()) else ()
        return Request(method, path, pairs, chunk)

    @st.composite
    def upload_start(draw: st.DrawFn) -> Request:
        name = draw(st.one_of(st.just(seeds.pushed_repo), names(seeds)))
        path = f"/v2/{name}/blobs/uploads/" + draw(query("digest", "mount", "from"))
        return Request("POST", path, (), draw(st.one_of(st.none(), st.binary(max_size=64))))

    @st.composite
    def pull(draw: st.DrawFn) -> Request:
        name = draw(names(seeds))
        reference = draw(st.one_of(tags(seeds), digests(seeds)))
        pairs = (("Authorization", draw(values["Authorization"])),) if draw(st.booleans()) else ()
        method = draw(st.sampled_from(["GET", "HEAD"]))
        return Request(method, f"/v2/{name}/manifests/{reference}" + draw(query("ns")), pairs)

    families = st.one_of(
        generic(), listing(), manifest_push(), blob_range(), upload_chunk(), upload_start(), pull()
    )
    return families.map(lambda r: replace(r, path=r.path[:MAX_LINE])).filter(
        lambda r: all(len(v) < MAX_LINE for _k, v in r.headers)
    )


# ---- the fixed corpus --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nasty:
    """One corpus entry. Filled in from the seeds: `{layer}` (a blob the registry serves in `{blob_repo}`),
    `{name}` (a pushed repository), `{config}` and `{manifest}` (its digests), `{upload}` (open in it),
    `{remote}` (a registry for `ns`)."""

    id: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    # Refused by aiohttp's HTTP parser (request line over 8190 bytes) before the app sees it: a plain-text
    # 400 is all it can be.
    plain_4xx: bool = False

    def resolve(self, fields: dict[str, str]) -> Request:
        body = self.body
        for key, value in fields.items():
            body = body.replace(b"{%s}" % key.encode(), value.encode()) if body is not None else None
        return Request(
            self.method,
            self.path.format(**fields),
            tuple((k, v.format(**fields)) for k, v in self.headers),
            body,
        )


def _corpus() -> list[Nasty]:
    blob = "/v2/{blob_repo}/blobs/{layer}"
    up = "/v2/{name}/blobs/uploads/{upload}"
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "{config}", "size": 2},
        "layers": [],
    }
    entries = [
        # paths
        Nasty("dotdot", "GET", "/v2/../../etc/passwd/manifests/latest"),
        Nasty("dotdot-encoded", "GET", "/v2/%2e%2e/%2e%2e/etc/passwd/manifests/latest"),
        Nasty("dotdot-mixed", "GET", "/v2/.%2e/.%2e/etc/passwd/manifests/latest"),
        Nasty("encoded-slash", "GET", "/v2/library%2F..%2F..%2Fetc/manifests/latest"),
        Nasty("encoded-slash-name", "GET", "/v2/library%2Falpine/manifests/latest"),
        Nasty("blob-traversal-digest", "GET", "/v2/alpine/blobs/sha256:..%2F..%2F..%2Fetc%2Fpasswd"),
        Nasty("blob-traversal", "GET", "/v2/alpine/blobs/../../../../etc/passwd"),
        Nasty("absolute-name", "GET", "/v2//etc/passwd/manifests/latest"),
        Nasty("absolute-blob", "GET", "/v2//etc/blobs/{layer}"),
        Nasty("nul-name", "GET", "/v2/alpine%00/manifests/latest"),
        Nasty("nul-tag", "GET", "/v2/alpine/manifests/latest%00"),
        Nasty("nul-digest", "GET", "/v2/alpine/blobs/{layer}%00"),
        Nasty("nul-upload", "GET", "/v2/{name}/blobs/uploads/%00"),
        Nasty("long-name", "GET", "/v2/" + "a" * 300 + "/manifests/latest"),
        Nasty("long-name-components", "GET", "/v2/" + "a/" * 200 + "a/manifests/latest"),
        Nasty("long-tag", "GET", "/v2/alpine/manifests/" + "a" * 129),
        Nasty("long-tag-push", "PUT", "/v2/{name}/manifests/" + "a" * 129, body=b"{}"),
        Nasty("very-long-path", "GET", "/v2/" + "a" * 7000 + "/manifests/latest"),
        Nasty("path-over-line-limit", "GET", "/v2/" + "a" * 9000 + "/manifests/latest", plain_4xx=True),
        Nasty("unicode-name", "GET", "/v2/%C3%A9t%C3%A9/manifests/latest"),
        Nasty("unicode-tag", "GET", "/v2/alpine/manifests/%F0%9F%90%B3"),
        Nasty("unicode-dots", "GET", "/v2/%E2%80%A4%E2%80%A4/%E2%80%A4%E2%80%A4/etc/manifests/latest"),
        Nasty("overlong-utf8-dots", "GET", "/v2/%C0%AE%C0%AE/manifests/latest"),
        Nasty("backslashes", "GET", "/v2/..%5C..%5Cetc/manifests/latest"),
        Nasty("uppercase-name", "GET", "/v2/ALPINE/manifests/latest"),
        Nasty("bad-percent", "GET", "/v2/alpine%zz/manifests/latest"),
        Nasty("lone-percent", "GET", "/v2/alpine%/manifests/latest"),
        Nasty("crlf-tag", "GET", "/v2/alpine/manifests/latest%0D%0AX-Injected:%201"),
        # references and digests
        Nasty("digest-uppercase-hex", "GET", "/v2/alpine/manifests/sha256:" + "A" * 64),
        Nasty("digest-short", "GET", "/v2/alpine/manifests/sha256:" + "a" * 63),
        Nasty("digest-long", "GET", "/v2/alpine/manifests/sha256:" + "a" * 65),
        Nasty("digest-sha512", "GET", "/v2/alpine/manifests/sha512:" + "a" * 128),
        Nasty("digest-md5", "GET", "/v2/alpine/blobs/md5:d41d8cd98f00b204e9800998ecf8427e"),
        Nasty("digest-empty-hex", "GET", "/v2/alpine/blobs/sha256:"),
        Nasty("digest-no-algorithm", "GET", "/v2/alpine/blobs/:" + "a" * 64),
        Nasty("digest-not-hex", "GET", "/v2/alpine/blobs/sha256:" + "g" * 64),
        Nasty("digest-huge", "GET", "/v2/alpine/blobs/sha256:" + "a" * 4000),
        Nasty("referrers-junk", "GET", "/v2/alpine/referrers/sha256:xyz"),
        Nasty("referrers-sha512", "GET", "/v2/{name}/referrers/sha512:" + "a" * 128),
        Nasty("delete-junk-digest", "DELETE", "/v2/{name}/blobs/sha256:" + "Z" * 64),
        Nasty("delete-junk-reference", "DELETE", "/v2/{name}/manifests/sha256:..%2F"),
        # query strings
        Nasty("ns-traversal", "GET", "/v2/alpine/manifests/latest?ns=..%2F..%2Fetc"),
        Nasty("ns-absolute", "GET", "/v2/alpine/manifests/latest?ns=%2Fetc%2Fpasswd"),
        Nasty("ns-port-too-big", "GET", "/v2/alpine/manifests/latest?ns=127.0.0.1:99999999"),
        Nasty("ns-url", "GET", "/v2/alpine/manifests/latest?ns=http://evil"),
        Nasty("ns-nul", "GET", "/v2/alpine/manifests/latest?ns=%00"),
        Nasty("ns-twice", "GET", "/v2/alpine/manifests/latest?ns={remote}&ns=%2F"),
        Nasty("ns-bad-percent", "GET", "/v2/alpine/manifests/latest?ns=%ZZ"),
        Nasty("n-negative", "GET", "/v2/_catalog?n=-1"),
        Nasty("n-float", "GET", "/v2/_catalog?n=1.5"),
        Nasty("n-superscript-digit", "GET", "/v2/_catalog?n=%C2%B2"),
        Nasty("n-arabic-indic-digit", "GET", "/v2/_catalog?n=%D9%A1"),
        Nasty("n-huge", "GET", "/v2/_catalog?n=99999999999999999999"),
        Nasty("n-over-int-digit-limit", "GET", "/v2/_catalog?n=" + HUGE_DIGITS),
        Nasty("tags-n-superscript-digit", "GET", "/v2/alpine/tags/list?n=%C2%B2"),
        Nasty("tags-n-over-int-digit-limit", "GET", "/v2/alpine/tags/list?n=" + HUGE_DIGITS),
        Nasty("last-junk", "GET", "/v2/_catalog?n=1&last=%00%FF"),
        Nasty("digest-junk-post", "POST", "/v2/{name}/blobs/uploads/?digest=junk", body=b"abc"),
        Nasty("digest-sha512-post", "POST", "/v2/{name}/blobs/uploads/?digest=sha512:" + "a" * 128, body=b""),
        Nasty("digest-wrong-post", "POST", "/v2/{name}/blobs/uploads/?digest=sha256:" + "a" * 64, body=b"x"),
        Nasty("mount-junk", "POST", "/v2/{name}/blobs/uploads/?mount=junk&from=alpine"),
        Nasty("mount-from-junk", "POST", "/v2/{name}/blobs/uploads/?mount={layer}&from=..%2F..%2Fetc"),
        Nasty("mount-from-self", "POST", "/v2/{name}/blobs/uploads/?mount={layer}&from={name}"),
        Nasty("mount-without-from", "POST", "/v2/{name}/blobs/uploads/?mount={layer}"),
        Nasty("from-without-mount", "POST", "/v2/{name}/blobs/uploads/?from=alpine"),
        Nasty("artifact-type-junk", "GET", "/v2/{name}/referrers/{manifest}?artifactType=%00%FF%2F.."),
        Nasty("finish-without-digest", "PUT", up, body=b""),
        Nasty("finish-junk-digest", "PUT", up + "?digest=sha256:zz", body=b""),
        # headers
        Nasty("range-suffix-zero", "GET", blob, (("Range", "bytes=-0"),)),
        Nasty("range-reversed", "GET", blob, (("Range", "bytes=5-1"),)),
        Nasty("range-multiple", "GET", blob, (("Range", "bytes=0-1,3-4"),)),
        Nasty("range-huge-start", "GET", blob, (("Range", "bytes=99999999999999999999-"),)),
        Nasty("range-huge-end", "GET", blob, (("Range", "bytes=0-99999999999999999999"),)),
        Nasty("range-over-int-digit-limit", "GET", blob, (("Range", f"bytes={HUGE_DIGITS}-"),)),
        Nasty("range-not-bytes", "GET", blob, (("Range", "items=0-1"),)),
        Nasty("range-empty", "GET", blob, (("Range", "bytes="),)),
        Nasty("range-head", "HEAD", blob, (("Range", "bytes=5-1"),)),
        Nasty("if-range-junk", "GET", blob, (("Range", "bytes=0-0"), ("If-Range", "junk"))),
        Nasty("content-range-junk", "PATCH", up, (("Content-Range", "abc"),), b"x"),
        Nasty("content-range-reversed", "PATCH", up, (("Content-Range", "5-1"),), b"x"),
        Nasty("content-range-huge", "PATCH", up, (("Content-Range", "0-99999999999999999999"),), b"x"),
        Nasty(
            "content-range-over-int-digit-limit", "PATCH", up, (("Content-Range", f"0-{HUGE_DIGITS}"),), b"x"
        ),
        Nasty("content-range-wrong-start", "PATCH", up, (("Content-Range", "7-7"),), b"x"),
        Nasty("content-type-junk", "PUT", "/v2/{name}/manifests/junk-ct", (("Content-Type", ";;;"),), b"{}"),
        Nasty(
            "content-type-v1",
            "PUT",
            "/v2/{name}/manifests/v1-ct",
            (("Content-Type", "application/vnd.docker.distribution.manifest.v1+prettyjws"),),
            b"{}",
        ),
        Nasty(
            "auth-basic-no-colon",
            "GET",
            "/v2/alpine/manifests/latest?ns={remote}",
            (("Authorization", "Basic " + b64(b"nocolon")),),
        ),
        Nasty(
            "auth-basic-garbage",
            "GET",
            "/v2/alpine/manifests/latest?ns={remote}",
            (("Authorization", "Basic !!!!"),),
        ),
        Nasty(
            "auth-basic-binary",
            "GET",
            "/v2/alpine/manifests/latest?ns={remote}",
            (("Authorization", "Basic " + b64(bytes(range(256)))),),
        ),
        Nasty("auth-basic-empty", "GET", "/v2/alpine/manifests/latest", (("Authorization", "Basic "),)),
        Nasty("auth-bearer", "GET", "/v2/alpine/manifests/latest", (("Authorization", "Bearer x"),)),
        Nasty("auth-huge", "GET", "/v2/alpine/manifests/latest", (("Authorization", "Basic " + "A" * 6000),)),
        # methods
        Nasty("patch-manifest", "PATCH", "/v2/alpine/manifests/latest", body=b"{}"),
        Nasty("post-manifest", "POST", "/v2/alpine/manifests/latest", body=b"{}"),
        Nasty("put-blob", "PUT", "/v2/{name}/blobs/{layer}", body=b"x"),
        Nasty("delete-catalog", "DELETE", "/v2/_catalog"),
        Nasty("put-base", "PUT", "/v2/", body=b"x"),
        Nasty("delete-status", "DELETE", "/status.json"),
        Nasty("post-metrics", "POST", "/metrics", body=b"x"),
        Nasty("delete-docker-image", "DELETE", "/v2/alpine/manifests/latest"),
        Nasty("delete-mirrored-blob", "DELETE", "/v2/library/alpine/blobs/{layer}?ns={remote}"),
        Nasty("push-to-mirror", "PUT", "/v2/library/alpine/manifests/x?ns={remote}", body=b"{}"),
        Nasty("upload-other-repo", "PATCH", "/v2/alpine/blobs/uploads/{upload}", body=b"x"),
    ]
    template = json.dumps(manifest)
    for index, raw in enumerate(nasty_bodies({**manifest, "config": {**manifest["config"], "digest": "x"}})):
        entries.append(
            Nasty(f"manifest-body-{index}", "PUT", f"/v2/{{name}}/manifests/body-{index}", body=raw)
        )
    entries.append(
        Nasty("manifest-over-4mib", "PUT", "/v2/{name}/manifests/big", body=b" " * (4 << 20) + b"{}")
    )
    entries.append(
        Nasty("manifest-references-unpushed", "PUT", "/v2/{name}/manifests/ref", body=template.encode())
    )
    return entries


CORPUS = _corpus()


def corpus_fields(seeds: Seeds) -> dict[str, str]:
    blob_repo, layer = seeds.blobs[0]
    upload = next((u for repo, u in seeds.uploads if repo == seeds.pushed_repo), "none")
    return {
        "blob_repo": blob_repo,
        "layer": layer,
        "config": seeds.config,
        "manifest": seeds.manifest_digest,
        "name": seeds.pushed_repo,
        "upload": upload,
        # A registry `ns` may name: Docker is sent there (the first of the seeds' ns_values).
        "remote": seeds.ns_values[0],
    }


# ---- properties ------------------------------------------------------------------------------------


def _oci_error_problem(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return "4xx body is not JSON"
    if not isinstance(data, dict) or set(data) != {"errors"} or not isinstance(data["errors"], list):
        return "4xx JSON is not {errors: [...]}"
    if not data["errors"]:
        return "4xx errors list is empty"
    for error in data["errors"]:
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            return "4xx error without a message"
        if error.get("code") not in STATUS_BY_CODE:
            return f"4xx error code {error.get('code')!r} is not in errors.STATUS_BY_CODE"
    return None


def _range_answer(request: Request, answer: Answer) -> bool:
    """aiohttp's FileResponse answering a Range on a blob: 416 with `Content-Range: bytes */<size>`."""
    asks_range = any(k.lower() == "range" for k, _v in request.headers)
    return (
        answer.status == 416
        and asks_range
        and "/blobs/sha256:" in request.path
        and re.fullmatch(r"bytes \*/\d+", answer.headers.get("content-range", "")) is not None
    )


def _upstream_failure(request: Request, answer: Answer) -> bool:
    """What the README promises when the registry an `ns` names cannot be pulled from: 502/503 OCI JSON
    UNAVAILABLE (containerd then falls back to that registry itself). Not a fault of this registry."""
    query = urllib.parse.parse_qs(request.path.partition("?")[2])
    if not query.get("ns", [""])[0] or answer.status not in (502, 503):
        return False
    if request.method == "HEAD":  # the same answer, without its body
        return answer.headers.get("content-type", "").startswith("application/json")
    try:
        errors = json.loads(answer.body)["errors"]
    except (ValueError, KeyError, TypeError):
        return False
    return [error.get("code") for error in errors] == ["UNAVAILABLE"]


def problems(request: Request, answer: Answer | BaseException, *, plain_4xx: bool = False) -> list[str]:
    """What is wrong with an answer (empty: nothing). `plain_4xx`: the request cannot reach the app."""
    if isinstance(answer, BaseException):
        return [f"no answer: {type(answer).__name__}"]
    found = []
    if answer.status >= 500 and not _upstream_failure(request, answer):
        found.append(f"{answer.status} server error")
    path = request.path.partition("?")[0]
    if (path == "/v2" or path.startswith("/v2/")) and 400 <= answer.status < 500:
        if _range_answer(request, answer) or plain_4xx:
            pass
        elif not answer.headers.get("content-type", "").startswith("application/json"):
            found.append(
                f"{answer.status} under /v2/ is {answer.headers.get('content-type')}, not OCI error JSON"
            )
        elif request.method != "HEAD":
            problem = _oci_error_problem(answer.body)
            if problem:
                found.append(problem)
    if answer.status == 206 and request.method == "GET":
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", answer.headers.get("content-range", ""))
        if not match or int(match[2]) - int(match[1]) + 1 != len(answer.body):
            found.append(f"206 whose Content-Range {answer.headers.get('content-range')} is not its body")
    if b"root:x:0:0" in answer.body:
        found.append("the body holds /etc/passwd")
    if any(key.startswith("x-injected") for key in answer.headers):
        found.append("a header was injected through the request")
    return found


@dataclass
class Tally:
    """Counts requests and statuses; keeps a few examples of each distinct problem."""

    tried: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    count: Counter[str] = field(default_factory=Counter)

    def record(
        self, request: Request, answer: Answer | BaseException, *, plain_4xx: bool = False
    ) -> list[str]:
        self.tried += 1
        if isinstance(answer, Answer):
            self.statuses[answer.status] += 1
        found = problems(request, answer, plain_4xx=plain_4xx)
        for problem in found:
            key = f"{problem} <- {_route(request)} {request.method}"
            self.count[key] += 1
            kept = self.examples.setdefault(key, [])
            if len(kept) < 3:
                shown = answer.describe() if isinstance(answer, Answer) else repr(answer)
                kept.append(f"{request.describe()}\n        -> {shown}")
        return found

    def report(self) -> str:
        lines = [f"{self.tried} requests, statuses {dict(sorted(self.statuses.items()))}"]
        for key, examples in sorted(self.examples.items()):
            lines.append(f"  {self.count[key]}x {key}")
            lines.extend(f"      {example}" for example in examples)
        return "\n".join(lines)


def _route(request: Request) -> str:
    path = request.path.partition("?")[0]
    for pattern, route in (
        (r"/v2/?", "base"),
        (r"/v2/_catalog/?", "catalog"),
        (r"/v2/.+/blobs/uploads/?", "start_upload"),
        (r"/v2/.+/blobs/uploads/.*", "upload"),
        (r"/v2/.+/blobs/.*", "blob"),
        (r"/v2/.+/manifests/.*", "manifest"),
        (r"/v2/.+/tags/list", "tags_list"),
        (r"/v2/.+/referrers/.*", "referrers"),
        (r"/v2/.*", "v2-other"),
    ):
        if re.fullmatch(pattern, path):
            return route
    return "other"


def fuzz(host: str, port: int, seeds: Seeds, tally: Tally, *, max_examples: int, timeout: float = 60) -> None:
    """Sends `max_examples` generated requests (derandomized: the same ones every run), recording each."""

    @settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        # Problems are collected, not raised: nothing to shrink, and generation may be slow to start.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(request=requests(seeds))
    def one(request: Request) -> None:
        send_recorded(host, port, seeds, request, tally, timeout)

    one()


def send_recorded(
    host: str, port: int, seeds: Seeds, request: Request, tally: Tally, timeout: float = 60
) -> Answer | BaseException:
    """Sends (starting an upload first for a NEW_UPLOAD path) and records the answer in `tally`."""
    if NEW_UPLOAD in request.path:
        start = Request("POST", f"/v2/{seeds.pushed_repo}/blobs/uploads/")
        started = send_recorded(host, port, seeds, start, tally, timeout)
        upload = "none"
        if isinstance(started, Answer) and started.status == 202:
            upload = started.headers.get("location", "").rpartition("/")[2]
        request = replace(request, path=request.path.replace(NEW_UPLOAD, upload))
    try:
        answer: Answer | BaseException = send(host, port, request, timeout)
    except (OSError, http.client.HTTPException) as exc:
        answer = exc
    tally.record(request, answer)
    return answer


# ---- the file system -----------------------------------------------------------------------------------

_CACHE_LAYOUT = [
    r"blobs",
    r"blobs/sha256",
    r"blobs/sha256/[0-9a-f]{2}",
    r"blobs/sha256/(?P<prefix>[0-9a-f]{2})/(?P=prefix)[0-9a-f]{62}",
    r"lock",
    # The state files: the tags known while the daemon is down, the blobs verified in place.
    re.escape(KNOWN_FILE),
    re.escape(VERIFIED_FILE),
    r"repositories",
    r"repositories/[0-9a-f]{64}\.json",
    r"tmp",
    r"tmp/(?:blob|record|ready)-[A-Za-z0-9_]+",
]


def tree(root: Path, skip: Sequence[Path] = ()) -> set[str]:
    """Every path under `root` (relative), leaving out the trees in `skip`."""
    found: set[str] = set()
    skipped = {p.resolve() for p in skip}
    for current, dirs, files in os.walk(root):
        here = Path(current)
        dirs[:] = [d for d in dirs if (here / d).resolve() not in skipped]
        for entry in [*dirs, *files]:
            found.add(str((here / entry).relative_to(root)))
    return found


def cache_strays(cache: Path) -> list[str]:
    """Paths under the cache root that are not part of its layout (what a request could have made)."""
    layout = [re.compile(pattern) for pattern in _CACHE_LAYOUT]
    return sorted(p for p in tree(cache) if not any(pattern.fullmatch(p) for pattern in layout))
