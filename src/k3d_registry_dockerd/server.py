"""Running the registry: process set-up, the cache dir and port taken before anything else, serving until
SIGTERM or SIGINT, and a clean stop. Every failure to start is one log line naming what and what to do."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import ipaddress
import logging
import resource
import signal
import socket
import ssl
from functools import partial

from aiohttp import web

from . import __version__, configs, logs
from .cache import directory
from .cache.store import Store
from .docker.endpoint import DockerEndpoint
from .docker.engine import DockerClient
from .docker.hostcreds import HostCredentials
from .mirror.private import PrivateStateError
from .settings import ENV_ADDR, ENV_HTPASSWD_PATH, SettingError, Settings, cache_dir_problem
from .sources.discovery import InPlaceConfig
from .web.app import AccessLogger, create_app
from .web.assembly import assemble
from .web.auth import Htpasswd, HtpasswdError
from .web.routes import REGISTRY

log = logging.getLogger("k3d_registry_dockerd")
# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Enough for thousands of connections and blobs in flight; more only costs kernel memory when used.
_OPEN_FILES_CAP = 1 << 16
# A cluster start opens hundreds of connections at once; 128 (the default) overflows and the kernel drops
# SYNs, which costs clients a one-second retransmit each.
_LISTEN_BACKLOG = 1024
_SHUTDOWN_TIMEOUT = 5.0


class StartError(Exception):
    """The server cannot start; the message is the one line the user reads."""


def tune_allocator() -> None:
    """Keeps glibc from mapping and unmapping every MiB-sized buffer an export passes around.

    By default each such buffer gets its own mmap and is unmapped when freed (and arenas are trimmed), so
    a 1 GiB export costs a million page faults and about a third more time; memory use stays the same.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:  # glibc only: musl and others have no mallopt
        mallopt(_M_MMAP_THRESHOLD, 4 << 20)
        mallopt(_M_TRIM_THRESHOLD, 32 << 20)


def raise_open_files_limit() -> int:
    """Lifts the soft open-files limit to the hard one, as Go programs such as distribution's registry do
    at start: each client connection and each blob being sent holds a descriptor, and the common soft
    default of 1024 fails a node fleet pulling at once with EMFILE. Returns the limit in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _OPEN_FILES_CAP if hard == resource.RLIM_INFINITY else min(hard, _OPEN_FILES_CAP)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, wanted, exc)
            return soft
        return wanted
    return soft


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingError(
            f"cannot load TLS certificate {settings.tls_cert} / key {settings.tls_key}: {exc}"
        ) from exc
    return context


def loopback_only(host: str | None) -> bool:
    """Whether only this machine can connect (k3d nodes reach the host as host.k3d.internal, not there)."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def write_access_risk(settings: Settings) -> tuple[str, str] | None:
    """(what, what to do) when anyone who reaches the port can push; None when that is not the case."""
    if settings.htpasswd_path is not None or loopback_only(settings.host):
        return None
    return (
        f"anyone who can reach {settings.addr} can push images here (and so into clusters that pull "
        "those names) and delete pushed ones",
        f"to require credentials for pushes and deletes, set {ENV_HTPASSWD_PATH} (or --auth-htpasswd-path) "
        "to a file made with `htpasswd -Bc FILE USER`",
    )


def listen(host: str | None, port: int) -> list[socket.socket]:
    """Bound, listening sockets for the address (IPv4 and IPv6 for all interfaces), as asyncio would
    make them, but before start-up work runs, so a busy port is the first thing reported."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartError(
            f"cannot listen on {host}:{port}: {exc.strerror}; check --addr (or {ENV_ADDR})"
        ) from exc
    sockets: list[socket.socket] = []
    for family, kind, proto, _name, address in dict.fromkeys(infos):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(_LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRNOTAVAIL and family == socket.AF_INET6 and host is None:
                continue  # no IPv6 on this machine
            for bound in sockets:
                bound.close()
            raise StartError(_listen_failure(host, port, exc)) from exc
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def _listen_failure(host: str | None, port: int, exc: OSError) -> str:
    where = f"{host or ''}:{port}"
    if exc.errno == errno.EADDRINUSE:
        why = (
            "the port is already in use (`k3d-registry-dockerd doctor` tells whether it is this registry); "
            f"stop what listens there or choose another --addr (or {ENV_ADDR})"
        )
    elif exc.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need root); choose another --addr such as :5000"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = f"{host} is not an address of this machine; choose another --addr (or {ENV_ADDR})"
    else:
        why = exc.strerror or str(exc)
    return f"cannot listen on {where}: {why}"


def _log_settings(settings: Settings, endpoint: DockerEndpoint, open_files: int) -> None:
    log.info("k3d-registry-dockerd %s", __version__)
    log.info("open-files limit %d", open_files)
    log.info("Docker at %s", endpoint.describe())
    for line in settings.described():
        log.info("%s", line)


def _write_auth(settings: Settings) -> Htpasswd | None:
    if settings.htpasswd_path is None:
        return None
    auth = Htpasswd(settings.htpasswd_path, settings.htpasswd_realm)
    try:
        users = auth.load()
    except HtpasswdError as exc:
        raise StartError(str(exc)) from exc
    log.info(
        "pushes and deletes need credentials: %d users in %s, realm %r (%s)",
        len(users),
        settings.htpasswd_path,
        settings.htpasswd_realm,
        settings.sources["htpasswd_path"],
    )
    return auth


def in_place_config(settings: Settings, endpoint: DockerEndpoint) -> InPlaceConfig:
    """Where to look for the daemon's own store: a daemon reached over the network keeps it elsewhere."""
    host = endpoint.host.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    return InPlaceConfig(
        settings.zero_copy,
        settings.containerd_address,
        settings.containerd_namespace,
        settings.docker_root,
        remote=endpoint.socket_path is None and not loopback_only(host),
    )


def build_app(settings: Settings, endpoint: DockerEndpoint, write_auth: Htpasswd | None) -> web.Application:
    registry = assemble(
        Store(settings.cache_dir),
        DockerClient(endpoint),
        cache_max_size=settings.cache_max_size,
        min_free=settings.min_free or 0,
        refresh_tags=settings.refresh_tags,
        in_place=in_place_config(settings, endpoint),
        in_place_remedy=partial(configs.missing_mounts, endpoint=endpoint),
        host_credentials=HostCredentials() if settings.docker_credentials else None,
        prefetch_max_age=settings.prefetch_max_age if settings.prefetch else None,
        verify_ahead=settings.verify_ahead,
        load_pushed=settings.load_pushed,
        allow_docker_delete=settings.allow_docker_delete,
        allow_docker_overwrite=settings.allow_docker_overwrite,
        body_timeout=settings.body_timeout,
        max_uploads=settings.max_uploads,
    )
    return create_app(registry, write_auth=write_auth, answer_within=settings.answer_within)


async def _until_stopped() -> str:
    """Waits for SIGTERM or SIGINT; the name of the one that came."""
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[str] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda name=sig.name: stopped.done() or stopped.set_result(name))
    try:
        return await stopped
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _serve(settings: Settings, endpoint: DockerEndpoint, tls: ssl.SSLContext | None) -> None:
    lock = directory.CacheDirLock(settings.cache_dir)
    try:
        directory.prepare(settings.cache_dir)
        lock.acquire()
    except directory.CacheDirError as exc:
        raise StartError(cache_dir_problem(exc)) from exc
    try:
        write_auth = _write_auth(settings)
        sockets = listen(settings.host, settings.port)
        app = build_app(settings, endpoint, write_auth)
        runner = web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        try:
            try:
                await runner.setup()
            except OSError as exc:
                raise StartError(f"cannot open the cache dir {settings.cache_dir}: {exc}") from exc
            except PrivateStateError as exc:
                raise StartError(str(exc)) from exc
            for sock in sockets:
                await web.SockSite(runner, sock, ssl_context=tls, backlog=_LISTEN_BACKLOG).start()
            log.info("serving on %s", settings.addr)
            risk = write_access_risk(settings)
            if risk:
                log.warning("%s: %s", *risk)
            why = await _until_stopped()
            log.info(
                "stopping (%s): %d exports and %d uploads in flight",
                why,
                len(app[REGISTRY].transfers.running("export", "pre-export")),
                len(app[REGISTRY].uploads),
            )
        finally:
            await runner.cleanup()
            for sock in sockets:
                sock.close()
    finally:
        lock.release()
    log.info("stopped")


def serve(settings: Settings, endpoint: DockerEndpoint, tls: ssl.SSLContext | None) -> int:
    """Runs the registry until SIGTERM/SIGINT; the exit status."""
    logs.configure(settings.log_level, settings.log_format)
    tune_allocator()
    _log_settings(settings, endpoint, raise_open_files_limit())
    try:
        asyncio.run(_serve(settings, endpoint, tls))
    except StartError as exc:
        log.error("%s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    return 0
