"""Who can change what: a push never re-points a tag the host's Docker already has, and with an htpasswd file
only its users push or delete, while clusters keep pulling anonymously.

The host's images are built in the registry's own dockerd; the conflicting pushes come from skopeo (an OCI
layout written here) and from `docker push` of a second dockerd, so their bytes exist nowhere the registry
could have read them from.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from . import oci_client
from .daemons import Containerd, Dockerd, RegistryFactory, RegistryProcess, free_port, run, wait_until
from .images import (
    MiB,
    build_image,
    push_image,
    skopeo,
    write_image_layout,
)
from .test_push import docker_image, push_layout, wait_loaded

PUSHER = ("pusher", "push-pw")


def refused_loads(registry: RegistryProcess) -> list[str]:
    return re.findall(r"not loading pushed (\S+) into Docker: Docker's own", registry.log_text())


def manifest_digest(registry: RegistryProcess, name: str, tag: str) -> str:
    answer = oci_client.request(
        f"{registry.url}/v2/{name}/manifests/{tag}", headers={"Accept": oci_client.MANIFEST_ACCEPT}
    )
    assert answer.status == 200, answer.body[:300]
    return str(answer.headers["docker-content-digest"])


@pytest.mark.parametrize(("name", "docker_name"), [("my-app", "my-app"), ("library/nginx", "nginx")])
def test_a_push_never_moves_a_tag_the_hosts_docker_has(
    docker: Dockerd,
    docker20: Dockerd,
    registry_under_test: RegistryFactory,
    tmp_path: Path,
    name: str,
    docker_name: str,
) -> None:
    own = build_image(docker, f"{docker_name}:dev", layers=1, size=1 * MiB, seed=f"own-{name}")
    registry = registry_under_test(docker)

    layout = write_image_layout(
        tmp_path / "layout", tag="dev", layer_sizes=(1 * MiB,), seed=f"intruder-{name}"
    )
    push_layout(layout, registry, name, "dev")
    wait_until(lambda: len(refused_loads(registry)) == 1, timeout=60, what="the refused load")
    assert docker.image_id(f"{docker_name}:dev") == own.image_id
    # The push itself landed: the registry serves it under that name.
    assert manifest_digest(registry, name, "dev") == layout.digest

    other = build_image(docker20, "intruder:2", layers=1, size=1 * MiB, seed=f"intruder-docker-{name}")
    pushed = push_image(docker20, other, registry.addr, name, "dev")
    wait_until(lambda: len(refused_loads(registry)) == 2, timeout=60, what="the second refused load")
    assert docker.image_id(f"{docker_name}:dev") == own.image_id
    assert manifest_digest(registry, name, "dev") == pushed.digest
    line = next(line for line in registry.log_text().splitlines() if "not loading pushed" in line)
    assert f"Docker's own {docker_name}:dev ({own.image_id}) stays as it is" in line
    assert "--allow-docker-overwrite" in line
    assert "loaded docker.io/" not in registry.log_text()


def test_a_new_name_is_loaded_and_follows_its_pushes_across_restarts(
    docker: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    registry = registry_under_test(docker)
    first = write_image_layout(tmp_path / "one", layer_sizes=(1 * MiB,), seed="tilt-1")
    push_layout(first, registry, "tilt-app", "dev")
    loaded = wait_loaded(docker, registry, "library/tilt-app:dev")
    assert loaded["Id"] == docker.id_of(manifest=first.digest, config=first.config_digest)
    assert "tilt-app:dev" in docker.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()

    # The tag is the registry's own now, on record: the next push moves it, a restart in between or not.
    registry.stop()
    registry.start()
    second = write_image_layout(tmp_path / "two", layer_sizes=(1 * MiB,), seed="tilt-2")
    push_layout(second, registry, "tilt-app", "dev")
    wait_until(
        lambda: (
            docker.image_id("tilt-app:dev")
            == docker.id_of(manifest=second.digest, config=second.config_digest)
        ),
        timeout=60,
        what="tilt-app:dev moved",
    )
    assert refused_loads(registry) == []


def test_allow_docker_overwrite(
    docker: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    own = build_image(docker, "overwritten:1", layers=1, size=1 * MiB, seed="overwritten")
    registry = registry_under_test(docker, env={"K3D_REGISTRY_DOCKERD_ALLOW_DOCKER_OVERWRITE": "true"})
    assert "pushes may replace Docker's own tags (env K3D_REGISTRY_DOCKERD_ALLOW_DOCKER_OVERWRITE)" in (
        registry.log_text()
    )
    push_layout(
        write_image_layout(tmp_path / "l", layer_sizes=(1 * MiB,), seed="over"), registry, "overwritten", "1"
    )
    assert wait_loaded(docker, registry, "library/overwritten:1")["Id"] != own.image_id


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text(run(["htpasswd", "-nbB", *PUSHER]).stdout.strip() + "\n")
    return path


def test_htpasswd_guards_pushes_and_deletes_not_pulls(
    docker: Dockerd,
    docker20: Dockerd,
    node: Containerd,
    registry_under_test: RegistryFactory,
    htpasswd: Path,
    tmp_path: Path,
) -> None:
    # Only this dockerd has it: a node that got it can only have got it through the registry.
    build_image(docker, "guarded-local:1", layers=2, size=2 * MiB, seed="guarded-local")
    env = {
        "REGISTRY_AUTH": "htpasswd",
        "REGISTRY_AUTH_HTPASSWD_REALM": "dev pushes",
        "REGISTRY_AUTH_HTPASSWD_PATH": str(htpasswd),
    }
    port = free_port()
    registry = registry_under_test(docker, env=env, port=port, extra_args=["--addr", f"0.0.0.0:{port}"])
    assert "pushes and deletes need credentials: 1 users in" in registry.log_text()
    assert "anyone who can reach" not in registry.log_text()

    # Anonymous and wrong credentials: a Basic challenge, never a 5xx.
    for headers in ({}, {"Authorization": "Basic " + _b64("pusher:wrong")}):
        answer = oci_client.request(
            f"{registry.url}/v2/guarded/blobs/uploads/", method="POST", headers=headers
        )
        assert answer.status == 401
        assert answer.headers["www-authenticate"] == 'Basic realm="dev pushes"'
        assert answer.json()["errors"][0]["code"] == "UNAUTHORIZED"
    layout = write_image_layout(tmp_path / "layout", layer_sizes=(1 * MiB,), seed="guarded")
    anonymous = run(
        [
            "skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
            f"oci:{layout.layout}:{layout.tag}", f"docker://{registry.addr}/guarded:1",
        ],
        check=False,
    )  # fmt: skip
    assert anonymous.returncode != 0 and "unauthorized" in anonymous.stderr.lower()
    built = build_image(docker20, "guarded-push:1", layers=1, size=1 * MiB, seed="guarded-push")
    docker20.docker("tag", built.ref, f"{registry.addr}/guarded/docker:1")
    refused = docker20.docker("push", f"{registry.addr}/guarded/docker:1", check=False)
    assert refused.returncode != 0
    assert oci_client.request(f"{registry.url}/v2/guarded/manifests/1").status == 404

    # With credentials: skopeo and docker push land.
    skopeo(
        "copy", "--dest-tls-verify=false", "--dest-creds", ":".join(PUSHER),
        f"oci:{layout.layout}:{layout.tag}", f"docker://{registry.addr}/guarded:1",
    )  # fmt: skip
    assert manifest_digest(registry, "guarded", "1") == layout.digest
    pushed = push_image(docker20, built, registry.addr, "guarded/docker", "1", credentials=PUSHER)
    assert manifest_digest(registry, "guarded/docker", "1") == pushed.digest
    wait_loaded(docker, registry, "library/guarded:1")

    # A cluster pulls anonymously: an image only dockerd has, and the pushed one.
    node.set_mirror(registry.addr)
    for ref in ("docker.io/library/guarded-local:1", f"{registry.addr}/guarded:1"):
        pulled = node.pull(ref)
        assert pulled.returncode == 0, pulled.stderr
    containerd_lines = [line for line in registry.log_text().splitlines() if '"containerd/' in line]
    assert any(
        '/v2/library/guarded-local/manifests/1?ns=docker.io HTTP/1.1" 200' in line
        for line in containerd_lines
    )
    assert not any('"GET /v2/ ' in line or " 401 " in line for line in containerd_lines)

    # Deletes need credentials too.
    delete = f"{registry.url}/v2/guarded/manifests/1"
    assert oci_client.request(delete, method="DELETE").status == 401
    good = {"Authorization": "Basic " + _b64(":".join(PUSHER))}
    assert oci_client.request(delete, method="DELETE", headers=good).status == 202
    assert docker_image(docker, "guarded:1") is None


def test_an_open_registry_says_so_at_start(docker: Dockerd, registry_under_test: RegistryFactory) -> None:
    port = free_port()
    everyone = registry_under_test(docker, port=port, extra_args=["--addr", f"0.0.0.0:{port}"])
    (line,) = [line for line in everyone.log_text().splitlines() if "anyone who can reach" in line]
    assert " WARNING " in line
    assert "REGISTRY_AUTH_HTPASSWD_PATH" in line and "htpasswd -Bc FILE USER" in line
    loopback = registry_under_test(docker)
    assert "anyone who can reach" not in loopback.log_text()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
