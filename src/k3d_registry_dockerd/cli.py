"""The `k3d-registry-dockerd` command: parses flags and environment, then serves the registry."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import json
import logging
import os
import resource
import ssl
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from aiohttp import web

from . import __version__, cache, configs, doctor
from .api import AccessLogger, create_app
from .docker import DockerClient, DockerUnavailable
from .endpoint import DockerEndpoint, EndpointError, resolve_endpoint
from .mirror import Mirror
from .settings import (
    ENV_ADDR,
    ENV_ALLOW_DOCKER_DELETE,
    ENV_CACHE_DIR,
    ENV_CACHE_MAX_SIZE,
    ENV_LOAD_PUSHED,
    ENV_LOG_FORMAT,
    ENV_LOG_LEVEL,
    ENV_REFRESH_TAGS,
    ENV_TLS_CERT,
    ENV_TLS_KEY,
    LOG_FORMATS,
    LOG_LEVELS,
    SettingError,
    Settings,
    parse_duration,
    resolve,
)
from .store import Store

log = logging.getLogger("k3d_registry_dockerd")
# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Enough for thousands of connections and blobs in flight; more only costs kernel memory when used.
_OPEN_FILES_CAP = 1 << 16
_LISTEN_BACKLOG = 1024


def _add_settings(parser: argparse.ArgumentParser, default: object = None) -> None:
    parser.add_argument(
        "--addr", default=default, help=f"HOST:PORT to listen on (env {ENV_ADDR}; default :5000)"
    )
    parser.add_argument(
        "--cache-dir",
        default=default,
        help=f"where blobs and records are kept (env {ENV_CACHE_DIR}; "
        "default $XDG_CACHE_HOME/k3d-registry-dockerd or ~/.cache/k3d-registry-dockerd)",
    )
    parser.add_argument(
        "--log-level", default=default, choices=LOG_LEVELS, help=f"(env {ENV_LOG_LEVEL}; default info)"
    )
    parser.add_argument(
        "--log-format",
        default=default,
        choices=LOG_FORMATS,
        help=f"text lines or one JSON object per line (env {ENV_LOG_FORMAT}; default text)",
    )
    parser.add_argument(
        "--refresh-tags",
        default=default,
        metavar="DURATION",
        help="re-pull a cached remote tag through Docker when it was last pulled longer ago than this "
        f"(e.g. 10m, 1h; env {ENV_REFRESH_TAGS}; default: never, serve Docker's copy)",
    )
    parser.add_argument(
        "--cache-max-size",
        default=default,
        metavar="SIZE",
        help="evict least recently used images when the cache grows past this (e.g. 20GiB; "
        f"env {ENV_CACHE_MAX_SIZE}; default: no limit)",
    )
    parser.add_argument(
        "--no-load-pushed",
        action="store_const",
        const=True,
        default=default,
        help=f"do not load pushed images into Docker (env {ENV_LOAD_PUSHED}=false)",
    )
    parser.add_argument(
        "--allow-docker-delete",
        action="store_const",
        const=True,
        default=default,
        help="let DELETE requests remove Docker's own images, not only pushed content "
        f"(env {ENV_ALLOW_DOCKER_DELETE}=true)",
    )
    parser.add_argument(
        "--tls-cert",
        default=default,
        metavar="FILE",
        help=f"serve HTTPS with this certificate (env {ENV_TLS_CERT})",
    )
    parser.add_argument(
        "--tls-key",
        default=default,
        metavar="FILE",
        help=f"the certificate's private key (env {ENV_TLS_KEY})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k3d-registry-dockerd",
        description="An OCI registry mirror that serves images out of the local Docker daemon "
        "(DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH as the docker CLI reads them). "
        "Without a command it serves.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_settings(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    # SUPPRESS keeps options given before the command from being reset by the command's own defaults.
    _add_settings(commands.add_parser("serve", help="serve the registry (the default)"), argparse.SUPPRESS)
    _add_settings(
        commands.add_parser(
            "doctor", help="check Docker, the cache dir and the listen port, and explain what they mean"
        ),
        argparse.SUPPRESS,
    )
    cache_parser = commands.add_parser(
        "cache", help="list, verify or prune the cache (run while the registry is stopped)"
    )
    _add_settings(cache_parser, argparse.SUPPRESS)
    cache_parser.add_argument("action", choices=("ls", "verify", "prune"))
    cache_parser.add_argument("--all", action="store_true", help="prune: remove every cached image")
    cache_parser.add_argument(
        "--older-than", metavar="DURATION", help="prune: images not used for this long (e.g. 7d, 12h)"
    )
    config = commands.add_parser("config", help="print a cluster configuration that uses this registry")
    config.add_argument(
        "target",
        choices=("k3d", "kind", "registries"),
        help="k3d: a k3d Simple config; kind: a kind Cluster config (and writes hosts.toml into "
        "--hosts-dir); registries: a k3s registries.yaml",
    )
    config.add_argument("--name", help="the registry's container name (default k3d-registry, kind-registry)")
    config.add_argument("--port", type=int, default=5000, help="its port (default 5000)")
    config.add_argument("--image", default=configs.DEFAULT_IMAGE, help=f"(default {configs.DEFAULT_IMAGE})")
    config.add_argument(
        "--shared",
        action="store_true",
        help="k3d: use a registry made once with `k3d registry create` instead of one per cluster",
    )
    config.add_argument(
        "--hosts-dir",
        default="certs.d",
        help="kind: where to write _default/hosts.toml, mounted into the nodes (default ./certs.d)",
    )
    return parser


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return "just now"


def _cache_command(args: argparse.Namespace, settings: Settings) -> int:
    store = Store(settings.cache_dir)
    store.open()
    if args.action == "ls":
        print(f"{'REPOSITORY':40} {'TAGS':20} {'DIGEST':19} {'SIZE':>10}  LAST USED")
        now = time.time()
        for image in cache.images(store):
            print(
                f"{image.repository:40} {','.join(image.tags):20} {image.digest[:19]} "
                f"{image.size / 1e6:>8.1f}MB  {_age(now - image.last_used)}"
            )
        return 0
    if args.action == "verify":
        checked, corrupt = cache.verify(store)
        for path in corrupt:
            print(f"✗ removed {path}: its bytes do not match its digest")
        print(f"checked {checked} blobs, {len(corrupt)} corrupt")
        return 1 if corrupt else 0
    if not args.all and args.older_than is None:
        print("k3d-registry-dockerd: cache prune needs --all or --older-than DURATION", file=sys.stderr)
        return 2
    try:
        older_than = parse_duration(args.older_than) if args.older_than else None
    except SettingError as exc:
        print(f"k3d-registry-dockerd: {exc}", file=sys.stderr)
        return 2
    result = cache.prune(store, older_than=older_than, everything=args.all)
    print(
        f"pruned {result.tags} tags, {result.manifests} manifests, {result.blobs} blobs "
        f"({result.bytes / 1e6:.1f} MB freed)"
    )
    return 0


def _print_config(args: argparse.Namespace) -> int:
    if args.target == "k3d":
        name = args.name or "k3d-registry"
        render = configs.k3d_shared if args.shared else configs.k3d_create
        print(render(name, args.port, args.image), end="")
    elif args.target == "kind":
        name = args.name or "kind-registry"
        hosts = Path(args.hosts_dir).resolve() / "_default" / "hosts.toml"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(configs.hosts_toml(f"http://{name}:{args.port}"))
        print(f"# wrote {hosts}")
        print(configs.kind_cluster(str(hosts.parent.parent)), end="")
    else:
        print(configs.registries_yaml(f"http://{args.name or 'k3d-registry'}:{args.port}"), end="")
    return 0


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    # aiodocker and aiohttp's own debug output would drown the registry's.
    for noisy in ("aiohttp.internal", "aiohttp.server", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))


def _tune_allocator() -> None:
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


def _raise_open_files_limit() -> int:
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


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
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


def _build_app(settings: Settings, endpoint: DockerEndpoint) -> web.Application:
    store = Store(settings.cache_dir)
    docker = DockerClient(endpoint)
    mirror = Mirror(store, docker, refresh_tags=settings.refresh_tags, cache_max_size=settings.cache_max_size)
    app = create_app(
        mirror, load_pushed=settings.load_pushed, allow_docker_delete=settings.allow_docker_delete
    )

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await asyncio.to_thread(store.open)
        try:
            await docker.daemon()
        except DockerUnavailable as exc:
            log.warning("%s; serving what is cached and retrying on every request that needs Docker", exc)
        log.info("serving on %s", settings.addr)
        yield
        await docker.close()

    app.cleanup_ctx.append(lifecycle)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config":
        return _print_config(args)
    try:
        settings = resolve(
            addr=args.addr,
            cache_dir=args.cache_dir,
            log_level=args.log_level,
            refresh_tags=args.refresh_tags,
            log_format=args.log_format,
            cache_max_size=args.cache_max_size,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            no_load_pushed=args.no_load_pushed,
            allow_docker_delete=args.allow_docker_delete,
        )
        ssl_context = _ssl_context(settings)
        endpoint = resolve_endpoint(os.environ)
    except (SettingError, EndpointError) as exc:
        print(f"k3d-registry-dockerd: {exc}", file=sys.stderr)
        return 2
    if args.command == "doctor":
        return asyncio.run(doctor.run(settings, endpoint))
    if args.command == "cache":
        return _cache_command(args, settings)
    _configure_logging(settings.log_level, settings.log_format)
    _tune_allocator()
    open_files = _raise_open_files_limit()
    log.info("k3d-registry-dockerd %s", __version__)
    log.info("open-files limit %d", open_files)
    log.info("listen address %s (%s)", settings.addr, settings.sources["addr"])
    log.info("cache dir %s (%s)", settings.cache_dir, settings.sources["cache_dir"])
    log.info("log level %s (%s)", settings.log_level, settings.sources["log_level"])
    log.info("Docker at %s", endpoint.describe())
    if settings.refresh_tags is not None:
        log.info(
            "refresh remote tags after %.0fs (%s)", settings.refresh_tags, settings.sources["refresh_tags"]
        )
    if settings.cache_max_size is not None:
        log.info(
            "cache limit %.1f MB (%s)", settings.cache_max_size / 1e6, settings.sources["cache_max_size"]
        )
    log.info(
        "pushed images %s loaded into Docker (%s)",
        "are" if settings.load_pushed else "are not",
        settings.sources["load_pushed"],
    )
    if settings.allow_docker_delete:
        log.info("DELETE may remove Docker's own images (%s)", settings.sources["allow_docker_delete"])
    if settings.tls_cert is not None:
        log.info("serving HTTPS with %s (%s)", settings.tls_cert, settings.sources["tls_cert"])
    web.run_app(
        _build_app(settings, endpoint),
        host=settings.host,
        port=settings.port,
        ssl_context=ssl_context,
        print=None,
        access_log_class=AccessLogger,
        shutdown_timeout=5,
        # A cluster start opens hundreds of connections at once; 128 (the default) overflows and the
        # kernel drops SYNs, which costs clients a one-second retransmit each.
        backlog=_LISTEN_BACKLOG,
    )
    return 0
