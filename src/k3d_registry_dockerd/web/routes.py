"""The OCI distribution endpoints, the status page, metrics and health: handlers that only translate HTTP
into calls on the registry's parts (`assembly.Registry`) and their answers (or OCI errors) back."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Coroutine
from typing import Any

from aiohttp import BasicAuth, hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..common import units
from ..docker.engine import Credentials
from ..mirror.listing import Page, Paged
from ..oci.errors import RegistryError
from ..oci.mediatypes import MAX_MANIFEST_SIZE, OCI_INDEX
from ..oci.reference import Digest, Repository, is_digest, parse_repository, parse_tag
from ..push.bodies import BodyStalled, read_at_most
from ..push.uploads import Upload
from ..sources.content import BlobPieces, ServedManifest
from . import status
from .assembly import Registry
from .auth import Htpasswd
from .blobs import BlobSender
from .status import ImageList, RecentProblems, RecentPulls

REGISTRY: web.AppKey[Registry] = web.AppKey("registry", Registry)
SENDER: web.AppKey[BlobSender] = web.AppKey("sender", BlobSender)
PROBLEMS: web.AppKey[RecentProblems] = web.AppKey("problems", RecentProblems)
PULLS: web.AppKey[RecentPulls] = web.AppKey("pulls", RecentPulls)
IMAGES: web.AppKey[ImageList] = web.AppKey("images", ImageList)
# What a manifest request was answered with, and the repository a manifest or blob request named, for
# the recent-pulls list.
SERVED: web.RequestKey[ServedManifest] = web.RequestKey("served", ServedManifest)
REPOSITORY: web.RequestKey[Repository] = web.RequestKey("repository", Repository)
WRITE_AUTH: web.AppKey[Htpasswd | None] = web.AppKey("write_auth", Htpasswd)
ANSWER_WITHIN: web.AppKey[float | None] = web.AppKey("answer_within", float)
_EMPTY_SUFFIX_RANGE = re.compile(r"\s*bytes\s*=\s*-0+\s*")


def _credentials(request: web.Request) -> Credentials | None:
    """HTTP Basic credentials containerd sends after our challenge: the cluster's pull secret."""
    header = request.headers.get(hdrs.AUTHORIZATION)
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        auth = BasicAuth.decode(header)
    except ValueError as exc:
        raise RegistryError("UNAUTHORIZED", "malformed Basic Authorization header") from exc
    return Credentials(auth.login, auth.password)


async def base(_request: web.Request) -> web.Response:
    return web.json_response({})


async def manifest(request: web.Request) -> web.Response:
    mirror = request.app[REGISTRY].mirror
    repo = request[REPOSITORY] = request_repository(request)
    reference = request.match_info["reference"]
    credentials = _credentials(request)
    if is_digest(reference):
        work = mirror.manifest_by_digest(repo, Digest.parse(reference), credentials)
    else:
        try:
            tag = parse_tag(reference)
        except RegistryError as exc:
            # No manifest can have such a tag: a pull of it is a plain 404, as the conformance suite wants
            # (TAG_INVALID is for a push naming one).
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {exc.message}") from exc
        work = mirror.manifest_by_tag(repo, tag, credentials)
    within = request.app[ANSWER_WITHIN]
    if within is not None and request.headers.get(hdrs.USER_AGENT, "").startswith("containerd/"):
        served = await _answered_within(within, work, repo.familiar(reference))
    else:
        served = await work
    request[SERVED] = served
    return web.Response(
        body=served.body,
        headers={
            hdrs.CONTENT_TYPE: served.media_type,
            "Docker-Content-Digest": served.digest,
            hdrs.ETAG: f'"{served.digest}"',
        },
    )


async def _answered_within(
    seconds: float, work: Coroutine[Any, Any, ServedManifest], what: str
) -> ServedManifest:
    """The manifest, or a 503 once `seconds` passed: containerd's CRI cancels a pull that shows no
    progress for image_pull_progress_timeout (a wait for our answer counts, in containerd 1.7), without
    trying another host, while a 503 makes it try the upstream itself. The work is not cancelled: it goes
    on to its end (pull, private marking, export) and the next request finds it done or joins it."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.add_done_callback(_settled)
        raise
    if task in done:
        return task.result()
    task.add_done_callback(_settled)
    raise RegistryError(
        "UNAVAILABLE",
        f"{what} is not ready after {units.duration(seconds)}: Docker is still pulling or exporting it (it "
        "goes on); answered now so the node can try the upstream before its CRI gives up",
        headers={hdrs.RETRY_AFTER: "10"},
    )


def _settled(task: asyncio.Task[ServedManifest]) -> None:
    """Takes the outcome of work nobody waits for any more (its failure was logged where it happened)."""
    if not task.cancelled():
        task.exception()


def request_repository(request: web.Request) -> Repository:
    return parse_repository(request.match_info["name"], request.query.get("ns"))


async def put_manifest(request: web.Request) -> web.Response:
    repo = request_repository(request)
    registry = request.app[REGISTRY]
    registry.pushes.check_writable(repo)
    try:
        body = await read_at_most(request.content, MAX_MANIFEST_SIZE, registry.uploads.body_timeout)
    except BodyStalled as exc:
        registry.metrics.stalled_bodies.labels("manifest").inc()
        raise RegistryError(
            "MANIFEST_INVALID",
            f"manifest {repo.familiar(request.match_info['reference'])} not stored: {exc}",
            status=408,
            headers={hdrs.CONNECTION: "close"},
        ) from exc
    digest, pushed = await registry.pushes.put_manifest(
        repo, request.match_info["reference"], body, request.headers.get(hdrs.CONTENT_TYPE)
    )
    headers = {hdrs.LOCATION: f"/v2/{repo.name}/manifests/{digest}", "Docker-Content-Digest": digest}
    if pushed.subject:
        headers["OCI-Subject"] = pushed.subject
    return web.Response(status=201, headers=headers)


async def delete_manifest(request: web.Request) -> web.Response:
    await request.app[REGISTRY].pushes.delete_manifest(
        request_repository(request), request.match_info["reference"]
    )
    return web.Response(status=202)


async def referrers(request: web.Request) -> web.Response:
    repo = request_repository(request)
    digest = Digest.parse(request.match_info["digest"])
    artifact_type = request.query.get("artifactType")
    found = await request.app[REGISTRY].pushes.referrers(repo, digest, artifact_type)
    headers = {hdrs.CONTENT_TYPE: OCI_INDEX}
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
    return web.Response(body=json.dumps(body).encode(), headers=headers)


def _upload_path(repo: Repository, upload: Upload) -> str:
    return f"/v2/{repo.name}/blobs/uploads/{upload.id}"


def _blob_created(repo: Repository, digest: Digest) -> web.Response:
    return web.Response(
        status=201,
        headers={hdrs.LOCATION: f"/v2/{repo.name}/blobs/{digest}", "Docker-Content-Digest": str(digest)},
    )


async def _receive(request: web.Request, repo: Repository, upload: Upload, digest: Digest | None) -> None:
    """Appends the request body to the upload and, given a digest, finishes it; one request at a time
    per upload. A 416 tells the client where the upload stands, so it can resume."""
    uploads = request.app[REGISTRY].uploads
    async with upload.lock:
        try:
            if request.body_exists:
                await uploads.append(
                    upload, request.content, request.headers.get(hdrs.CONTENT_RANGE), request.content_length
                )
            if digest is not None:
                await uploads.finish(upload, digest)
        except RegistryError as error:
            if error.status == 416:
                error.headers.update(upload.headers(_upload_path(repo, upload)))
            raise
    if digest is not None:
        await request.app[REGISTRY].pushes.link(repo, digest)


async def start_upload(request: web.Request) -> web.Response:
    repo = request_repository(request)
    pushes = request.app[REGISTRY].pushes
    pushes.check_writable(repo)
    mount, source = request.query.get("mount"), request.query.get("from")
    if mount is not None:
        digest = Digest.parse(mount)
        if source is not None and await pushes.mount(repo, digest, source):
            return _blob_created(repo, digest)
    digest = Digest.parse(request.query["digest"]) if "digest" in request.query else None
    upload = await request.app[REGISTRY].uploads.start(repo.docker_name)
    if digest is not None:
        try:
            await _receive(request, repo, upload, digest)
        finally:
            if upload.id in request.app[REGISTRY].uploads:
                await request.app[REGISTRY].uploads.cancel(upload)
        return _blob_created(repo, digest)
    return web.Response(status=202, headers=upload.headers(_upload_path(repo, upload)))


def _upload(request: web.Request) -> tuple[Repository, Upload]:
    repo = request_repository(request)
    return repo, request.app[REGISTRY].uploads.get(repo.docker_name, request.match_info["upload"])


async def upload_status(request: web.Request) -> web.Response:
    repo, upload = _upload(request)
    return web.Response(status=204, headers=upload.headers(_upload_path(repo, upload)))


async def patch_upload(request: web.Request) -> web.Response:
    repo, upload = _upload(request)
    await _receive(request, repo, upload, None)
    return web.Response(status=202, headers=upload.headers(_upload_path(repo, upload)))


async def finish_upload(request: web.Request) -> web.Response:
    repo, upload = _upload(request)
    if "digest" not in request.query:
        raise RegistryError("DIGEST_INVALID", "the final PUT of an upload needs ?digest=")
    digest = Digest.parse(request.query["digest"])
    await _receive(request, repo, upload, digest)
    return _blob_created(repo, digest)


async def cancel_upload(request: web.Request) -> web.Response:
    _repo, upload = _upload(request)
    await request.app[REGISTRY].uploads.cancel(upload)
    return web.Response(status=204)


async def delete_blob(request: web.Request) -> web.Response:
    await request.app[REGISTRY].pushes.delete_blob(
        request_repository(request), Digest.parse(request.match_info["digest"])
    )
    return web.Response(status=202)


async def blob(request: web.Request) -> web.StreamResponse:
    registry = request.app[REGISTRY]
    repo = request[REPOSITORY] = request_repository(request)
    digest = Digest.parse(request.match_info["digest"])
    found = await registry.mirror.blob(repo, digest, _credentials(request))
    if _EMPTY_SUFFIX_RANGE.fullmatch(request.headers.get(hdrs.RANGE, "")):
        # "the last 0 bytes" is unsatisfiable (RFC 9110 14.1.1); aiohttp would send the whole blob.
        size = (
            found.size
            if isinstance(found, BlobPieces)
            else (await asyncio.to_thread(found.path.stat)).st_size
        )
        raise web.HTTPRequestRangeNotSatisfiable(headers={hdrs.CONTENT_RANGE: f"bytes */{size}"})
    headers = {
        hdrs.CONTENT_TYPE: "application/octet-stream",
        "Docker-Content-Digest": str(digest),
        hdrs.ACCEPT_RANGES: "bytes",
        hdrs.CACHE_CONTROL: "max-age=31536000",
    }
    # Blobs hashed or put together on the way count as work that background verification waits for.
    with registry.sending.busy():
        return await request.app[SENDER].send(request, found, headers)


def _page(request: web.Request) -> Page:
    """The `n` and `last` of a listing request."""
    number = request.query.get("n")
    if number is not None and not re.fullmatch(r"[0-9]{1,9}", number):
        raise RegistryError(
            "UNSUPPORTED", f"n must be a non-negative integer, not {number[:20]!r}", status=400
        )
    return Page(request.query.get("last"), int(number) if number is not None else None)


def _link(request: web.Request, page: Page, paged: Paged) -> dict[str, str]:
    """The spec's `Link: <url?n=<n>&last=<last item>>; rel="next"` when more items follow."""
    if not paged.more or page.limit is None:
        return {}
    link = request.rel_url.with_query({**request.query, "n": str(page.limit), "last": paged.items[-1]})
    return {hdrs.LINK: f'<{link}>; rel="next"'}


async def tags_list(request: web.Request) -> web.Response:
    repo = request_repository(request)
    page = _page(request)
    paged = await request.app[REGISTRY].listings.tags(repo, page, _credentials(request))
    return web.json_response({"name": repo.name, "tags": paged.items}, headers=_link(request, page, paged))


async def catalog(request: web.Request) -> web.Response:
    page = _page(request)
    paged = await request.app[REGISTRY].listings.catalog(page, _credentials(request))
    return web.json_response({"repositories": paged.items}, headers=_link(request, page, paged))


async def healthz(_request: web.Request) -> web.Response:
    """The process is alive and answering."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Docker reachable and the cache writable: what serving a new image needs."""
    problems = await status.readiness(request.app[REGISTRY])
    if problems:
        return web.json_response({"status": "unavailable", "problems": problems}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; the cache gauges walk the blob directory, so off the event loop."""
    body = await asyncio.to_thread(generate_latest, request.app[REGISTRY].metrics.registry)
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})


async def status_page(_request: web.Request) -> web.Response:
    return web.Response(text=status.PAGE, content_type="text/html")


async def status_json(request: web.Request) -> web.Response:
    app = request.app
    try:
        page = int(request.query.get("page", "1"))
    except ValueError:
        raise RegistryError("UNSUPPORTED", "page must be a number", status=400) from None
    snapshot = await status.snapshot(app[REGISTRY], app[PROBLEMS], app[PULLS], app[IMAGES], page)
    return web.json_response(snapshot)


async def unsupported(request: web.Request) -> web.Response:
    if request.method in (hdrs.METH_GET, hdrs.METH_HEAD):
        raise RegistryError("NAME_UNKNOWN", f"no such endpoint: {request.path}", status=404)
    raise RegistryError("UNSUPPORTED", f"{request.method} {request.path} is not supported")
