"""The `k3d-registry-dockerd` command: flags and environment in, one of serve / doctor / cache / config /
image.

Every mistake is answered with one line on stderr and a non-zero exit; a traceback only with
`--log-level debug`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, configs, doctor, server, warm, workloads
from . import image as container_image
from .cache import directory, maintenance
from .cache.store import Store
from .common import units
from .docker.endpoint import EndpointError, resolve_endpoint
from .settings import (
    ENV_ADDR,
    ENV_CACHE_DIR,
    ENV_LOG_LEVEL,
    OPTION,
    OPTIONS,
    Option,
    SettingError,
    cache_dir_problem,
    parse_duration,
    resolve,
    resolve_cache_dir,
)

PROG = "k3d-registry-dockerd"
_VERBS = {"ls": "list", "verify": "verify", "prune": "prune"}


class _Parser(argparse.ArgumentParser):
    """No abbreviated options, in every command (its subcommands' parsers are of this class too): the
    server's --allow-* options would make `cache prune --all` ambiguous."""

    def __init__(self, **options: Any) -> None:
        super().__init__(allow_abbrev=False, **options)


def _add_option(parser: argparse.ArgumentParser, option: Option, default: object) -> None:
    if option.switch is not None:
        parser.add_argument(
            option.flag,
            dest=option.dest,
            action="store_const",
            const=True,
            default=default,
            help=option.help_text(),
        )
    else:
        parser.add_argument(
            option.flag,
            dest=option.dest,
            default=default,
            metavar=None if option.choices else option.metavar,
            choices=option.choices,
            help=option.help_text(),
        )


def _server_options(parser: argparse.ArgumentParser, default: object = None) -> None:
    """The server's settings; `default` SUPPRESS keeps options given before a command from being reset."""
    for option in OPTIONS:
        _add_option(parser, option, default)


def _config_options(parser: argparse.ArgumentParser, name: str, port_help: str) -> None:
    parser.add_argument("--name", default=name, help=f"the registry's container name (default {name})")
    parser.add_argument("--port", type=int, default=5000, help=f"{port_help} (default 5000)")


def _container_options(parser: argparse.ArgumentParser) -> None:
    """For configs that run the registry as a container, with the mounts Docker's setup needs."""
    parser.add_argument(
        "--image", default=configs.DEFAULT_IMAGE, help=f"the registry image (default {configs.DEFAULT_IMAGE})"
    )


def _containerd_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--containerd",
        action="store_true",
        help="print the mounts for Docker Engine 29 on Linux (the system containerd's socket and content "
        "store) without asking Docker what it runs",
    )


def _image_parser(commands: Any) -> None:
    images = commands.add_parser(
        "image",
        help="build the registry's container image with Docker",
        description="The registry's container image, the one `config k3d` and `config kind` run.",
    )
    actions = images.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build",
        help="build it from this installed version, through the Docker the registry talks to",
        description="Build the image from this installed version (no clone needed) with the package's "
        "Dockerfile, through Docker as the registry finds it (DOCKER_HOST, else the current context). The "
        "build itself installs the dependencies from PyPI unless --wheels gives them.",
    )
    build.add_argument(
        "--tag", default=configs.DEFAULT_IMAGE, help=f"the image's name (default {configs.DEFAULT_IMAGE})"
    )
    build.add_argument(
        "--base",
        metavar="IMAGE",
        help="the base image, one with python3 (>= 3.11) and its venv module (default the Dockerfile's, "
        "python:3.13-slim-bookworm)",
    )
    build.add_argument(
        "--wheels",
        type=Path,
        metavar="DIR",
        help="install the dependencies from the wheels in DIR only, without an index: a build without "
        "network (pip download --only-binary=:all: --python-version 3.11 -d DIR k3d-registry-dockerd)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="An OCI registry that serves images out of the local Docker daemon (found through "
        "DOCKER_HOST, DOCKER_CONTEXT or the docker CLI's current context). Without a command it serves.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _server_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="serve the registry (the default)", description="Serve the registry."
    )
    _server_options(serve, argparse.SUPPRESS)
    check = commands.add_parser(
        "doctor",
        help="check Docker, the cache dir, the port and write access, and say what they mean",
        description="Check what serving needs, with the server's own options and environment; one line "
        "per check with the remedy. Exits 1 when something blocks serving.",
    )
    _server_options(check, argparse.SUPPRESS)

    cache_parser = commands.add_parser(
        "cache",
        help="list, verify or prune the cache (of a registry that is not running)",
        description="Work on the cache dir of a registry that is not running (a running one holds it).",
    )
    actions = cache_parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "ls",
        help="the cached images: tags, digest, size, source, last use",
        description="List cached images.",
    )
    verify = actions.add_parser(
        "verify",
        help="hash every blob again and remove those whose bytes no longer match (exit 1 if any)",
        description="Hash every blob again; remove the corrupt ones, which the next pull exports again.",
    )
    prune = actions.add_parser(
        "prune",
        help="remove images not used for a while, or all; pushed images stay unless --include-pushed",
        description="Remove cached images and the blobs only they use. Pushed images cannot be exported "
        "again, so they stay unless --include-pushed.",
    )
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every cached image")
    which.add_argument(
        "--older-than", metavar="DURATION", help="images not used for this long (with a unit: 7d, 12h, 30m)"
    )
    prune.add_argument("--include-pushed", action="store_true", help="pushed images too")
    for action in (listing, verify, prune):
        _add_option(action, OPTION["cache_dir"], argparse.SUPPRESS)

    warming = commands.add_parser(
        "warm",
        help="make images ready in a running registry before a cluster pulls them",
        description="Ask a running registry for each image as a node's first pull does: it pulls through "
        "Docker what Docker lacks, exports and caches it. One line per image; exit 1 if any failed.",
    )
    warming.add_argument(
        "images", nargs="*", metavar="IMAGE", help="images, as a pod names them (nginx:1.27)"
    )
    warming.add_argument(
        "-f",
        "--file",
        action="append",
        default=[],
        metavar="FILE",
        help="Kubernetes YAML (many documents, e.g. `helm template` output; - for stdin; a directory: its "
        ".yaml and .yml files): every image of its pods, deployments, stateful sets, daemon sets, jobs and "
        "cron jobs; repeatable",
    )
    warming.add_argument(
        "--registry", default=warm.DEFAULT_REGISTRY, metavar="URL", help=f"default {warm.DEFAULT_REGISTRY}"
    )
    warming.add_argument(
        "--parallel",
        type=int,
        default=warm.DEFAULT_PARALLEL,
        metavar="N",
        help=f"images warmed at once (default {warm.DEFAULT_PARALLEL})",
    )

    config = commands.add_parser(
        "config",
        help="print a cluster configuration that pulls every image through this registry",
        description="Print a k3d, kind, ctlptl or k3s configuration that makes this registry the mirror of "
        "every registry, or the ConfigMap through which tools find it.",
    )
    targets = config.add_subparsers(dest="target", metavar="TARGET", required=True)
    k3d = targets.add_parser(
        "k3d",
        help="a k3d Simple config (k3d cluster create --config)",
        description="A k3d Simple config that creates the registry container with the cluster, or with "
        "--shared uses one made once with `k3d registry create`. Docker is asked what it runs, and the "
        "container gets the read-only mounts that serve its images where they lie.",
    )
    _config_options(k3d, "k3d-registry", "the port on the host")
    _container_options(k3d)
    k3d.add_argument(
        "--shared",
        action="store_true",
        help="use one registry for many clusters, made once with `k3d registry create` (it names the "
        "container k3d-NAME)",
    )
    _containerd_option(k3d)
    kind = targets.add_parser(
        "kind",
        help="a kind Cluster config, and the containerd hosts.toml it mounts",
        description="A kind Cluster config, with the `docker run` of the registry container (the mounts "
        "for what Docker runs) in a comment; writes _default/hosts.toml into --hosts-dir for it to mount.",
    )
    _config_options(kind, "kind-registry", "the registry's port on kind's network")
    _container_options(kind)
    kind.add_argument(
        "--hosts-dir",
        default="certs.d",
        help="where to write _default/hosts.toml, mounted into the nodes (default ./certs.d)",
    )
    registries = targets.add_parser(
        "registries",
        help="a k3s registries.yaml",
        description="A k3s registries.yaml whose mirror for every registry is this one.",
    )
    _config_options(registries, "k3d-registry", "the registry's port as the nodes reach it")
    hosting = targets.add_parser(
        "local-registry-hosting",
        help="the local-registry-hosting ConfigMap (KEP-1755) through which Tilt, ctlptl and Skaffold find "
        "the registry",
        description="The kube-public/local-registry-hosting ConfigMap for the registry `config k3d` makes, "
        "with the same --name, --port and --shared: `| kubectl apply -f -`.",
    )
    _config_options(hosting, "k3d-registry", "the port on the host")
    hosting.add_argument(
        "--shared", action="store_true", help="the registry made with `k3d registry create` (k3d-NAME)"
    )
    ctlptl = targets.add_parser(
        "ctlptl",
        help="a ctlptl Cluster (k3d) that creates the registry container with its mounts",
        description="A ctlptl Cluster of product k3d whose k3d config creates the registry container with "
        "the mounts for what Docker runs (ctlptl's own Registry cannot mount the Docker socket).",
    )
    _config_options(ctlptl, "k3d-registry", "the port on the host")
    _container_options(ctlptl)
    _containerd_option(ctlptl)
    _image_parser(commands)
    return parser


def _fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return "just now"


def _cache_command(args: argparse.Namespace) -> int:
    cache_dir, _source = resolve_cache_dir(getattr(args, "cache_dir", None), os.environ)
    if not cache_dir.is_dir():
        return _fail(
            f"no cache at {cache_dir}, nothing to {_VERBS[args.action]} "
            f"(--cache-dir or {ENV_CACHE_DIR} name another)"
        )
    older_than = parse_duration(args.older_than) if getattr(args, "older_than", None) else None
    with directory.CacheDirLock(cache_dir):
        store = Store(cache_dir)
        store.open()
        if args.action == "ls":
            return _cache_ls(store)
        if args.action == "verify":
            checked, corrupt = maintenance.verify(store)
            for path in corrupt:
                print(f"✗ removed {path}: its bytes do not match its digest")
            print(f"checked {checked} blobs, {len(corrupt)} corrupt")
            return 1 if corrupt else 0
        result = maintenance.prune(
            store, older_than=older_than, everything=args.all, include_pushed=args.include_pushed
        )
    print(
        f"pruned {result.tags} tags, {result.manifests} manifests, {result.blobs} blobs "
        f"({units.size(result.bytes)} freed)"
    )
    if result.kept_pushed:
        print(
            f"kept {result.kept_pushed} pushed tags: they cannot be exported again "
            "(--include-pushed removes them)"
        )
    return 0


def _cache_ls(store: Store) -> int:
    print(f"{'REPOSITORY':40} {'TAGS':20} {'DIGEST':19} {'SIZE':>10}  {'SOURCE':7} LAST USED")
    now = time.time()
    for image in maintenance.images(store):
        source = "pushed" if image.pushed else "docker"
        print(
            f"{image.repository:40} {','.join(image.tags):20} {image.digest[:19]} "
            f"{units.size(image.size):>10}  {source:7} {_age(now - image.last_used)}"
        )
    return 0


def _container_setup(args: argparse.Namespace) -> configs.Setup:
    """The registry container's mounts: for what Docker runs, asked of it as the registry would ask."""
    if getattr(args, "containerd", False):
        return configs.containerd_assumed()
    try:
        endpoint = resolve_endpoint(os.environ)
    except EndpointError as exc:
        return configs.setup_unknown(str(exc))
    return asyncio.run(configs.ask(endpoint))


def _missing_image(args: argparse.Namespace) -> None:
    """Says at the top of a config, and on stderr, how to build its image when Docker does not have it."""
    try:
        endpoint = resolve_endpoint(os.environ)
    except EndpointError:
        return
    if asyncio.run(container_image.present(endpoint, args.image)) is False:
        command = container_image.build_command(args.image)
        print(f"# {args.image} is not in Docker: build it first with `{command}`")
        print(
            f"{PROG}: {args.image} is not in Docker at {endpoint.host}; build it with: {command}",
            file=sys.stderr,
        )


def _print_config(args: argparse.Namespace) -> int:
    if args.target in ("k3d", "kind", "ctlptl"):
        _missing_image(args)
    if args.target == "k3d":
        render = configs.k3d_shared if args.shared else configs.k3d_create
        print(render(args.name, args.port, args.image, _container_setup(args)), end="")
    elif args.target == "kind":
        hosts = Path(args.hosts_dir).resolve() / "_default" / "hosts.toml"
        try:
            hosts.parent.mkdir(parents=True, exist_ok=True)
            hosts.write_text(configs.hosts_toml(f"http://{args.name}:{args.port}"))
        except OSError as exc:
            return _fail(f"cannot write {hosts}: {exc.strerror or exc}; choose another --hosts-dir")
        print(f"# wrote {hosts}")
        setup = _container_setup(args)
        print(configs.kind_cluster(str(hosts.parent.parent), args.name, args.port, args.image, setup), end="")
    elif args.target == "local-registry-hosting":
        print(configs.local_registry_hosting(args.name, args.port, shared=args.shared), end="")
    elif args.target == "ctlptl":
        print(configs.ctlptl_cluster(args.name, args.port, args.image, _container_setup(args)), end="")
    else:
        print(configs.registries_yaml(f"http://{args.name}:{args.port}"), end="")
    return 0


def _warm_line(outcome: warm.Outcome) -> None:
    if outcome.problem is None:
        print(f"✓ {outcome.target.image}: {outcome.digest} ({outcome.seconds:.1f}s)", flush=True)
    else:
        print(f"✗ {outcome.target.image}: {outcome.problem}", flush=True)


def _yaml_texts(name: str) -> list[str]:
    """The text of a file, of stdin (-), or of a directory's .yaml and .yml files (as `kubectl -f`)."""
    if name == "-":
        return [sys.stdin.read()]
    path = Path(name)
    if path.is_dir():
        return [found.read_text() for found in sorted(path.iterdir()) if found.suffix in (".yaml", ".yml")]
    return [path.read_text()]


def _warm_command(args: argparse.Namespace) -> int:
    images = list(args.images)
    try:
        texts = [text for name in args.file for text in _yaml_texts(name)]
        images += workloads.images(texts)
    except OSError as exc:
        return _fail(f"cannot read {exc.filename}: {exc.strerror}", 2)
    except workloads.WorkloadError as exc:
        return _fail(str(exc), 2)
    if not images:
        return _fail("no images to warm: name some, or give -f FILE with Kubernetes YAML", 2)
    started = time.monotonic()
    try:
        outcomes = asyncio.run(
            warm.warm(images, registry=args.registry, parallel=args.parallel, report=_warm_line)
        )
    except warm.RegistryUnreachable as exc:
        return _fail(str(exc))
    failed = [outcome for outcome in outcomes if outcome.problem is not None]
    print(
        f"{len(outcomes) - len(failed)} of {len(outcomes)} images ready in {time.monotonic() - started:.1f}s"
        + (f"; {len(failed)} failed" if failed else "")
    )
    return 1 if failed else 0


def _image_command(args: argparse.Namespace) -> int:
    try:
        endpoint = resolve_endpoint(os.environ)
        asyncio.run(container_image.build(endpoint, args.tag, args.base, args.wheels, print))
    except container_image.ImageError as exc:
        return _fail(str(exc))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "image":
        return _image_command(args)
    if args.command == "config":
        return _print_config(args)
    if args.command == "warm":
        return _warm_command(args)
    if args.command == "cache":
        return _cache_command(args)
    settings = resolve(**vars(args))
    tls = server.ssl_context(settings)
    endpoint = resolve_endpoint(os.environ)
    if args.command == "doctor":
        return asyncio.run(doctor.run(settings, endpoint))
    return server.serve(settings, endpoint, tls)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if "config" not in arguments and any(a == "--port" or a.startswith("--port=") for a in arguments):
        # What people try first; the server's address is one setting, as distribution's.
        return _fail(
            f"--port is not a server option: it listens on --addr HOST:PORT "
            f"(e.g. --addr :5001, or env {ENV_ADDR})",
            2,
        )
    args = build_parser().parse_args(arguments)
    try:
        return _run(args)
    except (SettingError, EndpointError) as exc:
        return _fail(str(exc), 2)
    except directory.CacheDirError as exc:
        return _fail(cache_dir_problem(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if (
            getattr(args, "log_level", None) == "debug"
            or os.environ.get(ENV_LOG_LEVEL, "").lower() == "debug"
        ):
            # Logging is configured only by the server, so the traceback goes straight to stderr.
            traceback.print_exc()
        return _fail(f"unexpected error: {exc!r} (run with --log-level debug for the traceback)")
