"""`config k3d|kind|registries|ctlptl|local-registry-hosting`: what is printed parses and says what k3d, kind,
k3s, ctlptl and the tools reading KEP-1755 expect."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from k3d_registry_dockerd.cli import main
from k3d_registry_dockerd.configs import DEFAULT_IMAGE, Setup, setup_for
from k3d_registry_dockerd.docker.engine import DaemonInfo
from k3d_registry_dockerd.oci.platform import Platform

AMD64 = Platform("linux", "amd64")
CONTENT = "io.containerd.content.v1.content"


@pytest.fixture(autouse=True)
def _no_docker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Docker is asked what it runs: here it answers nothing, so only its socket is mounted."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["config", *argv]) == 0
    return capsys.readouterr().out


def _specs(setup: Setup) -> list[str]:
    return [mount.spec() for mount in setup.mounts]


def test_k3d_create(capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load(_run(capsys, "k3d"))
    assert (config["apiVersion"], config["kind"]) == ("k3d.io/v1alpha5", "Simple")
    create = config["registries"]["create"]
    assert create["name"] == "k3d-registry"
    assert create["hostPort"] == "5000"
    assert create["image"] == DEFAULT_IMAGE
    assert create["volumes"] == [
        "/var/run/docker.sock:/var/run/docker.sock",
        "k3d-registry-dockerd-cache:/var/cache/k3d-registry-dockerd",
    ]
    registries = yaml.safe_load(config["registries"]["config"])
    assert registries == {"mirrors": {"*": {"endpoint": ["http://k3d-registry:5000"]}}}


def test_k3d_shared(capsys: pytest.CaptureFixture[str]) -> None:
    text = _run(capsys, "k3d", "--shared", "--name", "cache", "--port", "5055", "--image", "me/reg:1")
    assert "# k3d registry create cache --port 5055 -i me/reg:1" in text
    config = yaml.safe_load(text)
    assert config["registries"]["use"] == ["k3d-cache:5055"]
    assert "create" not in config["registries"]
    mirrors = yaml.safe_load(config["registries"]["config"])["mirrors"]
    assert mirrors["*"]["endpoint"] == ["http://k3d-cache:5000"]


def test_docker_that_cannot_be_asked_gets_its_socket_only(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = _run(capsys, "k3d")
    first = text.splitlines()[0]
    assert first.startswith("# Docker could not be asked what it runs: Docker is unreachable at unix://")
    assert "every image is exported" in text


def test_k3d_with_containerd_mounts_its_socket_and_content_store(capsys: pytest.CaptureFixture[str]) -> None:
    volumes = yaml.safe_load(_run(capsys, "k3d", "--containerd"))["registries"]["create"]["volumes"]
    content = f"/var/lib/containerd/{CONTENT}"
    assert "/run/containerd/containerd.sock:/run/containerd/containerd.sock" in volumes
    assert f"{content}:{content}:ro" in volumes
    shared = _run(capsys, "k3d", "--shared", "--containerd")
    assert f"#   -v {content}:{content}:ro" in shared
    assert "containerd" not in yaml.safe_load(_run(capsys, "k3d"))["registries"]["create"]["volumes"][0]


def test_mounts_for_each_store() -> None:
    """What Docker reports decides the mounts: its socket where this host reaches it, and read-only at
    the same path the store that is served in place."""
    socket = "/var/run/docker.sock"
    api = f"{socket}:/var/run/docker.sock"
    classic = DaemonInfo("28.5.2", "1.51", AMD64, "overlay2", False, root_dir="/var/lib/docker")
    assert _specs(setup_for(classic, "unix://" + socket, socket)) == [
        api,
        "/var/lib/docker:/var/lib/docker:ro",
    ]
    system = DaemonInfo(
        "29.1", "1.52", AMD64, "overlayfs", True, containerd_address="/run/containerd/containerd.sock"
    )
    assert _specs(setup_for(system, "", socket)) == [
        api,
        "/run/containerd/containerd.sock:/run/containerd/containerd.sock",
        f"/var/lib/containerd/{CONTENT}:/var/lib/containerd/{CONTENT}:ro",
    ]
    own = "/var/run/docker/containerd/containerd.sock"
    managed = DaemonInfo(
        "28.5.2", "1.51", AMD64, "overlayfs", True, containerd_address=own, root_dir="/srv/docker"
    )
    assert _specs(setup_for(managed, "", socket))[1:] == [
        f"{own}:{own}",
        f"/srv/docker/containerd/daemon/{CONTENT}:/srv/docker/containerd/daemon/{CONTENT}:ro",
    ]
    rootless = DaemonInfo("28.5.2", "1.51", AMD64, "overlay2", False, root_dir="/home/me/.local/share/docker")
    user_socket = "/run/user/1000/docker.sock"
    assert _specs(setup_for(rootless, "", user_socket))[0] == f"{user_socket}:/var/run/docker.sock"
    podman = DaemonInfo(
        "4.3.1",
        "1.41",
        AMD64,
        "overlay",
        False,
        product="Podman Engine",
        root_dir="/var/lib/containers/storage",
    )
    podman_socket = "/run/podman/podman.sock"
    assert _specs(setup_for(podman, "", podman_socket)) == [
        f"{podman_socket}:/var/run/docker.sock",
        "/var/lib/containers/storage:/var/lib/containers/storage:ro",
    ]


def test_mounts_name_the_vms_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In a VM (or over tcp) the bind mounts resolve where the daemon runs: its socket there, and the
    containerd Docker Desktop runs for its image store."""
    monkeypatch.setenv("HOME", str(tmp_path))
    colima = DaemonInfo("27.4.0", "1.47", AMD64, "overlay2", False, root_dir="/var/lib/docker")
    setup = setup_for(colima, "", str(tmp_path / ".colima" / "default" / "docker.sock"))
    assert _specs(setup) == [
        "/var/run/docker.sock:/var/run/docker.sock",
        "/var/lib/docker:/var/lib/docker:ro",
    ]
    assert "runs in a VM or elsewhere" in setup.about
    remote = setup_for(colima, "tcp://build-host:2376", None)
    assert _specs(remote) == _specs(setup)
    desktop = DaemonInfo(
        "29.1", "1.52", AMD64, "overlayfs", True, os_name="Docker Desktop", containerd_address="/run/x.sock"
    )
    assert _specs(setup_for(desktop, "", str(tmp_path / ".docker" / "run" / "docker.sock")))[1:] == [
        "/var/run/desktop-containerd/containerd.sock:/var/run/desktop-containerd/containerd.sock",
        f"/var/lib/desktop-containerd/daemon/{CONTENT}:/var/lib/desktop-containerd/daemon/{CONTENT}:ro",
    ]


def test_registries_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load(_run(capsys, "registries", "--name", "my-reg", "--port", "6000"))
    assert config == {"mirrors": {"*": {"endpoint": ["http://my-reg:6000"]}}}


def test_kind(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = _run(capsys, "kind", "--hosts-dir", str(tmp_path / "certs.d"))
    config = yaml.safe_load(text)
    assert (config["kind"], config["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    patch = tomllib.loads(config["containerdConfigPatches"][0])
    assert (
        patch["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == "/etc/containerd/certs.d"
    )
    mount = config["nodes"][0]["extraMounts"][0]
    assert mount == {"hostPath": str(tmp_path / "certs.d"), "containerPath": "/etc/containerd/certs.d"}
    run = re.search(r"^# (docker run .*?)\n(?!#   )", text, re.S | re.M)
    assert run is not None
    assert shlex.split(run[1].replace("\\\n#   ", " ")) == [
        "docker", "run", "-d", "--name", "kind-registry", "--restart=always",
        "-v", "/var/run/docker.sock:/var/run/docker.sock",
        "-v", "k3d-registry-dockerd-cache:/var/cache/k3d-registry-dockerd",
        DEFAULT_IMAGE,
    ]  # fmt: skip
    assert "# docker network connect kind kind-registry\n" in text
    hosts = tomllib.loads((tmp_path / "certs.d" / "_default" / "hosts.toml").read_text())
    assert hosts == {"host": {"http://kind-registry:5000/v2": {"capabilities": ["pull", "resolve"]}}}


def _endpoint_host(config: dict[str, Any]) -> str:
    mirrors = yaml.safe_load(config["registries"]["config"])["mirrors"]
    return str(mirrors["*"]["endpoint"][0]).removeprefix("http://").rpartition(":")[0]


@pytest.mark.parametrize("name", ["k3d-registry", "myreg", "registry.localhost"])
def test_k3d_create_endpoint_is_the_container_k3d_makes(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """k3d names the container `registries.create.name` verbatim (k3d's pkg/config/transform.go)."""
    config = yaml.safe_load(_run(capsys, "k3d", "--name", name))
    assert config["registries"]["create"]["name"] == name
    assert _endpoint_host(config) == name


@pytest.mark.parametrize("name", ["cache", "k3d-cache"])
def test_k3d_shared_endpoint_is_the_container_k3d_makes(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """`k3d registry create NAME` names the container k3d-NAME (k3d's cmd/registry/registryCreate.go)."""
    text = _run(capsys, "k3d", "--shared", "--name", name)
    argument = re.search(r"# k3d registry create (\S+) ", text)
    assert argument is not None
    container = f"k3d-{argument[1]}"
    config = yaml.safe_load(text)
    assert container == "k3d-cache"
    assert [use.rpartition(":")[0] for use in config["registries"]["use"]] == [container]
    assert _endpoint_host(config) == container


def test_kind_hosts_dir_that_cannot_be_written(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["config", "kind", "--hosts-dir", str(blocker / "certs.d")]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"k3d-registry-dockerd: cannot write {blocker}/certs.d/_default/hosts.toml: ")
    assert error.rstrip().endswith("choose another --hosts-dir")
    assert len(error.splitlines()) == 1


# kubernetes/enhancements keps/sig-cluster-lifecycle/generic/1755-communicating-a-local-registry/README.md:
# LocalRegistryHostingV1's yaml tags, all strings; the ConfigMap's name, namespace and data key.
KEP_1755_FIELDS = {"host", "hostFromClusterNetwork", "hostFromContainerRuntime", "help"}


def _hosting(text: str) -> dict[str, Any]:
    configmap = yaml.safe_load(text)
    assert (configmap["apiVersion"], configmap["kind"]) == ("v1", "ConfigMap")
    assert configmap["metadata"] == {"name": "local-registry-hosting", "namespace": "kube-public"}
    assert list(configmap["data"]) == ["localRegistryHosting.v1"]
    hosting = yaml.safe_load(configmap["data"]["localRegistryHosting.v1"])
    assert set(hosting) == KEP_1755_FIELDS
    assert all(isinstance(value, str) for value in hosting.values())
    return dict(hosting)


def _hosting_command(text: str) -> list[str]:
    found = re.search(
        r"^#   k3d-registry-dockerd config (local-registry-hosting .*?) \| kubectl apply -f -$", text, re.M
    )
    assert found is not None
    return shlex.split(found[1])


def test_local_registry_hosting(capsys: pytest.CaptureFixture[str]) -> None:
    hosting = _hosting(_run(capsys, "local-registry-hosting"))
    assert hosting["host"] == "localhost:5000"
    assert hosting["hostFromContainerRuntime"] == hosting["hostFromClusterNetwork"] == "k3d-registry:5000"
    assert hosting["help"].startswith("https://") and hosting["help"].endswith("#tilt-ctlptl-and-skaffold")


@pytest.mark.parametrize("extra", [(), ("--name", "reg", "--port", "5055"), ("--shared", "--name", "cache")])
def test_local_registry_hosting_agrees_with_config_k3d(
    capsys: pytest.CaptureFixture[str], extra: tuple[str, ...]
) -> None:
    """The command `config k3d` names gives the host port it maps and the container its endpoint names
    (as k3d's pkg/client/registry.go writes them for a registry it uses)."""
    text = _run(capsys, "k3d", *extra)
    config = yaml.safe_load(text)
    hosting = _hosting(_run(capsys, *_hosting_command(text)))
    port = config["registries"]["create"]["hostPort"] if "create" in config["registries"] else None
    port = port or config["registries"]["use"][0].rpartition(":")[2]
    assert hosting["host"] == f"localhost:{port}"
    assert hosting["hostFromContainerRuntime"] == f"{_endpoint_host(config)}:5000"


# ctlptl's pkg/api/types.go (Cluster) and pkg/api/k3dv1alpha5/types.go (SimpleConfig's `registries`,
# SimpleConfigRegistries, SimpleConfigRegistryCreateConfig): their yaml tags, which ctlptl's
# pkg/encoding/encoding.go decodes with yaml.v3's KnownFields(true), so any other field is an error;
# tilt-dev/clusterid names the product "k3d"; pkg/cluster/admin_k3d.go wants names with the prefix k3d-.
CTLPTL_CLUSTER_FIELDS = {
    "kind", "apiVersion", "name", "product", "minCPUs", "registry", "registryAuths", "kubernetesVersion",
    "kindV1Alpha4Cluster", "kindExtraCreateArguments", "minikube", "k3d", "status",
}  # fmt: skip
K3D_REGISTRIES_FIELDS = {"use", "create", "config"}
K3D_CREATE_FIELDS = {"name", "host", "hostPort", "image", "proxy", "volumes"}


def test_ctlptl_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    text = _run(capsys, "ctlptl", "--image", "me/reg:1", "--port", "5055")
    assert "ctlptl's `kind: Registry` cannot run this registry" in text
    documents = list(yaml.safe_load_all(text))
    assert len(documents) == 1
    cluster = documents[0]
    assert (cluster["apiVersion"], cluster["kind"]) == ("ctlptl.dev/v1alpha1", "Cluster")
    assert set(cluster) <= CTLPTL_CLUSTER_FIELDS
    assert cluster["product"] == "k3d"
    assert cluster["name"].startswith("k3d-")
    # ctlptl would start a registry container of its own, without volumes.
    assert "registry" not in cluster
    assert set(cluster["k3d"]) == {"v1alpha5Simple"}
    assert set(cluster["k3d"]["v1alpha5Simple"]) == {"registries"}
    registries = cluster["k3d"]["v1alpha5Simple"]["registries"]
    assert set(registries) <= K3D_REGISTRIES_FIELDS
    create = registries["create"]
    assert set(create) <= K3D_CREATE_FIELDS
    assert all(isinstance(value, str) for key, value in create.items() if key != "volumes")
    assert (create["image"], create["hostPort"]) == ("me/reg:1", "5055")
    assert "/var/run/docker.sock:/var/run/docker.sock" in create["volumes"]
    # The same registry as `config k3d` creates, and the same mirror.
    k3d = yaml.safe_load(_run(capsys, "k3d", "--image", "me/reg:1", "--port", "5055"))["registries"]
    assert registries == k3d
