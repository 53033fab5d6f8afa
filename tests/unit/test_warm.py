"""`warm`: image references as Docker reads them, the images of Kubernetes YAML, and warming against the
registry's own HTTP API (a real Mirror and store, a fake Docker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from k3d_registry_dockerd import warm, workloads
from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.cli import main
from k3d_registry_dockerd.oci.errors import RegistryError
from k3d_registry_dockerd.web.app import create_app
from k3d_registry_dockerd.web.assembly import assemble

from .fakes import FakeDocker, local_image

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("image", "ns", "name", "reference"),
    [
        ("nginx", "docker.io", "library/nginx", "latest"),
        ("nginx:1.27", "docker.io", "library/nginx", "1.27"),
        ("bitnami/redis:7", "docker.io", "bitnami/redis", "7"),
        ("ghcr.io/team/app:dev", "ghcr.io", "team/app", "dev"),
        ("localhost:5001/app", "localhost:5001", "app", "latest"),
        (f"quay.io/a/b:1@{DIGEST}", "quay.io", "a/b", DIGEST),
        (f"registry.k8s.io/pause@{DIGEST}", "registry.k8s.io", "pause", DIGEST),
    ],
)
def test_targets_read_references_as_docker_does(image: str, ns: str, name: str, reference: str) -> None:
    assert warm.target(image) == warm.Target(image, ns, name, reference)


@pytest.mark.parametrize("image", ["UPPER/case", "a:b:c", "nginx@sha256:short", "nginx:bad tag"])
def test_references_no_registry_could_hold(image: str) -> None:
    with pytest.raises(RegistryError):
        warm.target(image)


MANIFESTS = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      initContainers: [{name: init, image: busybox:1.36}]
      containers:
        - {name: web, image: nginx:1.27}
        - {name: sidecar, image: "ghcr.io/team/proxy:2"}
---
# a comment-only document, and an empty one
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{name: job, image: nginx:1.27}]
---
apiVersion: v1
kind: List
items:
  - {apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: [{name: c, image: redis:7}],
     ephemeralContainers: [{name: debug, image: "busybox:1.36"}]}}
  - {apiVersion: apps/v1, kind: StatefulSet, metadata: {name: db},
     spec: {template: {spec: {containers: [{name: db, image: postgres:16}]}}}}
  - {apiVersion: apps/v1, kind: DaemonSet, metadata: {name: agent},
     spec: {template: {spec: {containers: [{name: a, image: "agent@sha256:%s"}]}}}}
  - {apiVersion: batch/v1, kind: Job, metadata: {name: once},
     spec: {template: {spec: {containers: [{name: o, image: job:1}]}}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: not-a-workload}
data: {image: "not/an:image"}
""" % ("b" * 64)


def test_images_of_kubernetes_yaml() -> None:
    assert workloads.images([MANIFESTS]) == [
        "busybox:1.36",
        "nginx:1.27",
        "ghcr.io/team/proxy:2",
        "redis:7",
        "postgres:16",
        f"agent@sha256:{'b' * 64}",
        "job:1",
    ]


def test_yaml_that_is_not_yaml() -> None:
    with pytest.raises(workloads.WorkloadError, match="not YAML"):
        workloads.images(["kind: [unclosed"])


async def test_warming_through_the_registry(aiohttp_server: Any, store: Store) -> None:
    docker = FakeDocker()
    docker.images["docker.io/library/alpine:latest"] = local_image(
        "warm-local", "docker.io/library/alpine:latest"
    )
    docker.upstream["ghcr.io/team/app:1"] = local_image("warm-pulled", "ghcr.io/team/app:1")
    server = await aiohttp_server(create_app(assemble(store, docker)))
    seen: list[warm.Outcome] = []
    outcomes = await warm.warm(
        ["alpine", "ghcr.io/team/app:1", "ghcr.io/team/gone:1", "Not A Ref"],
        registry=str(server.make_url("")),
        report=seen.append,
    )
    assert [o.problem is None for o in outcomes] == [True, True, False, False]
    assert outcomes[1].digest is not None and outcomes[1].digest.startswith("sha256:")
    assert outcomes[2].problem is not None and outcomes[2].problem.startswith("404: ")
    assert outcomes[3].problem is not None and "not an image reference" in outcomes[3].problem
    assert len(seen) == 4
    assert docker.pulls == [("ghcr.io/team/app:1", None), ("ghcr.io/team/gone:1", None)]
    assert sorted(docker.saves) == ["docker.io/library/alpine:latest", "ghcr.io/team/app:1"]


def test_warm_reads_a_directory_of_yaml(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(MANIFESTS)
    (tmp_path / "notes.txt").write_text("kind: [not read")
    assert main(["warm", "--registry", "http://127.0.0.1:9", "-f", str(tmp_path)]) == 1
    assert "cannot reach the registry" in capsys.readouterr().err


def test_warm_command_says_what_is_wrong(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["warm"]) == 2
    assert "no images to warm" in capsys.readouterr().err
    assert main(["warm", "-f", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["warm", "--registry", "http://127.0.0.1:9", "nginx"]) == 1
    assert "cannot reach the registry at http://127.0.0.1:9" in capsys.readouterr().err
