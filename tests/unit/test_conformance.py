"""The OCI distribution-spec conformance checks, as pytest tests against the in-process app.

Organized as the spec's four workflow categories (Pull, Push, Content Discovery, Content Management),
endpoint by endpoint and error code by error code, from the spec text (v1.1.1, plus the Range, blob upload
cancel and proxying additions on its main branch) and the checks of its conformance suite
(`conformance/0[1-4]_*_test.go`, `conformance2/`). Every repository here is in the registry's own namespace
(no `ns` query) and named `conformance/...`: no such image is in Docker, so all content comes from pushes.

The last sections hold what this product promises beyond the spec: Docker is never changed by deletes, and
the mirror namespace (`ns`) is read-only except for evicting a cached image.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDictProxy
from yarl import URL

from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.web.app import create_app
from k3d_registry_dockerd.web.assembly import assemble

from .fakes import FakeDocker, local_image
from .saves import digest_of, layer_tar

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCTET_STREAM = "application/octet-stream"

# The error codes of the spec's table (code-1 … code-14) plus the legacy ones it mentions.
SPEC_ERROR_CODES = frozenset(
    {
        "BLOB_UNKNOWN",
        "BLOB_UPLOAD_INVALID",
        "BLOB_UPLOAD_UNKNOWN",
        "DIGEST_INVALID",
        "MANIFEST_BLOB_UNKNOWN",
        "MANIFEST_INVALID",
        "MANIFEST_UNKNOWN",
        "NAME_INVALID",
        "NAME_UNKNOWN",
        "SIZE_INVALID",
        "UNAUTHORIZED",
        "DENIED",
        "UNSUPPORTED",
        "TOOMANYREQUESTS",
        "TAG_INVALID",
        "MANIFEST_UNVERIFIED",
    }
)
# The suite's "nonexistent blob": a digest nothing ever pushes.
DUMMY_DIGEST = digest_of(b"hello world")
# The suite's nonexistent manifest reference (not even a valid tag), expected to be a plain 404.
NONEXISTENT_MANIFEST = ".INVALID_MANIFEST_NAME"
ANNOTATION = "org.opencontainers.conformance.test"


# ---- test content: deterministic random bytes ---------------------------------------------------------


def random_bytes(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def pretty_json(value: Any) -> bytes:
    """Tab-indented, as the suite's Go code writes it: a registry that re-serializes changes the bytes."""
    return json.dumps(value, indent="\t").encode() + b"\n"


@dataclass(frozen=True)
class Content:
    """A blob or a manifest: its bytes and the media type a descriptor of it carries."""

    data: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return digest_of(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


EMPTY_JSON = Content(b"{}", OCI_EMPTY)
assert EMPTY_JSON.digest == "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


@dataclass(frozen=True)
class Image:
    """An image manifest (or artifact) with the blobs it references."""

    config: Content
    layers: tuple[Content, ...]
    manifest: Content

    @property
    def blobs(self) -> tuple[Content, ...]:
        return (self.config, *self.layers)


def make_manifest(
    config: Content,
    layers: Sequence[Content],
    *,
    media_type: str = OCI_MANIFEST,
    subject: Content | None = None,
    artifact_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Content:
    body: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type}
    if artifact_type is not None:
        body["artifactType"] = artifact_type
    body["config"] = config.descriptor()
    body["layers"] = [layer.descriptor() for layer in layers]
    if subject is not None:
        body["subject"] = subject.descriptor()
    if annotations is not None:
        body["annotations"] = dict(annotations)
    return Content(pretty_json(body), media_type)


def make_image(
    seed: str, *, arch: str = "amd64", layer_sizes: Sequence[int] = (3000, 7000), docker: bool = False
) -> Image:
    """A small real image: gzip layers of random files, a config whose diff_ids match them."""
    layer_type, config_type, manifest_type = (
        (DOCKER_LAYER, DOCKER_CONFIG, DOCKER_MANIFEST) if docker else (OCI_LAYER, OCI_CONFIG, OCI_MANIFEST)
    )
    layers, diff_ids = [], []
    for i, size in enumerate(layer_sizes):
        tar = layer_tar({f"{seed}/file{i}.bin": random_bytes(f"{seed}/{i}", size)})
        layers.append(Content(gzip.compress(tar, mtime=0), layer_type))
        diff_ids.append(digest_of(tar))
    config = Content(
        pretty_json(
            {
                "architecture": arch,
                "os": "linux",
                "author": random_bytes(seed, 12).hex(),
                "config": {"Cmd": ["/bin/sh"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        ),
        config_type,
    )
    return Image(config, tuple(layers), make_manifest(config, layers, media_type=manifest_type))


def make_index(
    manifests: Sequence[Content],
    *,
    media_type: str = OCI_INDEX,
    platforms: Sequence[Mapping[str, str]] | None = None,
    subject: Content | None = None,
    artifact_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Content:
    body: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type}
    if artifact_type is not None:
        body["artifactType"] = artifact_type
    body["manifests"] = [
        manifest.descriptor(**({"platform": dict(platforms[i])} if platforms else {}))
        for i, manifest in enumerate(manifests)
    ]
    if subject is not None:
        body["subject"] = subject.descriptor()
    if annotations is not None:
        body["annotations"] = dict(annotations)
    return Content(pretty_json(body), media_type)


def make_artifact(
    seed: str,
    subject: Content,
    *,
    artifact_type: str | None = None,
    config_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Image:
    """A referrer of `subject`, typed either by its `artifactType` field (with the empty config) or, as
    older clients do, by its config's media type."""
    if artifact_type is not None:
        config, layers = EMPTY_JSON, (Content(random_bytes(seed, 64), artifact_type),)
    else:
        assert config_type is not None
        config, layers = Content(pretty_json({"seed": seed}), config_type), (EMPTY_JSON,)
    manifest = make_manifest(
        config, layers, subject=subject, artifact_type=artifact_type, annotations=annotations
    )
    return Image(config, layers, manifest)


# ---- a small OCI client over the test app ---------------------------------------------------------------


def resolve(base: URL, reference: str) -> URL:
    """A Location or Link target resolved against the request URL (RFC 3986), as clients do: relative or
    absolute, query string kept. The result is relative, for the test client."""
    target = base.join(URL(reference))
    assert target.origin() == base.origin(), f"{reference!r} points away from this registry ({base})"
    return target.relative()


def manifest_path(name: str, reference: str) -> str:
    return f"/v2/{name}/manifests/{reference}"


def blob_path(name: str, digest: str) -> str:
    return f"/v2/{name}/blobs/{digest}"


def uploads_url(name: str, **query: str) -> URL:
    url = URL(f"/v2/{name}/blobs/uploads/")
    return url.with_query(query) if query else url


@dataclass(frozen=True)
class Reply:
    """A response, read whole: `url` is the absolute request URL Location and Link headers resolve against."""

    method: str
    url: URL
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").partition(";")[0].strip()

    def json(self) -> Any:
        return json.loads(self.body)


def describe(response: Reply) -> str:
    body = response.body.decode(errors="replace")
    return f"{response.method} {response.url.path_qs} -> {response.status} {body[:500]}"


class Registry:
    """Requests in the shapes the spec gives; every response body is read, so it can be inspected."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    async def request(
        self, method: str, url: str | URL, *, data: Any = None, headers: Mapping[str, str] | None = None
    ) -> Reply:
        async with self.client.request(
            method, url, data=data, headers=dict(headers or {}), allow_redirects=False
        ) as response:
            body = await response.read()
            return Reply(method, response.url, response.status, response.headers, body)

    def location(self, response: Reply) -> URL:
        value = response.headers.get("Location")
        assert value, f"no Location: {describe(response)}"
        return resolve(response.url, value)

    # blobs

    async def start_upload(self, name: str, **query: str) -> Reply:
        """POST /v2/<name>/blobs/uploads/ with `Content-Length: 0` (end-4a, end-11 with mount/from)."""
        return await self.request("POST", uploads_url(name, **query), data=b"")

    async def new_upload(self, name: str) -> URL:
        response = await self.start_upload(name)
        assert response.status == 202, describe(response)
        return self.location(response)

    async def patch(
        self, url: URL, chunk: Any, *, start: int | None = None, length: int | None = None
    ) -> Reply:
        """PATCH <location> (end-5); with `start` a chunk with `Content-Range: <start>-<end>`."""
        headers = {"Content-Type": OCTET_STREAM}
        if start is not None:
            size = len(chunk) if length is None else length
            headers["Content-Range"] = f"{start}-{start + size - 1}"
        return await self.request("PATCH", url, data=chunk, headers=headers)

    async def finish(
        self,
        url: URL,
        digest: str | None,
        data: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """PUT <location>?digest=<digest> (end-6), keeping the query the location already has."""
        target = url.update_query(digest=digest) if digest is not None else url
        return await self.request(
            "PUT", target, data=data, headers={"Content-Type": OCTET_STREAM, **(headers or {})}
        )

    async def put_blob(self, name: str, data: bytes, digest: str | None = None) -> Reply:
        """POST then PUT: the monolithic upload every client supports."""
        url = await self.new_upload(name)
        return await self.finish(url, digest_of(data) if digest is None else digest, data)

    async def push_blob(self, name: str, blob: Content | bytes) -> Reply:
        data = blob.data if isinstance(blob, Content) else blob
        response = await self.put_blob(name, data)
        assert response.status == 201, describe(response)
        return response

    async def get_blob(self, name: str, digest: str, **headers: str) -> Reply:
        return await self.request("GET", blob_path(name, digest), headers=headers)

    async def head_blob(self, name: str, digest: str) -> Reply:
        return await self.request("HEAD", blob_path(name, digest))

    async def delete_blob(self, name: str, digest: str) -> Reply:
        return await self.request("DELETE", blob_path(name, digest))

    # manifests

    async def put_manifest(
        self, name: str, reference: str, manifest: Content, content_type: str | None = None
    ) -> Reply:
        return await self.request(
            "PUT",
            manifest_path(name, reference),
            data=manifest.data,
            headers={"Content-Type": content_type or manifest.media_type},
        )

    async def push_manifest(self, name: str, reference: str, manifest: Content) -> Reply:
        response = await self.put_manifest(name, reference, manifest)
        assert response.status == 201, describe(response)
        return response

    async def push_image(self, name: str, image: Image, reference: str | None = None) -> Reply:
        for blob in image.blobs:
            await self.push_blob(name, blob)
        return await self.push_manifest(name, reference or image.manifest.digest, image.manifest)

    async def get_manifest(self, name: str, reference: str) -> Reply:
        accept = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
        return await self.request("GET", manifest_path(name, reference), headers={"Accept": accept})

    async def head_manifest(self, name: str, reference: str) -> Reply:
        accept = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
        return await self.request("HEAD", manifest_path(name, reference), headers={"Accept": accept})

    async def delete_manifest(self, name: str, reference: str) -> Reply:
        return await self.request("DELETE", manifest_path(name, reference))

    # discovery

    async def tags(self, name: str, **query: str) -> Reply:
        url = URL(f"/v2/{name}/tags/list")
        return await self.request("GET", url.with_query(query) if query else url)

    async def referrers(self, name: str, digest: str, **query: str) -> Reply:
        url = URL(f"/v2/{name}/referrers/{digest}")
        return await self.request("GET", url.with_query(query) if query else url)


def assert_error(response: Reply, status: int, code: str) -> list[dict[str, Any]]:
    """The status, and for a body the spec's error JSON: `{"errors": [{"code", "message", "detail"?}]}`,
    every error of `code` (several for several missing blobs)."""
    assert response.status == status, describe(response)
    if response.method == "HEAD":
        assert response.body == b""
        return []
    assert response.content_type == "application/json", describe(response)
    body = response.json()
    assert isinstance(body, dict) and list(body) == ["errors"], body
    errors = body["errors"]
    assert isinstance(errors, list) and errors, body
    for error in errors:
        assert set(error) <= {"code", "message", "detail"}, error
        assert re.fullmatch(r"[A-Z_]+", error["code"]), error
        assert isinstance(error["message"], str), error
    assert {error["code"] for error in errors} == {code}, body
    return errors


def content_range(response: Reply) -> str:
    return response.headers.get("Range", "")


# ---- fixtures -------------------------------------------------------------------------------------------

# Docker calls that change nothing Docker has (loading a pushed image only adds one).
NON_DESTRUCTIVE_DOCKER_CALLS = frozenset({"daemon", "repo_tags", "inspect", "pull", "save", "load"})


@dataclass
class RecordingDocker(FakeDocker):
    """FakeDocker that also notes every Docker operation the fake does not define (untag, prune, …)."""

    other_calls: list[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        self.other_calls.append(name)

        async def call(*_args: Any, **_kwargs: Any) -> None:
            return None

        return call

    def destructive_calls(self) -> list[str]:
        """`docker rmi` (the fake's `remove`) of an image the registry did not load there itself for a
        push, and any unknown operation."""
        removed = [f"remove {ref}" for ref in self.removes if ref not in self.loads]
        return removed + [name for name in self.other_calls if name not in NON_DESTRUCTIVE_DOCKER_CALLS]


@pytest.fixture
def docker() -> RecordingDocker:
    return RecordingDocker()


@pytest.fixture
async def registry(aiohttp_client: Any, store: Store, docker: RecordingDocker) -> Registry:
    return Registry(await aiohttp_client(create_app(assemble(store, docker))))


def test_resolve_keeps_queries_and_handles_relative_and_absolute_locations() -> None:
    base = URL("http://127.0.0.1:5000/v2/conformance/push/blobs/uploads/")
    assert resolve(base, "/v2/x/blobs/uploads/u1?_state=a%2Bb") == URL("/v2/x/blobs/uploads/u1?_state=a%2Bb")
    assert resolve(base, "http://127.0.0.1:5000/v2/x/blobs/uploads/u2?s=1") == URL(
        "/v2/x/blobs/uploads/u2?s=1"
    )
    assert resolve(base, "u3?s=2") == URL("/v2/conformance/push/blobs/uploads/u3?s=2")
    assert resolve(base, "u3").update_query(digest="sha256:ab") == URL(
        "/v2/conformance/push/blobs/uploads/u3?digest=sha256:ab"
    )


# ==== Pull ===============================================================================================


@dataclass(frozen=True)
class Pulled:
    name: str
    tag: str
    image: Image
    other: Image
    index: Content
    index_tag: str


@pytest.fixture
async def pulled(registry: Registry) -> Pulled:
    """The suite's pull setup: an image pushed by tag, a second one by digest, and an index over both."""
    name = "conformance/pull"
    image = make_image("pull-amd64")
    other = make_image("pull-arm64", arch="arm64")
    await registry.push_image(name, image, "tagtest0")
    await registry.push_image(name, other)
    index = make_index(
        [image.manifest, other.manifest],
        platforms=[{"os": "linux", "architecture": "amd64"}, {"os": "linux", "architecture": "arm64"}],
    )
    await registry.push_manifest(name, "multi", index)
    return Pulled(name, "tagtest0", image, other, index, "multi")


def assert_manifest_response(response: Reply, manifest: Content, *, head: bool) -> None:
    assert response.status == 200, describe(response)
    # No parameters on Content-Type (spec: SHOULD NOT; the suite compares it whole).
    assert response.headers["Content-Type"] == manifest.media_type
    assert response.headers["Docker-Content-Digest"] == manifest.digest
    assert response.headers["Content-Length"] == str(manifest.size)
    assert response.body == (b"" if head else manifest.data)


def assert_blob_response(response: Reply, blob: Content, *, head: bool) -> None:
    assert response.status == 200, describe(response)
    assert response.headers["Docker-Content-Digest"] == blob.digest
    assert response.headers["Content-Length"] == str(blob.size)
    assert response.body == (b"" if head else blob.data)


class TestPull:
    async def test_api_version_check(self, registry: Registry) -> None:
        response = await registry.request("GET", "/v2/")
        assert response.status == 200
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"

    async def test_get_manifest_by_tag(self, registry: Registry, pulled: Pulled) -> None:
        response = await registry.get_manifest(pulled.name, pulled.tag)
        assert_manifest_response(response, pulled.image.manifest, head=False)

    async def test_head_manifest_by_tag(self, registry: Registry, pulled: Pulled) -> None:
        response = await registry.head_manifest(pulled.name, pulled.tag)
        assert_manifest_response(response, pulled.image.manifest, head=True)

    @pytest.mark.parametrize("which", ["image", "other"])
    async def test_get_and_head_manifest_by_digest(
        self, registry: Registry, pulled: Pulled, which: str
    ) -> None:
        manifest = getattr(pulled, which).manifest
        got = await registry.get_manifest(pulled.name, manifest.digest)
        assert_manifest_response(got, manifest, head=False)
        head = await registry.head_manifest(pulled.name, manifest.digest)
        assert_manifest_response(head, manifest, head=True)

    async def test_get_and_head_index(self, registry: Registry, pulled: Pulled) -> None:
        for reference in (pulled.index_tag, pulled.index.digest):
            assert_manifest_response(
                await registry.get_manifest(pulled.name, reference), pulled.index, head=False
            )
            assert_manifest_response(
                await registry.head_manifest(pulled.name, reference), pulled.index, head=True
            )

    @pytest.mark.parametrize("which", ["config", "layer 0", "layer 1"])
    async def test_get_and_head_blob(self, registry: Registry, pulled: Pulled, which: str) -> None:
        blob = pulled.image.config if which == "config" else pulled.image.layers[int(which[-1])]
        assert_blob_response(await registry.get_blob(pulled.name, blob.digest), blob, head=False)
        assert_blob_response(await registry.head_blob(pulled.name, blob.digest), blob, head=True)

    @pytest.mark.parametrize(
        ("range_header", "start", "stop"),
        [
            ("bytes=0-", 0, None),
            ("bytes=0-0", 0, 1),
            ("bytes=10-99", 10, 100),
            ("bytes=100-", 100, None),
            ("bytes=-50", -50, None),
            # A last position past the end means "to the end" (RFC 9110 §14.1.1).
            ("bytes=1000-99999999", 1000, None),
        ],
    )
    async def test_blob_range(
        self, registry: Registry, pulled: Pulled, range_header: str, start: int, stop: int | None
    ) -> None:
        blob = pulled.image.layers[1]
        response = await registry.get_blob(pulled.name, blob.digest, Range=range_header)
        assert response.status == 206, describe(response)
        expected = blob.data[start:stop]
        assert response.body == expected
        first = start % blob.size
        assert response.headers["Content-Range"] == f"bytes {first}-{first + len(expected) - 1}/{blob.size}"
        assert response.headers["Content-Length"] == str(len(expected))

    @pytest.mark.parametrize("range_header", ["bytes={size}-", "bytes=99999999-"])
    async def test_blob_range_beyond_the_end_is_416(
        self, registry: Registry, pulled: Pulled, range_header: str
    ) -> None:
        blob = pulled.image.layers[1]
        response = await registry.get_blob(
            pulled.name, blob.digest, Range=range_header.format(size=blob.size)
        )
        assert response.status == 416, describe(response)
        assert response.headers["Content-Range"] == f"bytes */{blob.size}"

    async def test_unknown_tag_is_404_manifest_unknown(self, registry: Registry, pulled: Pulled) -> None:
        assert_error(await registry.get_manifest(pulled.name, "nope"), 404, "MANIFEST_UNKNOWN")
        assert_error(await registry.head_manifest(pulled.name, "nope"), 404, "MANIFEST_UNKNOWN")

    async def test_unknown_digest_is_404_manifest_unknown(self, registry: Registry, pulled: Pulled) -> None:
        assert_error(await registry.get_manifest(pulled.name, DUMMY_DIGEST), 404, "MANIFEST_UNKNOWN")
        assert_error(await registry.head_manifest(pulled.name, DUMMY_DIGEST), 404, "MANIFEST_UNKNOWN")

    async def test_suite_nonexistent_manifest_is_404(self, registry: Registry, pulled: Pulled) -> None:
        # The suite's "GET/HEAD nonexistent manifest should return 404" asks for this reference, which is
        # not a valid tag: a pull of it must still be a plain 404, not 400 TAG_INVALID.
        for response in (
            await registry.get_manifest(pulled.name, NONEXISTENT_MANIFEST),
            await registry.head_manifest(pulled.name, NONEXISTENT_MANIFEST),
        ):
            assert response.status == 404, describe(response)

    async def test_unknown_blob_is_404_blob_unknown(self, registry: Registry, pulled: Pulled) -> None:
        assert_error(await registry.get_blob(pulled.name, DUMMY_DIGEST), 404, "BLOB_UNKNOWN")
        assert_error(await registry.head_blob(pulled.name, DUMMY_DIGEST), 404, "BLOB_UNKNOWN")

    async def test_nonexistent_repository_is_404(self, registry: Registry) -> None:
        # "An attempt to pull a nonexistent repository MUST return response code 404 Not Found"; which
        # code is not said (NAME_UNKNOWN and MANIFEST_UNKNOWN both describe it).
        name = "conformance/never-pushed"
        for response in (
            await registry.get_manifest(name, "latest"),
            await registry.get_manifest(name, DUMMY_DIGEST),
        ):
            assert response.status == 404, describe(response)
            (error,) = (response.json())["errors"]
            assert error["code"] in {"NAME_UNKNOWN", "MANIFEST_UNKNOWN"}
        assert_error(await registry.get_blob(name, DUMMY_DIGEST), 404, "BLOB_UNKNOWN")

    async def test_content_is_scoped_to_its_repository(self, registry: Registry, pulled: Pulled) -> None:
        elsewhere = "conformance/pull-elsewhere"
        blob = Content(random_bytes("only-elsewhere", 100), OCTET_STREAM)
        await registry.push_blob(elsewhere, blob)
        assert_error(await registry.get_blob(pulled.name, blob.digest), 404, "BLOB_UNKNOWN")
        layer = pulled.image.layers[0]
        assert_error(await registry.get_blob(elsewhere, layer.digest), 404, "BLOB_UNKNOWN")
        assert_error(
            await registry.get_manifest(elsewhere, pulled.image.manifest.digest), 404, "MANIFEST_UNKNOWN"
        )
        assert_error(await registry.get_manifest(elsewhere, pulled.tag), 404, "MANIFEST_UNKNOWN")

    @pytest.mark.parametrize(
        "path",
        [
            "/v2/conformance/pull/manifests/sha256:totallywrong",
            "/v2/conformance/pull/manifests/sha256:" + "A" * 64,
            "/v2/conformance/pull/manifests/sha256:" + "a" * 63,
            "/v2/conformance/pull/blobs/sha256:xyz",
            "/v2/conformance/pull/blobs/tagtest0",
        ],
    )
    async def test_invalid_digest_is_400_digest_invalid(self, registry: Registry, path: str) -> None:
        # The suite: a 400 here must carry an error code of the spec's list.
        assert_error(await registry.request("GET", path), 400, "DIGEST_INVALID")

    @pytest.mark.parametrize(
        "path",
        [
            "/v2/Conformance/pull/manifests/latest",
            "/v2/conformance/pull-/manifests/latest",
            "/v2/conformance/-pull/blobs/" + DUMMY_DIGEST,
            "/v2/conformance/a..b/tags/list",
            "/v2/conformance/pull./referrers/" + DUMMY_DIGEST,
        ],
    )
    async def test_invalid_name_is_400_name_invalid(self, registry: Registry, path: str) -> None:
        assert_error(await registry.request("GET", path), 400, "NAME_INVALID")

    async def test_error_codes_are_from_the_spec(self, registry: Registry) -> None:
        response = await registry.get_manifest("conformance/pull", "sha256:totallywrong")
        errors = assert_error(response, 400, "DIGEST_INVALID")
        assert {error["code"] for error in errors} <= SPEC_ERROR_CODES


# ==== Push ===============================================================================================

PUSH = "conformance/push"


def chunk_size(post: Reply) -> int:
    """Chunks at least as large as the registry's OCI-Chunk-Min-Length, if it gives one."""
    return max(int(post.headers.get("OCI-Chunk-Min-Length", "0")), 1000)


async def assert_stored(registry: Registry, name: str, data: bytes) -> None:
    response = await registry.get_blob(name, digest_of(data))
    assert_blob_response(response, Content(data, OCTET_STREAM), head=False)


def assert_blob_created(registry: Registry, response: Reply, name: str, digest: str) -> None:
    assert response.status == 201, describe(response)
    assert registry.location(response).path == blob_path(name, digest)
    assert response.headers["Docker-Content-Digest"] == digest


class TestPushBlobs:
    async def test_post_starts_an_upload_session(self, registry: Registry) -> None:
        response = await registry.start_upload(PUSH)
        assert response.status == 202, describe(response)
        location = registry.location(response)
        assert location.path.startswith(f"/v2/{PUSH}/blobs/uploads/")
        session = response.headers["Docker-Upload-UUID"]
        assert session and session in str(location)
        other = await registry.start_upload(PUSH)
        assert registry.location(other) != location
        assert other.headers["Docker-Upload-UUID"] != session

    async def test_single_post_with_digest(self, registry: Registry) -> None:
        data = random_bytes("single-post", 4242)
        response = await registry.request(
            "POST",
            uploads_url(PUSH, digest=digest_of(data)),
            data=data,
            headers={"Content-Type": OCTET_STREAM},
        )
        assert_blob_created(registry, response, PUSH, digest_of(data))
        pulled = await registry.request("GET", registry.location(response))
        assert pulled.status == 200 and pulled.body == data

    async def test_single_post_with_a_wrong_digest_stores_nothing(self, registry: Registry) -> None:
        data = random_bytes("single-post-wrong", 500)
        claimed = digest_of(b"something else")
        response = await registry.request(
            "POST", uploads_url(PUSH, digest=claimed), data=data, headers={"Content-Type": OCTET_STREAM}
        )
        assert_error(response, 400, "DIGEST_INVALID")
        assert_error(await registry.head_blob(PUSH, claimed), 404, "BLOB_UNKNOWN")
        assert_error(await registry.head_blob(PUSH, digest_of(data)), 404, "BLOB_UNKNOWN")

    async def test_post_then_put(self, registry: Registry) -> None:
        data = random_bytes("post-put", 5000)
        response = await registry.put_blob(PUSH, data)
        assert_blob_created(registry, response, PUSH, digest_of(data))
        await assert_stored(registry, PUSH, data)
        assert_blob_response(await registry.head_blob(PUSH, digest_of(data)), Content(data, ""), head=True)

    async def test_chunked_upload(self, registry: Registry) -> None:
        post = await registry.start_upload(PUSH)
        assert post.status == 202, describe(post)
        size = chunk_size(post)
        data = random_bytes("chunked", 2 * size + 10)
        first, second = data[: size + 1], data[size + 1 :]

        patched = await registry.patch(registry.location(post), first, start=0)
        assert patched.status == 202, describe(patched)
        assert content_range(patched) == f"0-{len(first) - 1}"
        patched = await registry.patch(registry.location(patched), second, start=len(first))
        assert patched.status == 202, describe(patched)
        assert content_range(patched) == f"0-{len(data) - 1}"

        done = await registry.finish(registry.location(patched), digest_of(data))
        assert_blob_created(registry, done, PUSH, digest_of(data))
        await assert_stored(registry, PUSH, data)

    async def test_chunked_upload_with_the_last_chunk_in_the_put(self, registry: Registry) -> None:
        post = await registry.start_upload(PUSH)
        size = chunk_size(post)
        data = random_bytes("chunked-put", 2 * size + 3)
        first, last = data[: size + 1], data[size + 1 :]
        patched = await registry.patch(registry.location(post), first, start=0)
        assert patched.status == 202, describe(patched)
        done = await registry.finish(
            registry.location(patched),
            digest_of(data),
            last,
            headers={"Content-Range": f"{len(first)}-{len(data) - 1}"},
        )
        assert_blob_created(registry, done, PUSH, digest_of(data))
        await assert_stored(registry, PUSH, data)

    async def test_upload_status(self, registry: Registry) -> None:
        post = await registry.start_upload(PUSH)
        fresh = await registry.request("GET", registry.location(post))
        assert fresh.status == 204, describe(fresh)
        assert registry.location(fresh).path.startswith(f"/v2/{PUSH}/blobs/uploads/")

        chunk = random_bytes("status", chunk_size(post))
        patched = await registry.patch(registry.location(post), chunk, start=0)
        assert patched.status == 202, describe(patched)
        status = await registry.request("GET", registry.location(patched))
        assert status.status == 204, describe(status)
        assert content_range(status) == f"0-{len(chunk) - 1}"
        assert status.body == b""
        done = await registry.finish(registry.location(status), digest_of(chunk))
        assert done.status == 201, describe(done)

    async def test_out_of_order_chunk_is_416_and_the_upload_goes_on(self, registry: Registry) -> None:
        post = await registry.start_upload(PUSH)
        size = chunk_size(post)
        data = random_bytes("out-of-order", 2 * size + 42)
        first, second = data[: size + 1], data[size + 1 :]
        url = registry.location(post)

        skipped = await registry.patch(url, second, start=len(first))
        assert skipped.status == 416, describe(skipped)

        status = await registry.request("GET", url)
        assert status.status == 204, describe(status)
        url = registry.location(status)
        patched = await registry.patch(url, first, start=0)
        assert patched.status == 202, describe(patched)
        patched = await registry.patch(registry.location(patched), second, start=len(first))
        assert patched.status == 202, describe(patched)
        done = await registry.finish(registry.location(patched), digest_of(data))
        assert_blob_created(registry, done, PUSH, digest_of(data))
        await assert_stored(registry, PUSH, data)

    async def test_retried_chunk_is_416_and_get_tells_where_to_go_on(self, registry: Registry) -> None:
        post = await registry.start_upload(PUSH)
        size = chunk_size(post)
        data = random_bytes("retry", 2 * size + 1)
        first, second = data[: size + 1], data[size + 1 :]
        stale = registry.location(post)
        assert (await registry.patch(stale, first, start=0)).status == 202

        retried = await registry.patch(stale, first, start=0)
        assert retried.status == 416, describe(retried)
        status = await registry.request("GET", stale)
        assert status.status == 204, describe(status)
        assert content_range(status) == f"0-{len(first) - 1}"

        patched = await registry.patch(registry.location(status), second, start=len(first))
        assert patched.status == 202, describe(patched)
        done = await registry.finish(registry.location(patched), digest_of(data))
        assert done.status == 201, describe(done)
        await assert_stored(registry, PUSH, data)

    async def test_streamed_patch_without_content_range(self, registry: Registry) -> None:
        data = random_bytes("streamed", 3000)
        patched = await registry.patch(await registry.new_upload(PUSH), data)
        assert patched.status == 202, describe(patched)
        assert content_range(patched) == f"0-{len(data) - 1}"
        done = await registry.finish(registry.location(patched), digest_of(data))
        assert_blob_created(registry, done, PUSH, digest_of(data))
        await assert_stored(registry, PUSH, data)

    async def test_streamed_patch_in_chunked_transfer_encoding(self, registry: Registry) -> None:
        # What `docker push` sends: one PATCH, no Content-Range, no Content-Length, chunked encoding.
        data = random_bytes("docker-push", 200_000)

        async def body() -> AsyncIterator[bytes]:
            for offset in range(0, len(data), 65536):
                yield data[offset : offset + 65536]

        patched = await registry.patch(await registry.new_upload(PUSH), body())
        assert patched.status == 202, describe(patched)
        assert content_range(patched) == f"0-{len(data) - 1}"
        done = await registry.finish(registry.location(patched), digest_of(data))
        assert_blob_created(registry, done, PUSH, digest_of(data))
        await assert_stored(registry, PUSH, data)

    async def test_put_with_a_wrong_digest_stores_nothing(self, registry: Registry) -> None:
        data = random_bytes("wrong-digest", 1234)
        claimed = digest_of(b"not these bytes")
        response = await registry.put_blob(PUSH, data, digest=claimed)
        assert_error(response, 400, "DIGEST_INVALID")
        assert_error(await registry.head_blob(PUSH, claimed), 404, "BLOB_UNKNOWN")
        assert_error(await registry.head_blob(PUSH, digest_of(data)), 404, "BLOB_UNKNOWN")

    async def test_put_without_a_digest_is_400(self, registry: Registry) -> None:
        data = random_bytes("no-digest", 100)
        response = await registry.finish(await registry.new_upload(PUSH), None, data)
        assert_error(response, 400, "DIGEST_INVALID")
        assert_error(await registry.head_blob(PUSH, digest_of(data)), 404, "BLOB_UNKNOWN")

    async def test_cancel_an_upload(self, registry: Registry) -> None:
        data = random_bytes("cancelled", 300)
        url = await registry.new_upload(PUSH)
        assert (await registry.patch(url, data, start=0)).status == 202
        cancelled = await registry.request("DELETE", url)
        assert cancelled.status == 204, describe(cancelled)
        assert_error(await registry.request("GET", url), 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(await registry.finish(url, digest_of(data)), 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(await registry.head_blob(PUSH, digest_of(data)), 404, "BLOB_UNKNOWN")

    @pytest.mark.parametrize("method", ["GET", "PATCH", "PUT", "DELETE"])
    async def test_unknown_upload_is_404_blob_upload_unknown(self, registry: Registry, method: str) -> None:
        url = URL(f"/v2/{PUSH}/blobs/uploads/6d4b3c1e-0000-4000-8000-000000000000")
        if method == "PUT":
            url = url.with_query(digest=DUMMY_DIGEST)
        response = await registry.request(
            method,
            url,
            data=b"hello world" if method != "GET" else None,
            headers={"Content-Type": OCTET_STREAM},
        )
        assert_error(response, 404, "BLOB_UPLOAD_UNKNOWN")

    async def test_upload_used_under_another_repository(self, registry: Registry) -> None:
        data = random_bytes("other-repo", 700)
        url = await registry.new_upload("conformance/push-a")
        prefix = "/v2/conformance/push-a/blobs/uploads/"
        assert url.path.startswith(prefix)
        moved = url.with_path("/v2/conformance/push-b/blobs/uploads/" + url.path.removeprefix(prefix))
        moved = moved.with_query(url.query)

        assert_error(await registry.request("GET", moved), 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(await registry.patch(moved, data, start=0), 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(await registry.finish(moved, digest_of(data), data), 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(await registry.head_blob("conformance/push-b", digest_of(data)), 404, "BLOB_UNKNOWN")

        done = await registry.finish(url, digest_of(data), data)
        assert_blob_created(registry, done, "conformance/push-a", digest_of(data))

    async def test_empty_blob(self, registry: Registry) -> None:
        empty = digest_of(b"")
        response = await registry.put_blob(PUSH, b"")
        assert_blob_created(registry, response, PUSH, empty)
        assert_blob_response(await registry.get_blob(PUSH, empty), Content(b"", OCTET_STREAM), head=False)
        assert_blob_response(await registry.head_blob(PUSH, empty), Content(b"", OCTET_STREAM), head=True)

    async def test_cross_repository_mount(self, registry: Registry) -> None:
        data = random_bytes("mounted", 2048)
        await registry.push_blob("conformance/mount-source", data)
        response = await registry.start_upload(
            "conformance/mount-target", mount=digest_of(data), **{"from": "conformance/mount-source"}
        )
        assert_blob_created(registry, response, "conformance/mount-target", digest_of(data))
        pulled = await registry.request("GET", registry.location(response))
        assert pulled.status == 200 and pulled.body == data

    async def test_mount_of_a_blob_the_source_lacks_starts_an_upload(self, registry: Registry) -> None:
        data = random_bytes("not-mounted", 1500)
        await registry.push_blob("conformance/mount-source", random_bytes("something else", 10))
        response = await registry.start_upload(
            "conformance/mount-target", mount=digest_of(data), **{"from": "conformance/mount-source"}
        )
        assert response.status == 202, describe(response)
        url = registry.location(response)
        assert url.path.startswith("/v2/conformance/mount-target/blobs/uploads/")
        done = await registry.finish(url, digest_of(data), data)
        assert_blob_created(registry, done, "conformance/mount-target", digest_of(data))
        await assert_stored(registry, "conformance/mount-target", data)

    async def test_mount_without_from_of_an_unknown_blob_starts_an_upload(self, registry: Registry) -> None:
        response = await registry.start_upload("conformance/mount-target", mount=DUMMY_DIGEST)
        assert response.status == 202, describe(response)
        assert registry.location(response).path.startswith("/v2/conformance/mount-target/blobs/uploads/")


class TestPushManifests:
    async def test_put_by_tag(self, registry: Registry) -> None:
        image = make_image("by-tag")
        for blob in image.blobs:
            await registry.push_blob(PUSH, blob)
        response = await registry.put_manifest(PUSH, "v1", image.manifest)
        assert response.status == 201, describe(response)
        assert response.headers["Docker-Content-Digest"] == image.manifest.digest
        at_location = await registry.request("GET", registry.location(response))
        assert_manifest_response(at_location, image.manifest, head=False)
        assert_manifest_response(await registry.get_manifest(PUSH, "v1"), image.manifest, head=False)
        digest = image.manifest.digest
        assert_manifest_response(await registry.get_manifest(PUSH, digest), image.manifest, head=False)

    async def test_put_by_digest(self, registry: Registry) -> None:
        image = make_image("by-digest")
        response = await registry.push_image(PUSH, image)
        assert response.headers["Docker-Content-Digest"] == image.manifest.digest
        at_location = await registry.request("GET", registry.location(response))
        assert_manifest_response(at_location, image.manifest, head=False)

    async def test_put_under_several_tags(self, registry: Registry) -> None:
        image = make_image("several-tags")
        await registry.push_image(PUSH, image)
        for i in range(4):
            await registry.push_manifest(PUSH, f"test{i}", image.manifest)
        for i in range(4):
            assert_manifest_response(
                await registry.get_manifest(PUSH, f"test{i}"), image.manifest, head=False
            )

    async def test_manifest_without_layers(self, registry: Registry) -> None:
        image = make_image("no-layers", layer_sizes=())
        response = await registry.push_image(PUSH, image, "emptylayer")
        assert response.headers["Docker-Content-Digest"] == image.manifest.digest
        assert_manifest_response(await registry.get_manifest(PUSH, "emptylayer"), image.manifest, head=False)

    async def test_push_to_an_existing_tag_moves_it(self, registry: Registry) -> None:
        old, new = make_image("retag-old"), make_image("retag-new")
        await registry.push_image(PUSH, old, "latest")
        await registry.push_image(PUSH, new, "latest")
        assert_manifest_response(await registry.get_manifest(PUSH, "latest"), new.manifest, head=False)
        assert_manifest_response(
            await registry.get_manifest(PUSH, old.manifest.digest), old.manifest, head=False
        )

    async def test_exact_bytes_are_kept(self, registry: Registry) -> None:
        image = make_image("exact")
        body = json.loads(image.manifest.data)
        odd = ("{\r\n   " + json.dumps(body, indent=5, ensure_ascii=True)[1:] + "  \n\n").encode()
        manifest = Content(odd, OCI_MANIFEST)
        for blob in image.blobs:
            await registry.push_blob(PUSH, blob)
        response = await registry.push_manifest(PUSH, "exact", manifest)
        assert response.headers["Docker-Content-Digest"] == manifest.digest
        assert_manifest_response(await registry.get_manifest(PUSH, "exact"), manifest, head=False)

    async def test_missing_layers_are_manifest_blob_unknown(self, registry: Registry) -> None:
        image = make_image("missing-layers")
        await registry.push_blob(PUSH, image.config)
        response = await registry.put_manifest(PUSH, "broken", image.manifest)
        errors = assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
        assert len(errors) >= 1
        assert_error(await registry.get_manifest(PUSH, "broken"), 404, "MANIFEST_UNKNOWN")
        assert_error(await registry.get_manifest(PUSH, image.manifest.digest), 404, "MANIFEST_UNKNOWN")

    async def test_missing_config_is_manifest_blob_unknown(self, registry: Registry) -> None:
        image = make_image("missing-config")
        for layer in image.layers:
            await registry.push_blob(PUSH, layer)
        response = await registry.put_manifest(PUSH, image.manifest.digest, image.manifest)
        assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
        assert_error(await registry.get_manifest(PUSH, image.manifest.digest), 404, "MANIFEST_UNKNOWN")

    @pytest.mark.parametrize("body", [b"blablabla", b'{"schemaVersion": 2, "mediaType": ', b"[]"])
    async def test_malformed_manifest_is_manifest_invalid(self, registry: Registry, body: bytes) -> None:
        response = await registry.put_manifest(PUSH, "malformed", Content(body, OCI_MANIFEST))
        assert_error(response, 400, "MANIFEST_INVALID")
        assert_error(await registry.get_manifest(PUSH, "malformed"), 404, "MANIFEST_UNKNOWN")

    async def test_digest_not_matching_the_body_is_digest_invalid(self, registry: Registry) -> None:
        image = make_image("mismatch")
        for blob in image.blobs:
            await registry.push_blob(PUSH, blob)
        claimed = digest_of(image.manifest.data + b" ")
        response = await registry.put_manifest(PUSH, claimed, image.manifest)
        assert_error(response, 400, "DIGEST_INVALID")
        assert_error(await registry.get_manifest(PUSH, claimed), 404, "MANIFEST_UNKNOWN")
        assert_error(await registry.get_manifest(PUSH, image.manifest.digest), 404, "MANIFEST_UNKNOWN")

    async def test_index(self, registry: Registry) -> None:
        amd64, arm64 = make_image("index-amd64"), make_image("index-arm64", arch="arm64")
        await registry.push_image(PUSH, amd64)
        await registry.push_image(PUSH, arm64)
        index = make_index(
            [amd64.manifest, arm64.manifest],
            platforms=[{"os": "linux", "architecture": "amd64"}, {"os": "linux", "architecture": "arm64"}],
        )
        response = await registry.push_manifest(PUSH, "multi", index)
        assert response.headers["Docker-Content-Digest"] == index.digest
        assert_manifest_response(await registry.get_manifest(PUSH, "multi"), index, head=False)

    async def test_index_with_an_unknown_child_is_manifest_blob_unknown(self, registry: Registry) -> None:
        pushed, absent = make_image("child-pushed"), make_image("child-absent")
        await registry.push_image(PUSH, pushed)
        index = make_index([pushed.manifest, absent.manifest])
        assert_error(await registry.put_manifest(PUSH, "partial", index), 400, "MANIFEST_BLOB_UNKNOWN")
        assert_error(await registry.get_manifest(PUSH, "partial"), 404, "MANIFEST_UNKNOWN")

    async def test_manifest_with_subject_gets_oci_subject(self, registry: Registry) -> None:
        subject = make_image("subject")
        await registry.push_image(PUSH, subject, "subject")
        artifact = make_artifact("sbom", subject.manifest, artifact_type="application/vnd.example.sbom.v1")
        response = await registry.push_image(PUSH, artifact)
        assert response.headers["OCI-Subject"] == subject.manifest.digest
        assert response.headers["Docker-Content-Digest"] == artifact.manifest.digest

    async def test_subject_need_not_exist(self, registry: Registry) -> None:
        absent = make_image("never-pushed-subject")
        artifact = make_artifact("dangling", absent.manifest, config_type="application/vnd.example.config.v1")
        response = await registry.push_image(PUSH, artifact)
        assert response.headers["OCI-Subject"] == absent.manifest.digest
        assert_manifest_response(
            await registry.get_manifest(PUSH, artifact.manifest.digest), artifact.manifest, head=False
        )

    async def test_index_with_subject_gets_oci_subject(self, registry: Registry) -> None:
        subject = make_image("index-subject")
        await registry.push_image(PUSH, subject)
        child = make_artifact("index-child", subject.manifest, artifact_type="application/vnd.example.a")
        await registry.push_image(PUSH, child)
        index = make_index(
            [child.manifest], subject=subject.manifest, artifact_type="application/vnd.example.i"
        )
        response = await registry.push_manifest(PUSH, index.digest, index)
        assert response.headers["OCI-Subject"] == subject.manifest.digest

    async def test_docker_manifest_and_manifest_list(self, registry: Registry) -> None:
        amd64 = make_image("docker-amd64", docker=True)
        arm64 = make_image("docker-arm64", arch="arm64", docker=True)
        response = await registry.push_image(PUSH, amd64, "docker")
        assert response.headers["Docker-Content-Digest"] == amd64.manifest.digest
        await registry.push_image(PUSH, arm64)
        listed = make_index(
            [amd64.manifest, arm64.manifest],
            media_type=DOCKER_LIST,
            platforms=[{"os": "linux", "architecture": "amd64"}, {"os": "linux", "architecture": "arm64"}],
        )
        await registry.push_manifest(PUSH, "docker-list", listed)

        assert_manifest_response(await registry.get_manifest(PUSH, "docker"), amd64.manifest, head=False)
        assert_manifest_response(await registry.head_manifest(PUSH, "docker"), amd64.manifest, head=True)
        assert_manifest_response(await registry.get_manifest(PUSH, "docker-list"), listed, head=False)
        layer = amd64.layers[0]
        assert_blob_response(await registry.get_blob(PUSH, layer.digest), layer, head=False)

    async def test_put_with_an_invalid_tag_is_tag_invalid(self, registry: Registry) -> None:
        image = make_image("bad-tag")
        for blob in image.blobs:
            await registry.push_blob(PUSH, blob)
        for tag in ("-bad", ".bad", "a" * 129):
            assert_error(await registry.put_manifest(PUSH, tag, image.manifest), 400, "TAG_INVALID")

    async def test_put_under_an_invalid_name_is_name_invalid(self, registry: Registry) -> None:
        image = make_image("bad-name")
        response = await registry.put_manifest("Conformance/Push", "v1", image.manifest)
        assert_error(response, 400, "NAME_INVALID")
        assert_error(await registry.start_upload("conformance/push-"), 400, "NAME_INVALID")


# ==== Content Discovery ==================================================================================

DISCOVERY = "conformance/discovery"


async def push_tags(registry: Registry, name: str, tags: Sequence[str], seed: str = "") -> Image:
    image = make_image(f"tags-{name}{seed}")
    await registry.push_image(name, image)
    for tag in tags:
        await registry.push_manifest(name, tag, image.manifest)
    return image


def next_link(response: Reply) -> URL | None:
    """The `rel="next"` target of an RFC 5988 Link header, resolved against the request."""
    header = response.headers.get("Link")
    if header is None:
        return None
    match = re.fullmatch(r'\s*<([^>]*)>\s*;\s*rel="?next"?\s*', header)
    assert match, f"not a next link: {header!r}"
    return resolve(response.url, match[1])


class TestTagsList:
    async def test_pushed_tags_are_listed_sorted(self, registry: Registry) -> None:
        await push_tags(registry, DISCOVERY, ["test2", "test0", "latest", "test3", "test1"])
        response = await registry.tags(DISCOVERY)
        assert response.status == 200, describe(response)
        assert response.content_type == "application/json"
        assert response.json() == {
            "name": DISCOVERY,
            "tags": ["latest", "test0", "test1", "test2", "test3"],
        }
        assert "Link" not in response.headers

    async def test_pagination_with_n_and_the_link_header(self, registry: Registry) -> None:
        tags = ["t0", "t1", "t2", "t3", "t4"]
        await push_tags(registry, DISCOVERY, tags)
        seen: list[str] = []
        response = await registry.tags(DISCOVERY, n="2")
        pages = 0
        while True:
            assert response.status == 200, describe(response)
            page = (response.json())["tags"]
            link = next_link(response)
            # Fewer than n only on the last page (or with a Link header).
            assert len(page) == 2 or link is None
            seen += page
            pages += 1
            if link is None:
                break
            response = await registry.request("GET", link)
        assert seen == tags
        assert pages == 3

    async def test_n_larger_than_the_list(self, registry: Registry) -> None:
        await push_tags(registry, DISCOVERY, ["a", "b", "c"])
        response = await registry.tags(DISCOVERY, n="10")
        assert (response.json())["tags"] == ["a", "b", "c"]
        assert "Link" not in response.headers

    async def test_n_zero_is_an_empty_list_without_link(self, registry: Registry) -> None:
        await push_tags(registry, DISCOVERY, ["a", "b", "c"])
        response = await registry.tags(DISCOVERY, n="0")
        assert response.status == 200, describe(response)
        assert (response.json())["tags"] == []
        assert "Link" not in response.headers

    async def test_last(self, registry: Registry) -> None:
        await push_tags(registry, DISCOVERY, ["t0", "t1", "t2", "t3", "t4"])
        response = await registry.tags(DISCOVERY, n="2", last="t1")
        assert response.status == 200, describe(response)
        assert (response.json())["tags"] == ["t2", "t3"]
        # `n` is optional with `last`.
        rest = await registry.tags(DISCOVERY, last="t2")
        assert rest.json()["tags"] == ["t3", "t4"]

    async def test_unknown_repository_is_404_name_unknown(self, registry: Registry) -> None:
        assert_error(await registry.tags("conformance/never-pushed"), 404, "NAME_UNKNOWN")


class TestCatalog:
    async def test_pushed_repositories_are_listed(self, registry: Registry) -> None:
        await push_tags(registry, "conformance/catalog-b", ["v1"])
        await push_tags(registry, "conformance/catalog-a", ["v1"])
        response = await registry.request("GET", "/v2/_catalog")
        assert response.status == 200, describe(response)
        repositories = (response.json())["repositories"]
        assert repositories == sorted(repositories)
        assert {"conformance/catalog-a", "conformance/catalog-b"} <= set(repositories)


SBOM = "application/vnd.example.sbom.v1"
SIGNATURE = "application/vnd.example.signature.v1"
BUNDLE = "application/vnd.example.bundle.v1"


@dataclass(frozen=True)
class Referrers:
    name: str
    subject: Image
    by_config: Image
    by_field: Image
    typed_index: Content
    plain_index: Content
    unrelated: Image

    def expected(self) -> dict[str, dict[str, Any]]:
        """The descriptors the referrers list of `subject` must hold, by digest."""
        return {
            self.by_config.manifest.digest: self.by_config.manifest.descriptor(
                artifactType=SBOM, annotations={ANNOTATION: "by config"}
            ),
            self.by_field.manifest.digest: self.by_field.manifest.descriptor(
                artifactType=SIGNATURE, annotations={ANNOTATION: "by field"}
            ),
            self.typed_index.digest: self.typed_index.descriptor(
                artifactType=BUNDLE, annotations={ANNOTATION: "typed index"}
            ),
            # An index without artifactType: the descriptor has none either.
            self.plain_index.digest: self.plain_index.descriptor(annotations={ANNOTATION: "plain index"}),
        }


@pytest.fixture
async def referrers(registry: Registry) -> Referrers:
    """The suite's referrers setup: referrers pushed before and after their subject, typed by config media
    type, by the artifactType field, and indexes with and without artifactType."""
    name = "conformance/referrers"
    subject = make_image("referrers-subject")
    by_config = make_artifact(
        "by-config", subject.manifest, config_type=SBOM, annotations={ANNOTATION: "by config"}
    )
    by_field = make_artifact(
        "by-field", subject.manifest, artifact_type=SIGNATURE, annotations={ANNOTATION: "by field"}
    )
    await registry.push_image(name, by_config)  # before its subject
    await registry.push_image(name, subject, "subject")
    await registry.push_image(name, by_field)
    typed_index = make_index(
        [by_config.manifest, by_field.manifest],
        subject=subject.manifest,
        artifact_type=BUNDLE,
        annotations={ANNOTATION: "typed index"},
    )
    await registry.push_manifest(name, typed_index.digest, typed_index)
    plain_index = make_index(
        [by_field.manifest], subject=subject.manifest, annotations={ANNOTATION: "plain index"}
    )
    await registry.push_manifest(name, plain_index.digest, plain_index)
    unrelated = make_image("referrers-unrelated")
    await registry.push_image(name, unrelated, "unrelated")
    return Referrers(name, subject, by_config, by_field, typed_index, plain_index, unrelated)


def referrers_list(response: Reply) -> dict[str, dict[str, Any]]:
    """The descriptors of a referrers response, by digest, after checking its envelope."""
    assert response.status == 200, describe(response)
    assert response.headers["Content-Type"] == OCI_INDEX
    body = response.json()
    assert body["schemaVersion"] == 2
    assert body["mediaType"] == OCI_INDEX
    manifests = body["manifests"]
    assert isinstance(manifests, list)
    by_digest = {descriptor["digest"]: descriptor for descriptor in manifests}
    assert len(by_digest) == len(manifests), "duplicate descriptors"
    return by_digest


def assert_descriptors(found: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    assert set(found) == set(expected)
    for digest, descriptor in expected.items():
        listed = found[digest]
        assert {key: listed.get(key) for key in descriptor} == descriptor
        if "artifactType" not in descriptor:
            assert "artifactType" not in listed


class TestReferrers:
    async def test_lists_every_manifest_with_that_subject(
        self, registry: Registry, referrers: Referrers
    ) -> None:
        response = await registry.referrers(referrers.name, referrers.subject.manifest.digest)
        assert_descriptors(referrers_list(response), referrers.expected())
        assert "OCI-Filters-Applied" not in response.headers

    async def test_artifact_type_filter(self, registry: Registry, referrers: Referrers) -> None:
        digest = referrers.subject.manifest.digest
        for artifact_type in (SBOM, SIGNATURE, BUNDLE):
            response = await registry.referrers(referrers.name, digest, artifactType=artifact_type)
            assert response.headers["OCI-Filters-Applied"] == "artifactType"
            expected = {
                d: descriptor
                for d, descriptor in referrers.expected().items()
                if descriptor.get("artifactType") == artifact_type
            }
            assert len(expected) == 1
            assert_descriptors(referrers_list(response), expected)

    async def test_filter_matching_nothing(self, registry: Registry, referrers: Referrers) -> None:
        response = await registry.referrers(
            referrers.name, referrers.subject.manifest.digest, artifactType="application/vnd.example.none"
        )
        assert response.headers["OCI-Filters-Applied"] == "artifactType"
        assert referrers_list(response) == {}

    async def test_manifest_without_referrers(self, registry: Registry, referrers: Referrers) -> None:
        response = await registry.referrers(referrers.name, referrers.unrelated.manifest.digest)
        assert referrers_list(response) == {}

    async def test_digest_never_pushed(self, registry: Registry, referrers: Referrers) -> None:
        assert referrers_list(await registry.referrers(referrers.name, DUMMY_DIGEST)) == {}

    async def test_subject_never_pushed(self, registry: Registry, referrers: Referrers) -> None:
        absent = make_image("referrers-absent-subject")
        artifact = make_artifact(
            "dangling", absent.manifest, artifact_type=SIGNATURE, annotations={ANNOTATION: "dangling"}
        )
        await registry.push_image(referrers.name, artifact)
        response = await registry.referrers(referrers.name, absent.manifest.digest)
        expected = artifact.manifest.descriptor(artifactType=SIGNATURE, annotations={ANNOTATION: "dangling"})
        assert_descriptors(referrers_list(response), {artifact.manifest.digest: expected})

    async def test_unknown_repository_is_an_empty_list(self, registry: Registry) -> None:
        # "the registry MUST NOT return a 404 Not Found to a referrers API requests"
        response = await registry.referrers("conformance/never-pushed", DUMMY_DIGEST)
        assert referrers_list(response) == {}

    async def test_referrers_are_scoped_to_the_repository(
        self, registry: Registry, referrers: Referrers
    ) -> None:
        elsewhere = "conformance/referrers-elsewhere"
        outsider = make_artifact("outsider", referrers.subject.manifest, artifact_type=SBOM)
        await registry.push_image(elsewhere, outsider)
        found = referrers_list(await registry.referrers(referrers.name, referrers.subject.manifest.digest))
        assert outsider.manifest.digest not in found
        found = referrers_list(await registry.referrers(elsewhere, referrers.subject.manifest.digest))
        assert set(found) == {outsider.manifest.digest}

    async def test_invalid_digest_is_400(self, registry: Registry, referrers: Referrers) -> None:
        assert_error(await registry.referrers(referrers.name, "sha256:totallywrong"), 400, "DIGEST_INVALID")


# ==== Content Management =================================================================================

MANAGEMENT = "conformance/management"


class TestContentManagement:
    async def test_delete_tag(self, registry: Registry) -> None:
        image = await push_tags(registry, MANAGEMENT, ["keep", "tagtest0"])
        response = await registry.delete_manifest(MANAGEMENT, "tagtest0")
        assert response.status == 202, describe(response)
        assert_error(await registry.get_manifest(MANAGEMENT, "tagtest0"), 404, "MANIFEST_UNKNOWN")
        assert_error(await registry.head_manifest(MANAGEMENT, "tagtest0"), 404, "MANIFEST_UNKNOWN")
        # Only the tag is gone: the manifest and its other tags stay.
        assert_manifest_response(await registry.get_manifest(MANAGEMENT, "keep"), image.manifest, head=False)
        digest = image.manifest.digest
        assert_manifest_response(await registry.get_manifest(MANAGEMENT, digest), image.manifest, head=False)
        assert (await registry.tags(MANAGEMENT)).json()["tags"] == ["keep"]

    async def test_delete_manifest_by_digest(self, registry: Registry) -> None:
        image = await push_tags(registry, MANAGEMENT, ["t1", "t2"])
        await push_tags(registry, MANAGEMENT, ["other"], seed="other")
        response = await registry.delete_manifest(MANAGEMENT, image.manifest.digest)
        assert response.status == 202, describe(response)
        for reference in (image.manifest.digest, "t1", "t2"):
            assert_error(await registry.get_manifest(MANAGEMENT, reference), 404, "MANIFEST_UNKNOWN")
            assert_error(await registry.head_manifest(MANAGEMENT, reference), 404, "MANIFEST_UNKNOWN")
        assert (await registry.tags(MANAGEMENT)).json()["tags"] == ["other"]

    async def test_delete_unknown_manifest_is_404_manifest_unknown(self, registry: Registry) -> None:
        await push_tags(registry, MANAGEMENT, ["v1"])
        assert_error(await registry.delete_manifest(MANAGEMENT, DUMMY_DIGEST), 404, "MANIFEST_UNKNOWN")
        assert_error(await registry.delete_manifest(MANAGEMENT, "nope"), 404, "MANIFEST_UNKNOWN")

    async def test_delete_in_an_unknown_repository_is_404(self, registry: Registry) -> None:
        response = await registry.delete_manifest("conformance/never-pushed", DUMMY_DIGEST)
        assert response.status == 404, describe(response)
        (error,) = (response.json())["errors"]
        assert error["code"] in {"NAME_UNKNOWN", "MANIFEST_UNKNOWN"}

    async def test_deleted_tag_can_be_pushed_again(self, registry: Registry) -> None:
        image = await push_tags(registry, MANAGEMENT, ["again"])
        assert (await registry.delete_manifest(MANAGEMENT, image.manifest.digest)).status == 202
        await registry.push_image(MANAGEMENT, image, "again")
        assert_manifest_response(await registry.get_manifest(MANAGEMENT, "again"), image.manifest, head=False)

    async def test_delete_blob(self, registry: Registry) -> None:
        data = random_bytes("delete-blob", 999)
        await registry.push_blob(MANAGEMENT, data)
        response = await registry.delete_blob(MANAGEMENT, digest_of(data))
        assert response.status == 202, describe(response)
        assert_error(await registry.get_blob(MANAGEMENT, digest_of(data)), 404, "BLOB_UNKNOWN")
        assert_error(await registry.head_blob(MANAGEMENT, digest_of(data)), 404, "BLOB_UNKNOWN")

    async def test_delete_unknown_blob_is_404_blob_unknown(self, registry: Registry) -> None:
        await push_tags(registry, MANAGEMENT, ["v1"])
        assert_error(await registry.delete_blob(MANAGEMENT, DUMMY_DIGEST), 404, "BLOB_UNKNOWN")

    async def test_delete_blob_leaves_other_repositories_alone(self, registry: Registry) -> None:
        data = random_bytes("shared-blob", 4096)
        await registry.push_blob(MANAGEMENT, data)
        await registry.push_blob("conformance/management-other", data)
        assert (await registry.delete_blob(MANAGEMENT, digest_of(data))).status == 202
        await assert_stored(registry, "conformance/management-other", data)

    async def test_deleted_blob_can_be_pushed_again(self, registry: Registry) -> None:
        data = random_bytes("blob-again", 321)
        await registry.push_blob(MANAGEMENT, data)
        assert (await registry.delete_blob(MANAGEMENT, digest_of(data))).status == 202
        await registry.push_blob(MANAGEMENT, data)
        await assert_stored(registry, MANAGEMENT, data)

    async def test_deleted_referrer_leaves_the_referrers_list(
        self, registry: Registry, referrers: Referrers
    ) -> None:
        gone = referrers.by_field.manifest.digest
        assert (await registry.delete_manifest(referrers.name, gone)).status == 202
        found = referrers_list(await registry.referrers(referrers.name, referrers.subject.manifest.digest))
        expected = referrers.expected()
        del expected[gone]
        assert_descriptors(found, expected)


# ==== Docker is never changed by this registry's deletes ===============================================


def docker_images(docker: FakeDocker) -> dict[str, str]:
    """Docker's own images: not those the registry loaded for pushes (deleting a push untags them)."""
    return {ref: image.id for ref, image in docker.images.items() if ref not in docker.loads}


class TestDockerUntouched:
    async def test_push_and_deletes_change_nothing_in_docker(
        self, registry: Registry, docker: RecordingDocker
    ) -> None:
        image = await push_tags(registry, "conformance/docker-a", ["v1", "v2"])
        before = docker_images(docker)
        assert (await registry.delete_manifest("conformance/docker-a", "v1")).status == 202
        assert (await registry.delete_manifest("conformance/docker-a", image.manifest.digest)).status == 202
        assert (await registry.delete_blob("conformance/docker-a", image.layers[0].digest)).status == 202
        after = docker_images(docker)
        assert {ref: after.get(ref) for ref in before} == before
        assert docker.destructive_calls() == []
        # What the pushes loaded into Docker went again with the tags and the manifest.
        assert set(docker.removes) <= set(docker.loads)
        assert not set(docker.loads) & set(docker.images)
        assert docker.pulls == []

    async def test_deleting_a_tag_keeps_dockers_image_of_that_name(
        self, registry: Registry, docker: RecordingDocker
    ) -> None:
        # A tag of Docker's own image (served, so cached), never pushed here: a DELETE may drop what this
        # registry holds of it, never the image in Docker.
        ref = "docker.io/conformance/local:v1"
        docker.images[ref] = local_image("conformance-local", ref)
        served = await registry.get_manifest("conformance/local", "v1")
        assert served.status == 200, describe(served)
        before = docker_images(docker)

        response = await registry.delete_manifest("conformance/local", "v1")
        assert response.status < 500, describe(response)
        assert docker_images(docker) == before
        assert docker.destructive_calls() == []


# ==== The mirror namespace (`ns`): read-only, except evicting what is cached ===========================

REDIS = "docker.io/library/redis:7"


class TestMirrorNamespace:
    async def test_uploads_are_refused(self, registry: Registry, docker: RecordingDocker) -> None:
        assert_error(await registry.start_upload("library/redis", ns="docker.io"), 405, "UNSUPPORTED")
        data = random_bytes("ns-upload", 10)
        response = await registry.request(
            "POST",
            uploads_url("library/redis", ns="docker.io", digest=digest_of(data)),
            data=data,
            headers={"Content-Type": OCTET_STREAM},
        )
        assert_error(response, 405, "UNSUPPORTED")
        assert docker.pulls == []

    async def test_manifest_put_is_refused(self, registry: Registry, docker: RecordingDocker) -> None:
        image = make_image("ns-put")
        response = await registry.request(
            "PUT",
            URL(manifest_path("library/redis", "7")).with_query(ns="docker.io"),
            data=image.manifest.data,
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert_error(response, 405, "UNSUPPORTED")
        assert docker.pulls == []

    async def test_delete_evicts_a_cached_image(self, registry: Registry, docker: RecordingDocker) -> None:
        docker.images[REDIS] = local_image("redis-7", REDIS)
        path = URL(manifest_path("library/redis", "7")).with_query(ns="docker.io")
        first = await registry.request("GET", path)
        assert first.status == 200, describe(first)
        assert docker.saves == [REDIS]
        before = docker_images(docker)

        deleted = await registry.request("DELETE", path)
        assert deleted.status == 202, describe(deleted)
        assert docker_images(docker) == before
        assert docker.destructive_calls() == []

        # Evicted: the next pull exports it from Docker again.
        again = await registry.request("GET", path)
        assert again.status == 200, describe(again)
        assert again.headers["Docker-Content-Digest"] == first.headers["Docker-Content-Digest"]
        assert docker.saves == [REDIS, REDIS]
        assert docker.pulls == []
