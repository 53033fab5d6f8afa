"""kubelet's path: containerd's CRI plugin (1.7 and 2.1) pulling through the registry with `config_path`.

Each pull here is ``PullImage`` over the CRI socket, as kubelet sends it for a pod's image (with an
imagePullSecret as an AuthConfig of username and password, no server address). containerd falls back to the
image's own registry when the mirror fails, so every pull that works is proven to have come through the
registry under test: an image only dockerd has (docker.io is unreachable here), the registry's access log
(blobs served to containerd), Docker's event stream (the export), and for upstream images the upstream's
access log (fetched by `docker/…`, never by `containerd/…`).
"""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path

import pytest

from . import oci_client
from .cri import CriError, CriNode, CriNodeFactory, pull_seconds
from .daemons import (
    NO_ZERO_COPY,
    Dockerd,
    RegistryFactory,
    RegistryProcess,
    UpstreamRegistry,
    wait_until,
)
from .docker_proxy import DockerProxy
from .images import BuiltImage, MiB, build_image, push_image
from .relay import ThrottledRelay
from .test_mirror import exports, node_name, served_blobs

_ACCESS = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/1\.1" (?P<status>\d{3}) (?P<bytes>\d+) (?P<seconds>[0-9.]+)s '
    r'"(?P<agent>[^"]*)"'
)


def node_requests(
    registry: RegistryProcess, path_part: str, agent: str = "containerd/"
) -> list[re.Match[str]]:
    """The registry's access-log entries for requests whose path contains ``path_part``, from ``agent``."""
    found = []
    for line in registry.log_text().splitlines():
        match = _ACCESS.search(line)
        if match and path_part in match["path"] and match["agent"].startswith(agent):
            found.append(match)
    return found


def logged_requests(registry: RegistryProcess, path_part: str, count: int) -> list[re.Match[str]]:
    """``node_requests``, once at least ``count`` are logged: aiohttp writes an access-log line just after
    the response, so a client (or a test) can be a moment ahead of it."""
    return wait_until(
        lambda: (found := node_requests(registry, path_part)) and len(found) >= count and found,
        timeout=30,
        what=f"{count} requests for {path_part} in the registry's access log",
    )


def upstream_requests(upstream: UpstreamRegistry, mark: int, repository: str) -> list[tuple[str, str]]:
    """(status, user agent) of each request for ``repository`` in the upstream's access log since ``mark``."""
    return [
        (str(r.status), r.agent) for r in upstream.requests(mark) if r.path.startswith(f"/v2/{repository}/")
    ]


def assert_fetched_by_docker_only(upstream: UpstreamRegistry, mark: int, repository: str) -> None:
    """The upstream served ``repository`` since ``mark``, and only to dockerd: no node went around us."""
    requests = upstream_requests(upstream, mark, repository)
    assert any(status == "200" for status, _ in requests), requests
    assert all(agent.startswith("docker/") for _, agent in requests), requests


def config_digest(pulled: oci_client.Pulled) -> str:
    """The image config's digest (what CRI calls the image ID): the first blob oci_client.pull fetched."""
    return next(iter(pulled.blobs))


def test_kubelet_pulls_a_local_image_through_the_mirror(
    docker: Dockerd, cri_node: CriNode, registry_under_test: RegistryFactory
) -> None:
    name = f"cri-local-{node_name(cri_node)}"
    build_image(docker, f"{name}:dev", layers=2, size=3 * MiB, seed=f"cri-local/{docker.name}")
    registry = registry_under_test(docker)
    cri_node.set_mirror(registry.addr)
    since = time.time()

    # A pod spec's `image: cri-local-…:dev`; containerd normalises it to docker.io/library/….
    image_ref = cri_node.pull_image(f"{name}:dev")

    pulled = oci_client.pull(registry.url, f"library/{name}", "dev", ns="docker.io")
    assert image_ref == config_digest(pulled)
    status = cri_node.image_status(f"{name}:dev")
    assert status is not None
    assert status.id == image_ref
    assert f"docker.io/library/{name}:dev" in status.repo_tags
    assert f"docker.io/library/{name}@{pulled.digest}" in status.repo_digests
    assert image_ref in {image.id for image in cri_node.list_images()}
    # Only dockerd has this image: every blob of it reached containerd from the registry, out of one export.
    assert set(pulled.blobs) <= served_blobs(registry)
    assert len(docker.image_saves(since)) == docker.exports_for(1)

    cri_node.remove_image(f"{name}:dev")
    assert cri_node.image_status(f"{name}:dev") is None
    assert image_ref not in {image.id for image in cri_node.list_images()}


def test_kubelet_pulls_an_upstream_image_through_docker(
    docker: Dockerd,
    docker20: Dockerd,
    upstream: UpstreamRegistry,
    cri_node: CriNode,
    registry_under_test: RegistryFactory,
) -> None:
    built = build_image(docker20, "cri-pt-src:1", layers=2, size=2 * MiB, seed="cri-pull-through")
    pushed = push_image(docker20, built, upstream, f"cri/pulled-{node_name(cri_node)}-{docker.name}", "v1")
    registry = registry_under_test(docker)
    cri_node.set_mirror(registry.addr)
    mark = upstream.log_mark()

    image_ref = cri_node.pull_image(pushed.ref)

    # dockerd fetched it from the upstream (and keeps it); containerd never asked the upstream.
    assert docker.image_id(pushed.ref)
    assert_fetched_by_docker_only(upstream, mark, pushed.repository)
    pulled = oci_client.pull(registry.url, pushed.repository, "v1", ns=upstream.addr)
    assert image_ref == config_digest(pulled)
    assert set(pulled.blobs) <= served_blobs(registry)
    assert f"pulling {pushed.ref}" in registry.log_text()


def test_kubelet_pull_secret_reaches_the_private_upstream_through_the_registry(
    docker: Dockerd,
    docker20: Dockerd,
    upstream_auth: UpstreamRegistry,
    cri_node: CriNode,
    registry_under_test: RegistryFactory,
) -> None:
    built = build_image(docker20, "cri-private-src:1", layers=1, size=1 * MiB, seed="cri-private")
    pushed = push_image(
        docker20, built, upstream_auth, f"cri-secret/app-{node_name(cri_node)}-{docker.name}", "v1"
    )
    registry = registry_under_test(docker)
    cri_node.set_mirror(registry.addr)
    manifests = f"/{pushed.repository}/manifests/v1"
    user, password = upstream_auth.credentials or ("", "")

    # No imagePullSecret: the registry challenges (after Docker's anonymous try), containerd has nothing to
    # answer it with, and the upstream, tried directly after the mirror, refuses it too.
    mark = upstream_auth.log_mark()
    with pytest.raises(CriError) as refused:
        cri_node.pull_image(pushed.ref, timeout=120)
    print(f"containerd {cri_node.version}, no pull secret: {refused.value.details}")
    assert [m["status"] for m in logged_requests(registry, manifests, 1)] == ["401"]
    assert pushed.ref not in {tag for image in cri_node.list_images() for tag in image.repo_tags}
    direct = upstream_requests(upstream_auth, mark, pushed.repository)
    print(f"containerd {cri_node.version}, no pull secret: the upstream answered {direct}")
    assert all(status == "401" for status, _ in direct), direct

    # With the pull secret (AuthConfig username/password, empty server_address): containerd offers it to
    # the mirror after its 401 challenge, and the registry pulls through Docker with it.
    mark = upstream_auth.log_mark()
    image_ref = cri_node.pull_image(pushed.ref, user, password)
    statuses = [m["status"] for m in logged_requests(registry, manifests, 3)][1:]
    print(f"containerd {cri_node.version}, with the pull secret: the registry answered {statuses}")
    assert statuses[:2] == ["401", "200"]
    assert docker.image_id(pushed.ref)
    assert_fetched_by_docker_only(upstream_auth, mark, pushed.repository)
    status = cri_node.image_status(pushed.ref)
    assert status is not None and status.id == image_ref
    assert password not in registry.log_text()

    # Private from now on (content protection): another pod without the secret, or with a wrong one, gets
    # nothing of it from the registry, though Docker holds it; the right secret gets it from the cache.
    cri_node.clean()
    for secret in (None, "guessed-pw"):
        since = len(node_requests(registry, manifests))
        with pytest.raises(CriError):
            cri_node.pull_image(pushed.ref, user if secret else None, secret, timeout=120)
        answered = [m["status"] for m in logged_requests(registry, manifests, since + 1)][since:]
        print(f"containerd {cri_node.version}, secret {secret!r} after the private pull: {answered}")
        assert answered and set(answered) == {"401"}
    started = time.time()
    assert cri_node.pull_image(pushed.ref, user, password) == image_ref
    assert docker.image_saves(started) == []


# --------------------------------------------------------------------------- big images, kubelet's deadline

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
LARGE_SIZE = 640 * MiB
_large_images: dict[str, BuiltImage] = {}


def large_image(docker: Dockerd) -> BuiltImage:
    """A 640 MiB, 5-layer image (seeded, incompressible) in ``docker``, built once per session."""
    built = _large_images.get(docker.name)
    if built is not None and docker.docker("image", "inspect", built.ref, check=False).returncode == 0:
        return built
    built = build_image(docker, "cri-large:1", layers=5, size=LARGE_SIZE, seed="cri-large", busybox=True)
    _large_images[docker.name] = built
    return built


def _logged_at(line: str) -> float:
    """UNIX time of a registry log line (its asctime: local time, milliseconds)."""
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def record(name: str, text: str) -> None:
    """Print a measurement and keep it in test-artifacts/ (git-ignored): numbers, never assertions."""
    print(text)
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / name, "a") as out:
        out.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {text}\n")


@pytest.mark.parametrize(
    ("variant", "zero_copy"),
    [("docker26", True), ("docker28_containerd", True), ("docker28_containerd", False)],
    ids=["docker26", "docker28_containerd", "docker28_containerd-export"],
)
def test_a_large_image_pulled_cold_by_kubelet(
    variant: str,
    zero_copy: bool,
    request: pytest.FixtureRequest,
    cri_node: CriNode,
    registry_under_test: RegistryFactory,
) -> None:
    """A cold 640 MiB pull through CRI: the registry must export it (classic store) or serve it from
    containerd's content store (zero-copy) before containerd's first manifest request gets an answer, and
    containerd's image_pull_progress_timeout (5 minutes; in 1.7 the wait for that answer counts) is the
    deadline. The numbers go to test-artifacts/cri-cold-pull.txt."""
    docker: Dockerd = request.getfixturevalue(variant)
    image = large_image(docker)
    registry = registry_under_test(docker, extra_args=() if zero_copy else NO_ZERO_COPY)
    cri_node.set_mirror(registry.addr)
    since = time.time()

    image_ref, total = pull_seconds(cri_node, image.ref)

    first = node_requests(registry, "/library/cri-large/manifests/1")[0]
    first_line = next(line for line in registry.log_text().splitlines() if first[0] in line)
    answered_after = _logged_at(first_line) - since
    pulled = oci_client.pull(registry.url, "library/cri-large", "1", ns="docker.io")
    assert image_ref == config_digest(pulled)
    assert set(pulled.blobs) <= served_blobs(registry)
    served_zero_copy = docker.zero_copy and zero_copy
    assert len(docker.image_saves(since)) == (0 if served_zero_copy else 1)
    size = sum(pulled.blobs.values())
    exported = re.search(r"exported docker\.io/library/cri-large:1 in ([0-9.]+)s", registry.log_text())
    record(
        "cri-cold-pull.txt",
        f"containerd {cri_node.version} CRI, {variant} (Docker {docker.version}, "
        f"{'zero-copy' if served_zero_copy else 'export'}): {size / MiB:.0f} MiB in "
        f"{len(pulled.blobs) - 1} layers; first manifest request ({first['method']}) answered "
        f"{float(first['seconds']):.2f}s after it arrived, {answered_after:.2f}s after PullImage; "
        f"export {exported[1] + 's' if exported else 'none'}; PullImage (with unpack) {total:.2f}s",
    )


SLOW_EXPORT_SIZE = 16 * MiB
SLOW_SAVE_RATE = 1 * MiB
"""With the proxy's rate the export takes ~18 s: four times the progress timeout below, at the least."""


@pytest.mark.parametrize(
    ("version", "local_pull"),
    [("1.7", False), ("2.1", False), ("2.1", True)],
    ids=["1.7", "2.1-transfer-service", "2.1-local-pull"],
)
def test_a_slow_export_against_containerd_s_pull_progress_timeout(
    version: str,
    local_pull: bool,
    docker26: Dockerd,
    cri_node_factory: CriNodeFactory,
    registry_under_test: RegistryFactory,
) -> None:
    """containerd's CRI cancels a pull that made no progress for image_pull_progress_timeout (here 4s). In
    1.7, and in 2.1 with use_local_image_pull, the resolve (our HEAD by tag, unanswered while Docker
    exports) is an active request that reads no bytes: the pull is cancelled, and containerd does not
    fall back to another host. 2.1's transfer service (its default) counts progress only from content
    downloads, so the wait for the answer never times out. Either way the registry finishes the one
    export it started, a try during it waits for that export, and the next pull (kubelet's retry) is
    served from the cache."""
    name = f"cri-slow-{version.replace('.', '')}{'-local' if local_pull else ''}"
    build_image(docker26, f"{name}:1", layers=2, size=SLOW_EXPORT_SIZE, seed=f"cri-slow/{name}")
    node = cri_node_factory(version, image_pull_progress_timeout="4s", use_local_image_pull=local_pull)
    with DockerProxy(docker26.socket) as proxy:
        proxy.save_rate = SLOW_SAVE_RATE
        registry = registry_under_test(proxy.host, extra_args=NO_ZERO_COPY)
        node.set_mirror(registry.addr)
        since = time.time()
        began = time.monotonic()
        try:
            image_ref: str | None = node.pull_image(f"{name}:1", timeout=300)
            outcome = "pulled"
        except CriError as exc:
            image_ref, outcome = None, f"{exc.code.name}: {exc.details}"
        seconds = time.monotonic() - began
        again, tries = "not needed", 1
        if image_ref is None:
            tries = 2
            # kubelet's next try while the export still runs: it waits for that same export.
            try:
                node.pull_image(f"{name}:1", timeout=300)
                again = "pulled"
            except CriError as exc:
                again = exc.code.name
        wait_until(
            lambda: f"exported docker.io/library/{name}:1" in registry.log_text(),
            timeout=120,
            what="the export to finish",
        )
        cancelled = "because of no progress in 4s" in node.log_text()
        engine = "client-side pull" if local_pull or version == "1.7" else "transfer service"
        record(
            "cri-progress-timeout.txt",
            f"containerd {node.version} CRI ({engine}), image_pull_progress_timeout 4s, export of "
            f"{SLOW_EXPORT_SIZE / MiB:.0f} MiB at {SLOW_SAVE_RATE / MiB:.0f} MiB/s: "
            f"{outcome} after {seconds:.1f}s; a second try during the export: {again}",
        )
        if version == "1.7" or local_pull:
            assert image_ref is None and cancelled, outcome
            assert outcome.startswith("CANCELLED: "), outcome
            assert "context canceled" in outcome
            # Cancelled, not failed over: the error is the mirror's, no other host was tried.
            assert f"{registry.addr}/v2/library/{name}/manifests/1" in outcome
            assert "registry-1.docker.io" not in outcome
        else:
            assert image_ref is not None and not cancelled, outcome
        heads = logged_requests(registry, f"/library/{name}/manifests/1", tries)
        assert [m["method"] for m in heads] == ["HEAD"] * tries

        retried = node.pull_image(f"{name}:1", timeout=60)
        assert image_ref in (None, retried)
        assert exports(registry) == 1
        assert len(docker26.image_saves(since)) == 1
        assert node.image_status(f"{name}:1") is not None


@pytest.mark.parametrize(
    ("version", "local_pull"), [("1.7", False), ("2.1", True)], ids=["1.7", "2.1-local-pull"]
)
def test_a_slow_pull_through_docker_is_answered_in_time_and_the_node_goes_upstream(
    version: str,
    local_pull: bool,
    docker26: Dockerd,
    docker20: Dockerd,
    upstream: UpstreamRegistry,
    cri_node_factory: CriNodeFactory,
    registry_under_test: RegistryFactory,
) -> None:
    """`--answer-within` below the node's image_pull_progress_timeout: a pull through Docker from a far
    upstream outlasts it, the registry answers 503 in time, and containerd pulls from the upstream itself
    (bytes flowing all along) instead of cancelling the pod's pull. Docker's pull goes on, so the next
    node gets the image from the registry."""
    name = f"far/app-{version.replace('.', '')}"
    built = build_image(
        docker20, f"cri-far-src:{version}", layers=3, size=18 * MiB, seed=f"cri-far/{version}"
    )
    push_image(docker20, built, upstream, name, "1")
    node = cri_node_factory(version, image_pull_progress_timeout="6s", use_local_image_pull=local_pull)
    with ThrottledRelay("127.0.0.1", upstream.port, rate=0.75 * MiB) as far:
        ref = f"{far.addr}/{name}:1"
        registry = registry_under_test(docker26, extra_args=["--answer-within", "2s"])
        node.set_mirror(registry.addr)
        mark = upstream.log_mark()
        began = time.monotonic()
        node.pull_image(ref, timeout=300)
        seconds = time.monotonic() - began
        first = node_requests(registry, f"/{name}/manifests/1")[0]
        assert first["status"] == "503", first.group(0)
        went_upstream = [
            agent for status, agent in upstream_requests(upstream, mark, name) if status == "200"
        ]
        assert any(agent.startswith("containerd/") for agent in went_upstream), went_upstream
        record(
            "cri-progress-timeout.txt",
            f"containerd {node.version} CRI, image_pull_progress_timeout 6s, --answer-within 2s, a pull "
            f"through Docker at 0.75 MiB/s per connection: 503 after {float(first['seconds']):.1f}s, "
            f"PullImage from the upstream in {seconds:.1f}s",
        )
        wait_until(lambda: f"pulled {ref} in " in registry.log_text(), timeout=240, what="Docker's pull")

        node.clean()
        mark = upstream.log_mark()
        node.pull_image(ref, timeout=300)
        assert not [a for _, a in upstream_requests(upstream, mark, name) if a.startswith("containerd/")]
        assert node_requests(registry, f"/{name}/manifests/1")[-1]["status"] == "200"
        assert served_blobs(registry)
