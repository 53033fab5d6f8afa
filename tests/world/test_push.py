"""Pushing into the registry's own namespace with real clients: skopeo, docker push, containerd.

Every image pushed here is made by the test (an OCI layout written in Python, or a build in a *different*
dockerd than the registry's), so it exists nowhere the registry could have read it from: what a client
gets back can only have come through the push. The registry's access log shows the requests too.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from . import oci_client
from .daemons import Containerd, Dockerd, RegistryFactory, RegistryProcess, wait_until
from .images import (
    OCI_MANIFEST,
    LayoutImage,
    MiB,
    build_image,
    host_platform,
    inspect_raw,
    push_image,
    push_multiplatform,
    seeded_bytes,
    skopeo,
    write_image_layout,
)

ACCEPT = {"Accept": oci_client.MANIFEST_ACCEPT}
FOREIGN = {"linux/amd64": "linux/arm64"}.get(host_platform(), "linux/amd64")
"""A platform other than the daemons' own."""
RSS_LIMIT_MIB = 200


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def docker_image(daemon: Dockerd, ref: str) -> dict[str, Any] | None:
    """`GET /images/{ref}/json` from the daemon's Engine API; None when it has no such image."""
    status, body = daemon.api("GET", f"/images/{ref}/json")
    if status == 404:
        return None
    assert status == 200, body
    found: dict[str, Any] = json.loads(body)
    return found


def wait_loaded(daemon: Dockerd, registry: RegistryProcess, ref: str, timeout: float = 60) -> dict[str, Any]:
    """Polls until the registry's background load of ``ref`` (a Docker Hub name) has finished; the
    daemon's image then."""
    done = f"loaded docker.io/{ref} into Docker as "
    try:
        wait_until(
            lambda: done in registry.log_text(), timeout=timeout, what=f"{ref} loaded into {daemon.name}"
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n--- registry log ---\n{registry.log_text()[-4000:]}") from exc
    image = docker_image(daemon, ref)
    assert image is not None, f"the registry loaded {ref}, but {daemon.name} has no such image"
    return image


def access_log(registry: RegistryProcess, method: str, path: str) -> list[tuple[str, int]]:
    """(request target, status) of the requests with this method whose path matches the regex ``path``."""
    found = []
    for line in registry.log_text().splitlines():
        match = re.search(rf'"{method} ({path}) HTTP/1\.1" (\d{{3}}) ', line)
        if match:
            found.append((match.group(1), int(match.group(2))))
    return found


def assert_in(item: object, container: list[Any]) -> None:
    assert item in container, f"{item!r} not in {container!r}"


def eventually(check: Callable[[], None], timeout: float = 10.0) -> None:
    """Retries an assertion for a while: aiohttp writes a request's access-log line after the client has
    its answer, so a line can trail the client's return by a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def push_layout(image: LayoutImage, registry: RegistryProcess, repository: str, tag: str) -> str:
    """``skopeo copy --preserve-digests`` of the layout (it fails rather than change a digest)."""
    target = f"{registry.addr}/{repository}:{tag}"
    skopeo(
        "copy", "--preserve-digests", "--dest-tls-verify=false",
        f"oci:{image.layout}:{image.tag}", f"docker://{target}",
    )  # fmt: skip
    return target


def layout_blobs(layout: Path) -> dict[str, int]:
    """Every blob in an OCI layout (digest -> size), each checked to hash to its name."""
    found = {}
    for path in (layout / "blobs" / "sha256").iterdir():
        hasher = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(8 * MiB):
                hasher.update(chunk)
        assert hasher.hexdigest() == path.name, f"{path} does not hash to its name"
        found[f"sha256:{path.name}"] = path.stat().st_size
    return found


def layout_root(layout: Path) -> str:
    """Digest of the one manifest (or index) an OCI layout's index.json names."""
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    return str(entry["digest"])


@pytest.mark.parametrize(
    "variant", ["docker26", "docker26_containerd", "docker28", "docker28_containerd", "docker20"]
)
def test_skopeo_push_and_copy_back_are_byte_exact_and_docker_runs_it(
    variant: str, request: pytest.FixtureRequest, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    daemon: Dockerd = request.getfixturevalue(variant)
    image = write_image_layout(
        tmp_path / "src", tag="v1", layer_sizes=(2 * MiB, 3 * MiB, 4 * MiB), seed=f"skopeo-push-{variant}"
    )
    registry = registry_under_test(daemon)
    assert docker_image(daemon, "team/app:v1") is None

    target = push_layout(image, registry, "team/app", "v1")

    raw = inspect_raw(target)
    assert raw == image.blob(image.digest)
    assert sha256_of(raw) == image.digest

    def pushed_here() -> None:
        """Every blob came by an upload the registry finished (PUT …?digest= → 201), the manifest by PUT."""
        uploaded = {
            urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)["digest"][0]
            for path, status in access_log(registry, "PUT", r"/v2/team/app/blobs/uploads/\S+")
            if status == 201
        }
        assert set(image.blob_digests) <= uploaded
        assert ("/v2/team/app/manifests/v1", 201) in access_log(registry, "PUT", r"/v2/team/app/manifests/v1")

    eventually(pushed_here)
    assert json.loads(skopeo("list-tags", "--tls-verify=false", f"docker://{registry.addr}/team/app")) == {
        "Repository": f"{registry.addr}/team/app",
        "Tags": ["v1"],
    }

    out = tmp_path / "out"
    skopeo(
        "copy", "--preserve-digests", "--src-tls-verify=false", f"docker://{target}", f"oci:{out}:v1"
    )  # fmt: skip
    assert layout_root(out) == image.digest
    copied = layout_blobs(out)
    assert {image.digest, *image.blob_digests} <= set(copied)
    assert [copied[d] for d in image.layer_digests] == list(image.layer_sizes)

    # The registry loads the push into its dockerd in the background, under the pushed name.
    loaded = wait_loaded(daemon, registry, "team/app:v1")
    # The containerd image store names an image by its manifest, the others by its config.
    assert loaded["Id"] == daemon.id_of(manifest=image.digest, config=image.config_digest)
    assert loaded["RootFS"]["Layers"] == list(image.diff_ids)
    assert "team/app:v1" in loaded["RepoTags"]
    assert "team/app:v1" in daemon.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert daemon.docker("run", "--rm", "team/app:v1").stdout == f"hello from skopeo-push-{variant}\n"
    data = daemon.docker("run", "--rm", "team/app:v1", "/bin/busybox", "sha256sum", "/data/layer-002.bin")
    expected = hashlib.sha256(seeded_bytes(f"skopeo-push-{variant}/2", 4 * MiB)).hexdigest()
    assert data.stdout.split()[0] == expected
    # Docker now has an image of that name; the pushed manifest still wins, byte for byte.
    assert inspect_raw(target) == raw
    daemon.docker("rmi", "team/app:v1")


def test_skopeo_push_of_an_index_keeps_every_digest_and_loads_the_host_platform(
    docker: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    host = host_platform()
    registry = registry_under_test(docker)
    multi = push_multiplatform(
        registry.addr,
        "team/multi",
        "1",
        platforms=(FOREIGN, host),
        seed="push-index",
        layout=tmp_path / "src",
    )
    assert multi.ref is not None

    assert sha256_of(inspect_raw(multi.ref)) == multi.index_digest
    for child in multi.manifests.values():
        assert sha256_of(inspect_raw(f"{registry.addr}/team/multi@{child.digest}")) == child.digest
    out = tmp_path / "out"
    skopeo(
        "copy", "--all", "--preserve-digests", "--src-tls-verify=false",
        f"docker://{multi.ref}", f"oci:{out}:1",
    )  # fmt: skip
    assert layout_root(out) == multi.index_digest
    copied = layout_blobs(out)
    for child in multi.manifests.values():
        assert {child.digest, child.config_digest, *child.layer_digests} <= set(copied)
        assert copied[child.digest] == child.size

    # Docker gets the child of its own platform; the foreign one is not loaded, and not complained about.
    loaded = wait_loaded(docker, registry, "team/multi:1")
    assert loaded["Id"] == docker.id_of(
        manifest=multi.manifests[host].digest, config=multi.manifests[host].config_digest
    )
    assert f"{loaded['Os']}/{loaded['Architecture']}" == host
    foreign = multi.manifests[FOREIGN]
    assert docker_image(docker, docker.id_of(manifest=foreign.digest, config=foreign.config_digest)) is None
    assert "not loading docker.io/team/multi:1" not in registry.log_text()
    assert sha256_of(inspect_raw(multi.ref)) == multi.index_digest

    # A push that is all foreign is kept and served, and only logged as not loaded.
    foreign = push_multiplatform(
        registry.addr, "team/foreign", "1", platforms=(FOREIGN,), seed="push-foreign", layout=tmp_path / "f"
    )
    assert foreign.ref is not None
    wait_until(
        lambda: (
            "not loading docker.io/team/foreign:1 into Docker: the index has no image for"
            in registry.log_text()
        ),
        timeout=30,
        what="the registry to skip loading the foreign index",
    )
    assert sha256_of(inspect_raw(foreign.ref)) == foreign.index_digest
    single = write_image_layout(tmp_path / "single", tag="1", seed="push-foreign-single", platform=FOREIGN)
    push_layout(single, registry, "team/foreign-single", "1")
    wait_until(
        lambda: (
            f"not loading docker.io/team/foreign-single:1 into Docker: a foreign platform {FOREIGN}"
            in registry.log_text()
        ),
        timeout=30,
        what="the registry to skip loading the foreign image",
    )
    assert docker_image(docker, "team/foreign:1") is None
    assert docker_image(docker, "team/foreign-single:1") is None
    docker.docker("rmi", "team/multi:1")


def test_docker_push_from_another_dockerd_and_pull_back(
    docker: Dockerd, docker20: Dockerd, docker26_containerd: Dockerd, registry_under_test: RegistryFactory
) -> None:
    built = build_image(docker20, "docker-push-src:1", layers=3, size=6 * MiB, seed="docker-push")
    registry = registry_under_test(docker)

    pushed = push_image(docker20, built, registry.addr, "pushed/app", "1")

    assert sha256_of(inspect_raw(pushed.ref)) == pushed.digest
    eventually(
        lambda: assert_in(
            ("/v2/pushed/app/manifests/1", 201), access_log(registry, "PUT", r"/v2/pushed/app/\S+")
        )
    )
    # A second repository: Docker mounts the blobs it pushed before instead of uploading them again.
    copy = push_image(docker20, built, registry.addr, "pushed/copy", "1")
    assert copy.digest == pushed.digest

    def mounted() -> None:
        mounts = access_log(registry, "POST", r"/v2/pushed/copy/blobs/uploads/\?\S*mount=\S+")
        assert len(mounts) == len(built.layer_seeds) + 1  # every layer; Docker uploads the config
        assert {status for _, status in mounts} == {201}

    eventually(mounted)

    # The registry's dockerd got it as pushed/app:1, the same image ID (config) as the pushing daemon's.
    loaded = wait_loaded(docker, registry, "pushed/app:1")
    assert loaded["Id"] == docker.id_of(manifest=pushed.digest, config=built.image_id)
    expected = hashlib.sha256(seeded_bytes("docker-push/1", built.layer_sizes[1])).hexdigest()
    summed = docker.docker("run", "--rm", "pushed/app:1", "/bin/busybox", "sha256sum", "/data/layer-001.bin")
    assert summed.stdout.split()[0] == expected

    # A third daemon pulls it from us (only docker20 and our registry ever had it): same digest.
    docker26_containerd.docker("pull", pushed.ref)
    pulled = docker_image(docker26_containerd, pushed.ref)
    assert pulled is not None
    assert f"{pushed.registry}/pushed/app@{pushed.digest}" in pulled["RepoDigests"]
    # And the pushing daemon, after forgetting it.
    docker20.docker("rmi", "--force", built.image_id)
    assert docker_image(docker20, built.image_id) is None
    docker20.docker("pull", pushed.ref)
    again = docker_image(docker20, pushed.ref)
    assert again is not None
    assert again["Id"] == built.image_id
    assert f"{pushed.registry}/pushed/app@{pushed.digest}" in again["RepoDigests"]
    for daemon, ref in (
        (docker, "pushed/app:1"),
        (docker, "pushed/copy:1"),
        (docker26_containerd, pushed.ref),
        (docker20, pushed.ref),
    ):
        daemon.docker("rmi", ref, check=False)


@pytest.mark.parametrize("via", ["mirror", "direct"])
def test_containerd_pulls_a_pushed_image(
    via: str, docker: Dockerd, node: Containerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    image = write_image_layout(
        tmp_path / "src", tag="1", layer_sizes=(1 * MiB, 2 * MiB, 1 * MiB), seed=f"ctr-{via}"
    )
    registry = registry_under_test(docker, extra_args=["--no-load-pushed"])
    ref = push_layout(image, registry, "pushed/ctr", "1")

    if via == "mirror":
        # What k3s writes for `mirrors: "*"`: an image naming the registry's own host is asked for
        # without ns (containerd adds it only for other hosts), i.e. in the registry's own namespace.
        node.set_mirror(registry.addr)
        result = node.pull(ref)
    else:
        # No hosts.toml: ctr talks to the image's own host, plain HTTP.
        result = node.ctr(
            "images", "pull", "--local", "--hosts-dir", str(node.hosts_dir), "--plain-http", ref, check=False
        )
    assert result.returncode == 0, f"ctr pull {ref} failed:\n{result.stdout}\n{result.stderr}"

    listed = node.ctr("images", "ls").stdout
    assert re.search(rf"^{re.escape(ref)} .*{image.digest}", listed, re.M), listed
    assert set(image.blob_digests) | {image.digest} <= set(node.content())

    def served_here() -> None:
        served = {
            m.group(1)
            for path, status in access_log(registry, "GET", r"/v2/pushed/ctr/blobs/sha256:[0-9a-f]{64}\S*")
            if status == 200 and (m := re.search(r"(sha256:[0-9a-f]{64})", path))
        }
        assert set(image.layer_digests) <= served

    eventually(served_here)
    assert not [p for p, _ in access_log(registry, "GET", r"/v2/pushed/ctr/\S+") if "ns=" in p]


def test_no_load_pushed_leaves_docker_alone(
    docker: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    image = write_image_layout(
        tmp_path / "src", tag="1", layer_sizes=(1 * MiB, 1 * MiB, 1 * MiB), seed="no-load"
    )
    since = str(int(time.time()) - 1)
    registry = registry_under_test(docker, extra_args=["--no-load-pushed"])
    assert "pushed images are not loaded into Docker (flag --no-load-pushed)" in registry.log_text()

    ref = push_layout(image, registry, "team/no-load", "1")

    assert sha256_of(inspect_raw(ref)) == image.digest
    pulled = oci_client.pull(registry.url, "team/no-load", "1")
    assert pulled.digest == image.digest
    assert docker_image(docker, "team/no-load:1") is None
    assert docker_image(docker, docker.id_of(manifest=image.digest, config=image.config_digest)) is None
    assert "team/no-load" not in docker.docker("images", "--format", "{{.Repository}}").stdout
    assert "loading" not in registry.log_text().replace("not loaded", "")
    events = docker.docker(
        "events", "--since", since, "--until", str(int(time.time()) + 1), "--filter", "type=image",
        "--format", "{{.Action}} {{.Actor.ID}}",
    ).stdout  # fmt: skip
    assert f"load {docker.id_of(manifest=image.digest, config=image.config_digest)}" not in events, events


def test_delete_removes_what_a_push_loaded_but_not_dockers_own_images(
    docker: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    image = write_image_layout(
        tmp_path / "one", tag="1", layer_sizes=(1 * MiB, 1 * MiB, 1 * MiB), seed="delete-1"
    )
    second = write_image_layout(
        tmp_path / "two", tag="2", layer_sizes=(1 * MiB, 1 * MiB, 1 * MiB), seed="delete-2"
    )
    own = build_image(docker, "docker-own:1", layers=1, size=1 * MiB, seed="docker-own")
    registry = registry_under_test(docker)
    push_layout(image, registry, "team/del", "1")
    push_layout(second, registry, "team/del", "2")
    wait_loaded(docker, registry, "team/del:1")
    wait_loaded(docker, registry, "team/del:2")

    # DELETE of a pushed tag: the tag goes, and so does the image the push loaded into Docker.
    deleted = oci_client.request(f"{registry.url}/v2/team/del/manifests/1", method="DELETE")
    assert deleted.status == 202, deleted.body
    assert docker_image(docker, "team/del:1") is None
    assert "removed docker.io/team/del:1 from Docker" in registry.log_text()
    assert oci_client.request(f"{registry.url}/v2/team/del/manifests/1", headers=ACCEPT).status == 404
    # skopeo delete resolves the tag and deletes by digest: the manifest, and its tag in Docker. The
    # uploaded blobs stay until deleted themselves (as in distribution); then their files go too.
    skopeo("delete", "--tls-verify=false", f"docker://{registry.addr}/team/del:2")
    eventually(
        lambda: assert_in(
            (f"/v2/team/del/manifests/{second.digest}", 202),
            access_log(registry, "DELETE", r"/v2/team/del/manifests/\S+"),
        )
    )
    assert docker_image(docker, "team/del:2") is None
    gone = oci_client.request(f"{registry.url}/v2/team/del/manifests/{second.digest}", headers=ACCEPT)
    assert gone.status == 404
    assert oci_client.request(f"{registry.url}/v2/team/del/manifests/2", headers=ACCEPT).status == 404
    layer_url = f"{registry.url}/v2/team/del/blobs/{second.layer_digests[-1]}"
    assert oci_client.request(layer_url, method="HEAD").status == 200
    assert oci_client.request(layer_url, method="DELETE").status == 202
    assert oci_client.request(layer_url, method="HEAD").status == 404
    layer_hex = second.layer_digests[-1].removeprefix("sha256:")
    assert not (registry.cache_dir / "blobs" / "sha256" / layer_hex[:2] / layer_hex).exists()

    # Docker's own image: not the registry's to delete, by tag or by digest.
    served = oci_client.pull(registry.url, "docker-own", "1")
    for reference in ("1", served.digest):
        refused = oci_client.request(f"{registry.url}/v2/docker-own/manifests/{reference}", method="DELETE")
        assert refused.status == 405, (reference, refused.body)
        assert refused.json()["errors"][0]["code"] == "UNSUPPORTED"
        assert docker.image_id(own.ref) == own.image_id
    assert oci_client.pull(registry.url, "docker-own", "1").digest == served.digest

    # Unless the operator allows it.
    allowing = registry_under_test(docker, extra_args=["--allow-docker-delete"])
    assert oci_client.request(f"{allowing.url}/v2/docker-own/manifests/1", method="DELETE").status == 202
    assert docker_image(docker, own.ref) is None


def send(url: str, method: str, body: bytes, headers: dict[str, str] | None = None) -> oci_client.Response:
    """A request with a body (oci_client.request sends none); errors come back as a Response."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return oci_client.Response(
                resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
            )
    except urllib.error.HTTPError as err:
        return oci_client.Response(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


def test_an_artifact_is_kept_and_referred_to_but_not_loaded(
    docker: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    """A signature-like artifact (empty config, subject) as oras or cosign push it: monolithic and
    chunked uploads, a manifest PUT by tag, then the referrers API; Docker gets nothing of it."""
    image = write_image_layout(tmp_path / "src", tag="1", layer_sizes=(1 * MiB,), seed="artifact-subject")
    registry = registry_under_test(docker)
    push_layout(image, registry, "team/signed", "1")
    base = f"{registry.url}/v2/team/signed"

    empty = b"{}"
    monolithic = send(f"{base}/blobs/uploads/?digest={sha256_of(empty)}", "POST", empty)
    assert monolithic.status == 201, monolithic.body
    payload = b"a signature payload, uploaded in two chunks"
    started = send(f"{base}/blobs/uploads/", "POST", b"")
    assert started.status == 202
    location = f"{registry.url}{started.headers['location']}"
    for start, end in ((0, 9), (10, len(payload) - 1)):
        chunk = send(location, "PATCH", payload[start : end + 1], {"Content-Range": f"{start}-{end}"})
        assert chunk.status == 202, chunk.body
        assert chunk.headers["range"] == f"0-{end}"
    assert send(f"{location}?digest={sha256_of(payload)}", "PUT", b"").status == 201
    subject = image.blob(image.digest)
    artifact = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.k3rd.signature",
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": sha256_of(empty),
                "size": 2,
            },
            "layers": [
                {"mediaType": "application/vnd.k3rd.sig", "digest": sha256_of(payload), "size": len(payload)}
            ],
            "subject": {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(subject)},
        }
    ).encode()
    put = send(f"{base}/manifests/sig", "PUT", artifact, {"Content-Type": OCI_MANIFEST})
    assert put.status == 201, put.body
    assert put.headers["docker-content-digest"] == sha256_of(artifact)
    assert put.headers["oci-subject"] == image.digest

    referrers = oci_client.request(f"{base}/referrers/{image.digest}")
    assert referrers.status == 200
    assert [(m["digest"], m["artifactType"]) for m in referrers.json()["manifests"]] == [
        (sha256_of(artifact), "application/vnd.k3rd.signature")
    ]
    assert oci_client.request(f"{base}/manifests/sig", headers=ACCEPT).body == artifact
    wait_until(
        lambda: (
            "not loading docker.io/team/signed:sig into Docker: not a container image" in registry.log_text()
        ),
        timeout=30,
        what="the registry to skip loading the artifact",
    )
    assert docker_image(docker, "team/signed:sig") is None
    assert wait_loaded(docker, registry, "team/signed:1")["Id"] == docker.id_of(
        manifest=image.digest, config=image.config_digest
    )
    docker.docker("rmi", "team/signed:1")


def test_deleting_a_blob_a_pushed_manifest_uses_is_refused(
    docker: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    image = write_image_layout(tmp_path / "src", tag="1", layer_sizes=(1 * MiB,), seed="blob-in-use")
    registry = registry_under_test(docker, extra_args=["--no-load-pushed"])
    push_layout(image, registry, "team/in-use", "1")
    layer_url = f"{registry.url}/v2/team/in-use/blobs/{image.layer_digests[-1]}"

    refused = oci_client.request(layer_url, method="DELETE")
    assert refused.status == 405, refused.status
    assert "delete that first" in refused.json()["errors"][0]["message"]
    assert oci_client.request(layer_url, method="HEAD").status == 200
    manifest_url = f"{registry.url}/v2/team/in-use/manifests/{image.digest}"
    assert oci_client.request(manifest_url, method="DELETE").status == 202
    assert oci_client.request(layer_url, method="DELETE").status == 202
    assert oci_client.request(layer_url, method="HEAD").status == 404


def _rss_mib(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every ``interval`` seconds until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[float] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append(_rss_mib(self.pid))
            self._stop_event.wait(self.interval)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return max(self.samples)


def test_large_push_keeps_the_registry_small(
    docker: Dockerd, registry_under_test: RegistryFactory, tmp_path: Path
) -> None:
    began = time.monotonic()
    image = write_image_layout(
        tmp_path / "big",
        tag="1",
        layer_sizes=(200 * MiB, 170 * MiB, 150 * MiB),
        seed="large-push",
        compress=False,
    )
    generated = time.monotonic()
    assert image.bytes >= 500 * MiB
    registry = registry_under_test(docker)
    pid = registry.pid
    assert pid is not None
    baseline = _rss_mib(pid)
    sampler = RssSampler(pid)
    sampler.start()
    try:
        ref = push_layout(image, registry, "team/large", "1")
        pushed = time.monotonic()
        loaded = wait_loaded(docker, registry, "team/large:1", timeout=300)
        done = time.monotonic()
    finally:
        peak = sampler.stop()
    high_water = _rss_mib(pid, "VmHWM")
    print(
        f"\n[large push] {image.bytes / MiB:.0f} MiB in {len(image.layer_digests)} layers: "
        f"layout {generated - began:.1f}s, skopeo push {pushed - generated:.1f}s, "
        f"load into Docker {done - pushed:.1f}s; registry RSS baseline {baseline:.1f} MiB, "
        f"peak sampled {peak:.1f} MiB ({len(sampler.samples)} samples), VmHWM {high_water:.1f} MiB"
    )
    assert loaded["RootFS"]["Layers"] == list(image.diff_ids)
    assert sha256_of(inspect_raw(ref)) == image.digest
    assert peak < RSS_LIMIT_MIB
    assert high_water < RSS_LIMIT_MIB
    docker.docker("rmi", "team/large:1")
