"""Private daemons for the real test world, one module each: dockerd (`dockerd`), an upstream registry
(`upstream`), Podman (`podman`), containerd as a node (`containerd`), the registry under test (`registry`),
on what they share (`process`: commands, temp dirs, processes, and `Service`, their base class).

Everything listens on loopback or on unix sockets inside short temp dirs under /tmp, so several daemons
(and several test runs) live side by side without touching the machine's defaults
(/run/containerd/containerd.sock, /var/run/docker.sock, /etc/docker). No pytest dependency: the benchmarks
and ad-hoc scripts import these classes from here too.

Cleanup is layered because a leaked dockerd or containerd poisons later runs: every process gets its own
session (we kill its whole process group), dies with the Python process that started it (PR_SET_PDEATHSIG
via ``setpriv``), is stopped by an ``atexit`` hook, and processes whose command line names one of our temp
dirs (containerd shims) are killed when their owner stops.
"""

from .containerd import NODES, Containerd, containerd_config
from .dockerd import VARIANTS, Dockerd, DockerdVariant
from .podman import Podman
from .process import (
    BOOKWORM_USR,
    DOCKER26_USR,
    DOCKER28_USR,
    DOCKER_CLI,
    REPO_ROOT,
    ROOTLESS_UID,
    RUNC_PATH,
    WORLD_DIR,
    CommandError,
    ManagedProcess,
    Service,
    WorldUnavailable,
    free_port,
    http_status,
    make_temp_dir,
    remove_tree,
    require_binary,
    run,
    search_path,
    sweep_stale_dirs,
    unix_http,
    wait_until,
)
from .registry import NO_ZERO_COPY, RegistryFactory, RegistryProcess
from .upstream import AccessLogEntry, UpstreamRegistry

__all__ = [
    "BOOKWORM_USR",
    "DOCKER26_USR",
    "DOCKER28_USR",
    "DOCKER_CLI",
    "NODES",
    "NO_ZERO_COPY",
    "REPO_ROOT",
    "ROOTLESS_UID",
    "RUNC_PATH",
    "VARIANTS",
    "WORLD_DIR",
    "AccessLogEntry",
    "CommandError",
    "Containerd",
    "Dockerd",
    "DockerdVariant",
    "ManagedProcess",
    "Podman",
    "RegistryFactory",
    "RegistryProcess",
    "Service",
    "UpstreamRegistry",
    "WorldUnavailable",
    "containerd_config",
    "free_port",
    "http_status",
    "make_temp_dir",
    "remove_tree",
    "require_binary",
    "run",
    "search_path",
    "sweep_stale_dirs",
    "unix_http",
    "wait_until",
]
