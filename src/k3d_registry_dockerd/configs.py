"""Ready-made cluster configurations that send every image pull through this registry, with the mounts a
registry container needs to serve the daemon's images where they lie (asked of the daemon: what it runs,
its data root, its containerd); and the KEP-1755 ConfigMap through which Tilt, ctlptl and Skaffold find it."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

from . import IMAGE, __version__
from .docker.containerd import SYSTEM_ADDRESS
from .docker.endpoint import DockerEndpoint
from .docker.engine import DaemonInfo, DockerClient, DockerUnavailable
from .sources.discovery import kind_of

DEFAULT_IMAGE = f"{IMAGE}:{__version__}"
CACHE_VOLUME = "k3d-registry-dockerd-cache"
CONTAINER_SOCKET = "/var/run/docker.sock"
PODMAN_SOCKET = "/run/podman/podman.sock"
CONTENT = "io.containerd.content.v1.content"
# Docker Desktop runs its own containerd inside its VM, where the bind mounts of containers resolve.
DESKTOP_CONTAINERD = "/var/run/desktop-containerd/containerd.sock"
DESKTOP_CONTENT = f"/var/lib/desktop-containerd/daemon/{CONTENT}"
SYSTEM_CONTENT = f"/var/lib/containerd/{CONTENT}"
ASK_WITHIN = 10.0
# KEP-1755 asks for a help URL that does not drift: this version's README.
HELP_URL = (
    "https://github.com/k3d-registry-dockerd/k3d-registry-dockerd/blob/"
    f"v{__version__}/README.md#tilt-ctlptl-and-skaffold"
)
# Files Docker and Podman put into every container they run.
CONTAINER_MARKERS = ("/.dockerenv", "/run/.containerenv")


@dataclass(frozen=True)
class Mount:
    """A bind mount of the registry container, and what it is for (a comment beside it)."""

    source: str
    target: str
    why: str
    read_only: bool = False

    def spec(self) -> str:
        return f"{self.source}:{self.target}" + (":ro" if self.read_only else "")


@dataclass(frozen=True)
class Setup:
    """The mounts for what the daemon runs, and comment lines saying what that is and what they give."""

    mounts: list[Mount]
    about: str


def _api_mount(source: str) -> Mount:
    why = "the daemon's API: what a tag names, pulls, events, and exports where nothing is served in place"
    return Mount(source, CONTAINER_SOCKET, why)


def _elsewhere(info: DaemonInfo, socket: str | None) -> bool:
    """Whether the daemon runs in a VM (Docker Desktop, OrbStack, Colima, Rancher Desktop, a Podman
    machine) or on another machine (tcp): container mounts then name paths there, as it reports them,
    and its socket where containers find it, not where this host reaches it."""
    if socket is None or sys.platform != "linux" or info.os_name == "Docker Desktop":
        return True
    return Path(socket).is_relative_to(Path.home())


def _containerd_mounts(address: str, content: str) -> list[Mount]:
    return [
        Mount(address, address, "Docker's containerd: its image records, only read through its API"),
        Mount(content, content, "containerd's content store: images served from its files as they are", True),
    ]


def _containerd_of(info: DaemonInfo) -> tuple[str, str]:
    """Docker's containerd socket and content store, as the daemon's side names them."""
    if info.os_name == "Docker Desktop":
        return DESKTOP_CONTAINERD, DESKTOP_CONTENT
    address = info.containerd_address or SYSTEM_ADDRESS
    if address != SYSTEM_ADDRESS and info.root_dir:
        # A containerd that dockerd starts itself keeps its root under Docker's data root.
        return address, f"{info.root_dir}/containerd/daemon/{CONTENT}"
    return address, SYSTEM_CONTENT


def setup_for(info: DaemonInfo, where: str, socket: str | None) -> Setup:
    """The mounts that let a registry container reach the daemon (at `socket` here; None over tcp) and
    serve its images where they lie, read-only: containerd's socket and content store, or the data root
    of Docker's classic store or of Podman's storage."""
    kind = kind_of(info)
    vm = _elsewhere(info, socket)
    source = (PODMAN_SOCKET if kind == "podman" else CONTAINER_SOCKET) if vm else socket
    mounts = [_api_mount(source)]
    if kind == "containerd":
        mounts += _containerd_mounts(*_containerd_of(info))
        store = "its containerd image store"
    else:
        root = info.root_dir or "/var/lib/docker"
        owner = "Podman's storage" if kind == "podman" else "Docker's data root (its classic image store)"
        mounts.append(Mount(root, root, f"{owner}: layers served from its files", True))
        store = (
            f"{'its storage' if kind == 'podman' else 'its classic store'} ({info.storage_driver}, {root})"
        )
    about = (
        f"# {info.product} {info.server_version} at {where}\n"
        f"# keeps its images in {store}.\n"
        "# The read-only mounts below let the registry serve them where they lie (without them every\n"
        "# image is exported); the registry's start log and `k3d-registry-dockerd doctor` say which.\n"
    )
    if vm:
        about += (
            "# The daemon runs in a VM or elsewhere: these paths are its own (not verified here for VMs).\n"
        )
    return Setup(mounts, about)


def setup_unknown(problem: str) -> Setup:
    about = (
        f"# Docker could not be asked what it runs: {problem}\n"
        "# Only its socket is mounted, so every image is exported; run this again where Docker answers to\n"
        "# get the mounts that serve images where they lie.\n"
    )
    return Setup([_api_mount(CONTAINER_SOCKET)], about)


def containerd_assumed() -> Setup:
    """The mounts for Docker Engine 29 on Linux (the system containerd), without asking Docker."""
    about = "# Docker Engine 29 on Linux with its containerd image store (--containerd, Docker not asked).\n"
    return Setup([_api_mount(CONTAINER_SOCKET), *_containerd_mounts(SYSTEM_ADDRESS, SYSTEM_CONTENT)], about)


def store_mount_options(info: DaemonInfo, endpoint: DockerEndpoint) -> str:
    """The `-v` options `config k3d` gives a registry container to read the daemon's store (the socket's
    mount aside)."""
    mounts = setup_for(info, endpoint.host, endpoint.socket_path).mounts[1:]
    return " ".join(f"-v {mount.spec()}" for mount in mounts)


def missing_mounts(info: DaemonInfo, endpoint: DockerEndpoint) -> str | None:
    """For a registry running in a container that cannot read the daemon's store: the mounts `config k3d`
    gives it, which would serve the store in place; None outside a container (the reason says what to do)."""
    if not any(Path(marker).exists() for marker in CONTAINER_MARKERS):
        return None
    how = "zero-copy" if kind_of(info) == "containerd" else "in place"
    options = store_mount_options(info, endpoint)
    return f"to serve them {how}, give the registry container the mounts `config k3d` prints: {options}"


async def ask(endpoint: DockerEndpoint) -> Setup:
    """What the daemon at `endpoint` runs, and the mounts for it; only the socket when it cannot be asked."""
    docker = DockerClient(endpoint)
    try:
        info = await asyncio.wait_for(docker.daemon(), ASK_WITHIN)
    except DockerUnavailable as exc:
        return setup_unknown(str(exc))
    except TimeoutError:
        return setup_unknown(f"{endpoint.describe()} did not answer within {ASK_WITHIN:.0f}s")
    finally:
        await docker.close()
    return setup_for(info, endpoint.host, endpoint.socket_path)


def _volumes(mounts: list[Mount], indent: int) -> str:
    pad = " " * indent
    return "".join(f"{pad}# {mount.why}\n{pad}- {mount.spec()}\n" for mount in mounts)


def registries_yaml(endpoint: str) -> str:
    """k3s `registries.yaml`: `"*"` makes the registry the first mirror of every registry."""
    return f'mirrors:\n  "*":\n    endpoint:\n      - "{endpoint}"\n'


def _indented(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line + "\n" for line in text.splitlines())


_K3D_HEADER = (
    "# k3d cluster create --config THIS_FILE\n"
    "apiVersion: k3d.io/v1alpha5\n"
    "kind: Simple\n"
    "metadata:\n"
    "  name: dev\n"
    "registries:\n"
)


def _registry_create(name: str, port: int, image: str, setup: Setup) -> str:
    """k3d's `registries` block that creates the registry container and makes it every registry's mirror.

    k3d names that container exactly `registries.create.name` (no `k3d-` prefix, unlike `k3d registry
    create`), and maps the host port to the container's 5000, where the nodes reach it."""
    return (
        "create:\n"
        f"  name: {name}\n"
        '  host: "0.0.0.0"\n'
        f'  hostPort: "{port}"\n'
        f"  image: {image}\n"
        "  volumes:\n"
        + _volumes(setup.mounts, 4)
        + "    # the registry's own cache\n"
        + f"    - {CACHE_VOLUME}:/var/cache/k3d-registry-dockerd\n"
        "config: |\n" + _indented(registries_yaml(f"http://{name}:5000"), 2)
    )


def _hosting_command(name: str, port: int, *, shared: bool) -> str:
    """The command that applies this registry's KEP-1755 ConfigMap, with the flags that made it."""
    flags = f"--name {name} --port {port}" + (" --shared" if shared else "")
    return f"k3d-registry-dockerd config local-registry-hosting {flags} | kubectl apply -f -"


def _hosting_note(name: str, port: int, *, shared: bool) -> str:
    """Where the KEP-1755 ConfigMap comes from for a k3d cluster using the registry."""
    return (
        "# Tilt, ctlptl and Skaffold find the registry in the local-registry-hosting ConfigMap (KEP-1755),\n"
        "# which k3d writes; this registry's own (its help links the README), once the cluster runs:\n"
        f"#   {_hosting_command(name, port, shared=shared)}\n"
    )


def k3d_create(name: str, port: int, image: str, setup: Setup) -> str:
    """k3d Simple config whose cluster creates and uses the registry container (`registries.create`)."""
    return (
        setup.about
        + _hosting_note(name, port, shared=False)
        + _K3D_HEADER
        + _indented(_registry_create(name, port, image, setup), 2)
    )


def k3d_shared(name: str, port: int, image: str, setup: Setup) -> str:
    """k3d Simple config using a registry created once with `k3d registry create` (shared by clusters).

    `k3d registry create NAME` always names the container `k3d-NAME`, so a name given with the prefix
    is passed without it; `registries.use` and the endpoint name the container."""
    short = name.removeprefix("k3d-")
    return (
        setup.about
        + _hosting_note(short, port, shared=True)
        + f"# k3d registry create {short} --port {port} -i {image}"
        + "".join(f" \\\n#   -v {mount.spec()}" for mount in setup.mounts)
        + "\n"
        + _K3D_HEADER
        + "  use:\n"
        f"    - k3d-{short}:{port}\n"
        "  config: |\n" + _indented(registries_yaml(f"http://k3d-{short}:5000"), 4)
    )


def hosts_toml(endpoint: str) -> str:
    """containerd `certs.d/_default/hosts.toml`, what k3s writes for `mirrors: "*"`."""
    return f'[host."{endpoint}/v2"]\n  capabilities = ["pull", "resolve"]\n'


def kind_cluster(hosts_dir: str, name: str, port: int, image: str, setup: Setup) -> str:
    """kind Cluster config: containerd reads `config_path`, where `hosts_dir` is mounted; the comment
    above it runs the registry container, which joins kind's network once the cluster made it."""
    listen = [f"-e REGISTRY_HTTP_ADDR=:{port}"] if port != 5000 else []
    run = [
        f"docker run -d --name {name} --restart=always",
        *listen,
        *(f"-v {mount.spec()}" for mount in setup.mounts),
        f"-v {CACHE_VOLUME}:/var/cache/k3d-registry-dockerd",
        image,
    ]
    return (
        setup.about + "# " + " \\\n#   ".join(run) + "\n# kind create cluster --config THIS_FILE\n"
        f"# docker network connect kind {name}\n"
        "kind: Cluster\n"
        "apiVersion: kind.x-k8s.io/v1alpha4\n"
        "containerdConfigPatches:\n"
        "  - |-\n"
        '    [plugins."io.containerd.grpc.v1.cri".registry]\n'
        '      config_path = "/etc/containerd/certs.d"\n'
        "nodes:\n"
        "  - role: control-plane\n"
        "    extraMounts:\n"
        f'      - hostPath: "{hosts_dir}"\n'
        '        containerPath: "/etc/containerd/certs.d"\n'
    )


def node_name(name: str, *, shared: bool) -> str:
    """The registry container's name as k3d makes it: `k3d registry create NAME` prefixes `k3d-`."""
    return f"k3d-{name.removeprefix('k3d-')}" if shared else name


def local_registry_hosting(name: str, port: int, *, shared: bool = False) -> str:
    """The KEP-1755 ConfigMap for the registry `config k3d` makes: the host pushes to `localhost:PORT`,
    nodes and pods reach the container by its name on k3d's network, at its port 5000 (as k3d itself
    writes them for a registry it uses)."""
    inside = f"{node_name(name, shared=shared)}:5000"
    return (
        "# Where Tilt, ctlptl and Skaffold push images for this cluster (KEP-1755):\n"
        f"# {_hosting_command(name, port, shared=shared)}\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: local-registry-hosting\n"
        "  namespace: kube-public\n"
        "data:\n"
        "  localRegistryHosting.v1: |\n"
        f'    host: "localhost:{port}"\n'
        f'    hostFromContainerRuntime: "{inside}"\n'
        f'    hostFromClusterNetwork: "{inside}"\n'
        f'    help: "{HELP_URL}"\n'
    )


def ctlptl_cluster(name: str, port: int, image: str, setup: Setup) -> str:
    """A ctlptl Cluster (product k3d) whose k3d config creates the registry container with its mounts.

    ctlptl's own `kind: Registry` cannot run it: ctlptl starts registry containers with a port, labels and
    env only (its Registry type has no volumes), and the registry needs the Docker socket."""
    return (
        setup.about
        + "# ctlptl's `kind: Registry` cannot run this registry: ctlptl starts a registry container with a\n"
        "# port, labels and env only, no volumes, and this registry needs Docker's socket (and the mounts\n"
        "# below). So k3d creates it with the cluster (k3d's registries.create takes volumes), and k3d\n"
        "# writes the local-registry-hosting ConfigMap that ctlptl and Tilt read. Give the Cluster no\n"
        "# `registry:` field: ctlptl would start a container of its own under that name, without them.\n"
        "# ctlptl apply -f THIS_FILE (ctlptl names k3d clusters k3d-NAME: change `dev` to yours)\n"
        "apiVersion: ctlptl.dev/v1alpha1\n"
        "kind: Cluster\n"
        "product: k3d\n"
        "name: k3d-dev\n"
        "k3d:\n"
        "  v1alpha5Simple:\n"
        "    registries:\n" + _indented(_registry_create(name, port, image, setup), 6)
    )
