"""The HTTP side: OCI distribution endpoints, status page, metrics, health. Handlers only translate HTTP."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from aiohttp import BasicAuth, hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import PRODUCT, __version__
from ..common import units
from ..docker.engine import Credentials
from ..mirror.mirror import Mirror
from ..mirror.prefetch import Prefetcher
from ..oci.errors import RegistryError
from ..oci.mediatypes import MAX_MANIFEST_SIZE, OCI_INDEX
from ..oci.reference import Digest, Repository, is_digest, parse_repository, parse_tag
from ..push.pushes import Pushes
from ..push.uploads import Upload, Uploads
from ..sources.content import ServedManifest
from . import blobs
from .auth import Htpasswd
from .status import PAGE, RecentProblems, RecentPulls, snapshot

log = logging.getLogger(__package__)

MIRROR: web.AppKey[Mirror] = web.AppKey("mirror", Mirror)
PROBLEMS: web.AppKey[RecentProblems] = web.AppKey("problems", RecentProblems)
PULLS: web.AppKey[RecentPulls] = web.AppKey("pulls", RecentPulls)
# What a manifest request was answered with, for the recent-pulls list.
SERVED: web.RequestKey[ServedManifest] = web.RequestKey("served", ServedManifest)
UPLOADS: web.AppKey[Uploads] = web.AppKey("uploads", Uploads)
PREFETCHER: web.AppKey[Prefetcher] = web.AppKey("prefetcher", Prefetcher)
PUSHES: web.AppKey[Pushes] = web.AppKey("pushes", Pushes)
WRITE_AUTH: web.AppKey[Htpasswd | None] = web.AppKey("write_auth", Htpasswd)
ANSWER_WITHIN: web.AppKey[float | None] = web.AppKey("answer_within", float)
API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
SERVER = f"{PRODUCT}/{__version__}"
_EMPTY_SUFFIX_RANGE = re.compile(r"\s*bytes\s*=\s*-0+\s*")


class AccessLogger(AbstractAccessLogger):
    """One line per request: client, request line, status, body bytes, seconds, user agent.

    aiohttp's own `%b` counts only headers for sendfile responses, so blob sizes come from Content-Length.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        sent = response.content_length if response.content_length is not None else response.body_length
        if request.method == hdrs.METH_HEAD:
            sent = 0
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.6fs "%s"',
            request.remote,
            request.method,
            request.path_qs,
            request.version.major,
            request.version.minor,
            response.status,
            sent,
            time,
            request.headers.get(hdrs.USER_AGENT, "-"),
        )


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (an over-long line, a bad header) as an ERROR with a
    traceback; that is the client's mistake, so it becomes one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args, record.exc_info, record.exc_text = (
                "refused a malformed request: %s",
                (exc,),
                None,
                None,
            )
        return True


def _error_response(request: web.Request, error: RegistryError) -> web.Response:
    level = logging.WARNING if error.status >= 500 else logging.INFO
    log.log(
        level, "%s %s -> %d %s: %s", request.method, request.path_qs, error.status, error.code, error.message
    )
    return web.json_response(error.body(), status=error.status, headers=error.headers)


@web.middleware
async def _oci_errors(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RegistryError as error:
        return _error_response(request, error)
    except web.HTTPNotFound:
        return _error_response(request, RegistryError("NAME_UNKNOWN", "no such endpoint", status=404))
    except web.HTTPMethodNotAllowed:
        return _error_response(
            request, RegistryError("UNSUPPORTED", f"{request.method} is not supported here")
        )
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        # Out of descriptors is load, not a bug: the client should retry, not give up on a 500.
        return _error_response(
            request, RegistryError("UNAVAILABLE", f"too many open files, retry later: {exc.strerror}")
        )


@web.middleware
async def _write_access(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    """With an htpasswd file, what writes (uploads, manifest PUTs, deletes) needs its credentials; a
    refusal is a Basic challenge, for wrong credentials too, as distribution answers.

    `GET /v2/` challenges too: docker and skopeo send credentials only to a registry whose `/v2/` asked
    for them, so an open one makes every push fail. Pulls stay open: containerd never asks `/v2/` and
    skopeo goes on without credentials (docker, as against distribution, then wants a `docker login`)."""
    auth = request.app[WRITE_AUTH]
    if (
        auth is not None
        and request.match_info.handler in _CHALLENGED
        and await auth.allows(request.headers.get(hdrs.AUTHORIZATION)) is None
    ):
        raise RegistryError(
            "UNAUTHORIZED",
            "authentication required: pushes and deletes need credentials (pulls need none)",
            headers=auth.challenge,
        )
    return await handler(request)


async def _on_response(request: web.Request, response: web.StreamResponse) -> None:
    """Adds the registry API version header and our name (which `doctor` recognizes), and counts the
    response (status and size are final here)."""
    response.headers[API_VERSION[0]] = API_VERSION[1]
    response.headers[hdrs.SERVER] = SERVER
    handler = request.match_info.handler
    route = "unmatched" if request.match_info.http_exception else getattr(handler, "__name__", "other")
    metrics = request.app[MIRROR].metrics
    metrics.requests.labels(route, request.method, str(response.status)).inc()
    sent = (response.content_length or 0) if request.method != hdrs.METH_HEAD else 0
    if sent:
        metrics.served_bytes.labels(route).inc(sent)
    if route in ("manifest", "blob") and 200 <= response.status < 300:
        _note_pull(request, sent)


def _note_pull(request: web.Request, sent: int) -> None:
    """Adds a manifest or blob response to the recent pulls (the client, the image, cold or warm)."""
    try:
        repo = _repository(request)
    except RegistryError:
        return
    reference = request.match_info.get("reference") or request.match_info.get("digest", "")
    served = request.get(SERVED)
    request.app[PULLS].served(
        request.remote or "?",
        repo.docker_name,
        repo.familiar(reference),
        sent,
        tag=served is not None and not is_digest(reference),
        cold=served is not None and served.cold,
    )


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
    mirror = request.app[MIRROR]
    repo = parse_repository(request.match_info["name"], request.query.get("ns"))
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


def _repository(request: web.Request) -> Repository:
    return parse_repository(request.match_info["name"], request.query.get("ns"))


async def put_manifest(request: web.Request) -> web.Response:
    repo = _repository(request)
    request.app[PUSHES].check_writable(repo)
    body = await request.content.read(MAX_MANIFEST_SIZE + 1)
    while len(body) <= MAX_MANIFEST_SIZE and (
        more := await request.content.read(MAX_MANIFEST_SIZE + 1 - len(body))
    ):
        body += more
    digest, pushed = await request.app[PUSHES].put_manifest(
        repo, request.match_info["reference"], body, request.headers.get(hdrs.CONTENT_TYPE)
    )
    headers = {hdrs.LOCATION: f"/v2/{repo.name}/manifests/{digest}", "Docker-Content-Digest": digest}
    if pushed.subject:
        headers["OCI-Subject"] = pushed.subject
    return web.Response(status=201, headers=headers)


async def delete_manifest(request: web.Request) -> web.Response:
    await request.app[PUSHES].delete_manifest(_repository(request), request.match_info["reference"])
    return web.Response(status=202)


async def referrers(request: web.Request) -> web.Response:
    repo = _repository(request)
    digest = Digest.parse(request.match_info["digest"])
    artifact_type = request.query.get("artifactType")
    found = await request.app[PUSHES].referrers(repo, digest, artifact_type)
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
    uploads = request.app[UPLOADS]
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
        await request.app[PUSHES].link(repo, digest)


async def start_upload(request: web.Request) -> web.Response:
    repo = _repository(request)
    pushes = request.app[PUSHES]
    pushes.check_writable(repo)
    mount, source = request.query.get("mount"), request.query.get("from")
    if mount is not None:
        digest = Digest.parse(mount)
        if source is not None and await pushes.mount(repo, digest, source):
            return _blob_created(repo, digest)
    digest = Digest.parse(request.query["digest"]) if "digest" in request.query else None
    upload = await request.app[UPLOADS].start(repo.docker_name)
    if digest is not None:
        try:
            await _receive(request, repo, upload, digest)
        finally:
            if upload.id in request.app[UPLOADS]:
                await request.app[UPLOADS].cancel(upload)
        return _blob_created(repo, digest)
    return web.Response(status=202, headers=upload.headers(_upload_path(repo, upload)))


def _upload(request: web.Request) -> tuple[Repository, Upload]:
    repo = _repository(request)
    return repo, request.app[UPLOADS].get(repo.docker_name, request.match_info["upload"])


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
    await request.app[UPLOADS].cancel(upload)
    return web.Response(status=204)


async def delete_blob(request: web.Request) -> web.Response:
    await request.app[PUSHES].delete_blob(_repository(request), Digest.parse(request.match_info["digest"]))
    return web.Response(status=202)


async def blob(request: web.Request) -> web.StreamResponse:
    mirror = request.app[MIRROR]
    repo = parse_repository(request.match_info["name"], request.query.get("ns"))
    digest = Digest.parse(request.match_info["digest"])
    found = await mirror.blob(repo, digest, _credentials(request))
    if _EMPTY_SUFFIX_RANGE.fullmatch(request.headers.get(hdrs.RANGE, "")):
        # "the last 0 bytes" is unsatisfiable (RFC 9110 14.1.1); aiohttp would send the whole blob.
        size = (await asyncio.to_thread(found.path.stat)).st_size
        raise web.HTTPRequestRangeNotSatisfiable(headers={hdrs.CONTENT_RANGE: f"bytes */{size}"})
    return await blobs.send(
        request,
        found,
        {
            hdrs.CONTENT_TYPE: "application/octet-stream",
            "Docker-Content-Digest": str(digest),
            hdrs.ACCEPT_RANGES: "bytes",
            hdrs.CACHE_CONTROL: "max-age=31536000",
        },
    )


def _page(request: web.Request, items: list[str]) -> tuple[list[str], dict[str, str]]:
    """The `n`/`last` page of sorted `items`, and a Link header to the next page when there is one."""
    last = request.query.get("last")
    if last is not None:
        items = [item for item in items if item > last]
    number = request.query.get("n")
    if number is None:
        return items, {}
    if not re.fullmatch(r"[0-9]{1,9}", number):
        raise RegistryError(
            "UNSUPPORTED", f"n must be a non-negative integer, not {number[:20]!r}", status=400
        )
    limit = int(number)
    if limit == 0 or len(items) <= limit:
        return items[:limit], {}
    page = items[:limit]
    query = {**request.query, "n": str(limit), "last": page[-1]}
    link = request.rel_url.with_query(query)
    return page, {hdrs.LINK: f'<{link}>; rel="next"'}


async def tags_list(request: web.Request) -> web.Response:
    repo = parse_repository(request.match_info["name"], request.query.get("ns"))
    tags, headers = _page(request, await request.app[MIRROR].tags(repo))
    return web.json_response({"name": repo.name, "tags": tags}, headers=headers)


async def catalog(request: web.Request) -> web.Response:
    repositories, headers = _page(request, await request.app[MIRROR].catalog())
    return web.json_response({"repositories": repositories}, headers=headers)


async def healthz(_request: web.Request) -> web.Response:
    """The process is alive and answering."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Docker reachable and the cache writable: what serving a new image needs."""
    problems = await request.app[MIRROR].readiness()
    if problems:
        return web.json_response({"status": "unavailable", "problems": problems}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; the cache gauges walk the blob directory, so off the event loop."""
    body = await asyncio.to_thread(generate_latest, request.app[MIRROR].metrics.registry)
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})


async def status_page(_request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def status_json(request: web.Request) -> web.Response:
    app = request.app
    return web.json_response(await snapshot(app[MIRROR], app[PROBLEMS], app[PULLS], app.get(PREFETCHER)))


async def unsupported(request: web.Request) -> web.Response:
    if request.method in (hdrs.METH_GET, hdrs.METH_HEAD):
        raise RegistryError("NAME_UNKNOWN", f"no such endpoint: {request.path}", status=404)
    raise RegistryError("UNSUPPORTED", f"{request.method} {request.path} is not supported")


_CHALLENGED = frozenset(
    {
        base,
        put_manifest,
        delete_manifest,
        start_upload,
        upload_status,
        patch_upload,
        finish_upload,
        cancel_upload,
        delete_blob,
    }
)


def create_app(
    mirror: Mirror,
    *,
    load_pushed: bool = True,
    allow_docker_delete: bool = False,
    allow_docker_overwrite: bool = False,
    write_auth: Htpasswd | None = None,
    answer_within: float | None = None,
) -> web.Application:
    app = web.Application(middlewares=[_oci_errors, _write_access])
    app[MIRROR] = mirror
    app[ANSWER_WITHIN] = answer_within
    app[WRITE_AUTH] = write_auth
    uploads = app[UPLOADS] = Uploads(mirror.store)
    pushes = app[PUSHES] = Pushes(
        mirror,
        load_pushed=load_pushed,
        allow_docker_delete=allow_docker_delete,
        allow_docker_overwrite=allow_docker_overwrite,
    )

    async def run_uploads(_app: web.Application) -> AsyncIterator[None]:
        expiry = asyncio.ensure_future(uploads.expire_forever())
        yield
        expiry.cancel()
        await pushes.close()
        await uploads.close()

    app.cleanup_ctx.append(run_uploads)
    # The status page shows the registry's recent warnings and errors.
    problems = app[PROBLEMS] = RecentProblems()
    app[PULLS] = RecentPulls()
    package_logger = logging.getLogger(__name__.partition(".")[0])
    package_logger.addHandler(problems)
    malformed = _MalformedRequests()
    server_logger.addFilter(malformed)

    async def detach(_app: web.Application) -> None:
        package_logger.removeHandler(problems)
        server_logger.removeFilter(malformed)

    app.on_cleanup.append(detach)
    app.on_response_prepare.append(_on_response)
    app.router.add_get("/", status_page)
    app.router.add_get("/status.json", status_json)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v2/", base)
    app.router.add_get("/v2", base)
    app.router.add_get("/v2/_catalog", catalog)
    app.router.add_get("/v2/{name:.+}/tags/list", tags_list)
    app.router.add_get("/v2/{name:.+}/manifests/{reference}", manifest)
    app.router.add_put("/v2/{name:.+}/manifests/{reference}", put_manifest)
    app.router.add_delete("/v2/{name:.+}/manifests/{reference}", delete_manifest)
    app.router.add_get("/v2/{name:.+}/referrers/{digest}", referrers)
    app.router.add_post("/v2/{name:.+}/blobs/uploads/", start_upload)
    app.router.add_post("/v2/{name:.+}/blobs/uploads", start_upload)
    app.router.add_get("/v2/{name:.+}/blobs/uploads/{upload}", upload_status)
    app.router.add_patch("/v2/{name:.+}/blobs/uploads/{upload}", patch_upload)
    app.router.add_put("/v2/{name:.+}/blobs/uploads/{upload}", finish_upload)
    app.router.add_delete("/v2/{name:.+}/blobs/uploads/{upload}", cancel_upload)
    app.router.add_get("/v2/{name:.+}/blobs/{digest}", blob)
    app.router.add_delete("/v2/{name:.+}/blobs/{digest}", delete_blob)
    app.router.add_route("*", "/v2/{tail:.*}", unsupported)
    return app
