"""Ready-made cluster configurations that send every image pull through this registry."""

from __future__ import annotations

from . import __version__

IMAGE = "ghcr.io/k3d-registry-dockerd/k3d-registry-dockerd"
DEFAULT_IMAGE = f"{IMAGE}:{__version__}"
CACHE_VOLUME = "k3d-registry-dockerd-cache"
DOCKER_SOCKET_MOUNT = "/var/run/docker.sock:/var/run/docker.sock"
# Docker Engine 29 on Linux keeps its images in the system containerd: its socket, and its content store
# read-only at the same path (containerd reports that path, the registry reads the files there).
CONTAINERD_MOUNTS = (
    "/run/containerd/containerd.sock:/run/containerd/containerd.sock",
    "/var/lib/containerd/io.containerd.content.v1.content:/var/lib/containerd/io.containerd.content.v1.content:ro",
)


def _mounts(containerd: bool) -> tuple[str, ...]:
    return (DOCKER_SOCKET_MOUNT, *(CONTAINERD_MOUNTS if containerd else ()))


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


def k3d_create(name: str, port: int, image: str, *, containerd: bool = False) -> str:
    """k3d Simple config whose cluster creates and uses the registry container (`registries.create`).

    k3d names that container exactly `registries.create.name` (no `k3d-` prefix, unlike `k3d registry
    create`), and maps the host port to the container's 5000, where the nodes reach it."""
    return (
        _K3D_HEADER + "  create:\n"
        f"    name: {name}\n"
        '    host: "0.0.0.0"\n'
        f'    hostPort: "{port}"\n'
        f"    image: {image}\n"
        "    volumes:\n"
        + "".join(f"      - {mount}\n" for mount in _mounts(containerd))
        + f"      - {CACHE_VOLUME}:/var/cache/k3d-registry-dockerd\n"
        "  config: |\n" + _indented(registries_yaml(f"http://{name}:5000"), 4)
    )


def k3d_shared(name: str, port: int, image: str, *, containerd: bool = False) -> str:
    """k3d Simple config using a registry created once with `k3d registry create` (shared by clusters).

    `k3d registry create NAME` always names the container `k3d-NAME`, so a name given with the prefix
    is passed without it; `registries.use` and the endpoint name the container."""
    short = name.removeprefix("k3d-")
    return (
        f"# k3d registry create {short} --port {port} -i {image}"
        + "".join(f" \\\n#   -v {mount}" for mount in _mounts(containerd))
        + "\n"
        + _K3D_HEADER
        + "  use:\n"
        f"    - k3d-{short}:{port}\n"
        "  config: |\n" + _indented(registries_yaml(f"http://k3d-{short}:5000"), 4)
    )


def hosts_toml(endpoint: str) -> str:
    """containerd `certs.d/_default/hosts.toml`, what k3s writes for `mirrors: "*"`."""
    return f'[host."{endpoint}/v2"]\n  capabilities = ["pull", "resolve"]\n'


def kind_cluster(hosts_dir: str) -> str:
    """kind Cluster config: containerd reads `config_path`, where `hosts_dir` is mounted."""
    return (
        "# kind create cluster --config THIS_FILE\n"
        "# then: docker network connect kind <registry container>\n"
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
