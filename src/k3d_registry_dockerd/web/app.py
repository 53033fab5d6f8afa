"""The HTTP application: the routes, the OCI error answers, write access, response headers and counts, and
the access log; one registry's parts (`assembly.Registry`) started and stopped with it."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import AsyncIterator

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger

from .. import PRODUCT, __version__
from ..oci.errors import RegistryError
from ..oci.reference import is_digest, normalize_registry
from .assembly import Registry
from .auth import Htpasswd
from .blobs import BlobSender
from .routes import (
    ANSWER_WITHIN,
    IMAGES,
    PROBLEMS,
    PULLS,
    REGISTRY,
    REPOSITORY,
    SENDER,
    SERVED,
    WRITE_AUTH,
    base,
    blob,
    cancel_upload,
    catalog,
    delete_blob,
    delete_manifest,
    finish_upload,
    healthz,
    manifest,
    metrics,
    patch_upload,
    put_manifest,
    readyz,
    referrers,
    start_upload,
    status_json,
    status_page,
    tags_list,
    unsupported,
    upload_status,
)
from .status import ImageList, RecentProblems, RecentPulls

log = logging.getLogger(__package__)
API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
SERVER = f"{PRODUCT}/{__version__}"
OCI_NAMESPACE = "OCI-Namespace"


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


async def _closing(request: web.Request, response: web.Response) -> web.Response:
    """Sends an answer that ends the connection (`Connection: close`, after a stalled body) and closes it
    then: aiohttp would otherwise linger reading the rest of a body that is not coming."""
    if response.headers.get(hdrs.CONNECTION, "").lower() == "close" and request.protocol is not None:
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()
    return response


@web.middleware
async def _oci_errors(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RegistryError as error:
        return await _closing(request, _error_response(request, error))
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


def _namespace(request: web.Request) -> str | None:
    """The `ns` a request was scoped by, as it came: the distribution-spec's "Registry Proxying" says a
    registry that uses it SHOULD return it in `OCI-Namespace` (answers with an error too). Pushes with
    `ns` are refused, not scoped, and a malformed `ns` scopes nothing."""
    ns = request.query.get("ns")
    if not ns or request.match_info.handler not in _NS_SCOPED:
        return None
    try:
        normalize_registry(ns)
    except RegistryError:
        return None
    return ns


async def _on_response(request: web.Request, response: web.StreamResponse) -> None:
    """Adds the registry API version header, our name (which `doctor` recognizes) and the `ns` that scoped
    the request, and counts the response (status and size are final here)."""
    response.headers[API_VERSION[0]] = API_VERSION[1]
    response.headers[hdrs.SERVER] = SERVER
    namespace = _namespace(request)
    if namespace is not None:
        response.headers[OCI_NAMESPACE] = namespace
    handler = request.match_info.handler
    route = "unmatched" if request.match_info.http_exception else getattr(handler, "__name__", "other")
    sent = (response.content_length or 0) if request.method != hdrs.METH_HEAD else 0
    request.app[REGISTRY].metrics.answered(route, request.method, response.status, sent)
    if route in ("manifest", "blob") and 200 <= response.status < 300:
        _note_pull(request, sent)


def _note_pull(request: web.Request, sent: int) -> None:
    """Adds a manifest or blob response to the recent pulls (the client, the image, cold or warm)."""
    repo = request.get(REPOSITORY)
    if repo is None:
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


# What reads `ns`: pulls, listings and referrers of a mirrored registry, and manifest deletes evicting its
# cache.
_NS_SCOPED = frozenset({manifest, blob, tags_list, referrers, delete_manifest})
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
    registry: Registry, *, write_auth: Htpasswd | None = None, answer_within: float | None = None
) -> web.Application:
    """The app serving `registry`, which starts (its store opened, Docker looked at) and stops with it."""
    app = web.Application(middlewares=[_oci_errors, _write_access])
    app[REGISTRY] = registry
    app[ANSWER_WITHIN] = answer_within
    app[WRITE_AUTH] = write_auth
    sender = app[SENDER] = BlobSender()

    async def run(_app: web.Application) -> AsyncIterator[None]:
        await registry.start()
        expiry = asyncio.ensure_future(registry.uploads.expire_forever())
        yield
        expiry.cancel()
        await registry.stop()

    app.cleanup_ctx.append(run)
    # The status page shows the registry's recent warnings and errors.
    problems = app[PROBLEMS] = RecentProblems()
    app[PULLS] = RecentPulls()
    app[IMAGES] = ImageList(registry.store, registry.guard.private_repositories)
    package_logger = logging.getLogger(__name__.partition(".")[0])
    package_logger.addHandler(problems)
    malformed = _MalformedRequests()
    server_logger.addFilter(malformed)

    async def detach(_app: web.Application) -> None:
        package_logger.removeHandler(problems)
        server_logger.removeFilter(malformed)
        sender.close()

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
