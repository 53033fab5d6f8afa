"""Fixtures of the real test world: private dockerds, upstream registries, a containerd node.

Daemons are session-scoped and start lazily, the first time a test asks for them. A missing binary
skips the tests that need it, loudly: the reason is listed at the end of the run, and with
K3RD_WORLD_REQUIRED=1 (what CI should set) it fails them instead.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

from .cri import CriNode, CriNodeFactory
from .daemons import (
    NODES,
    Containerd,
    Dockerd,
    Podman,
    RegistryFactory,
    RegistryProcess,
    UpstreamRegistry,
    WorldUnavailable,
    require_binary,
    sweep_stale_dirs,
)

HERE = Path(__file__).resolve().parent
REQUIRED = os.environ.get("K3RD_WORLD_REQUIRED", "") not in ("", "0")
UPSTREAM_USER = "puller"
UPSTREAM_PASSWORD = "s3cret-pw"

_unavailable: dict[str, str] = {}
_timings: dict[str, float] = {}
_started: list[Dockerd | UpstreamRegistry | Containerd | CriNode | Podman] = []


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "world: needs the real test world (dockerd, registry, containerd)")
    # A CI timeout sends SIGTERM, which would skip finalizers and atexit: make it an interrupt.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    for path in sweep_stale_dirs():
        print(f"[world] removed {path}, left behind by a killed test run", file=sys.stderr)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.world)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _timings:
        terminalreporter.section("k3rd test world: start-up times")
        for name, seconds in _timings.items():
            terminalreporter.write_line(f"{name}: {seconds:.2f}s")
    if _unavailable:
        terminalreporter.section("k3rd test world: UNAVAILABLE (tests skipped)", red=True)
        for name, reason in _unavailable.items():
            terminalreporter.write_line(f"{name}: {reason}", red=True)


def _missing(name: str, exc: WorldUnavailable) -> NoReturn:
    _unavailable[name] = str(exc)
    if REQUIRED:
        pytest.fail(f"{name} unavailable but K3RD_WORLD_REQUIRED is set: {exc}", pytrace=False)
    pytest.skip(f"test world: {name} unavailable: {exc}")


Service = TypeVar("Service", Dockerd, UpstreamRegistry, CriNode, Containerd, Podman)


def _service(
    label: str, check: Callable[[], None], make: Callable[[], Service], timing: Callable[[Service], str]
) -> Iterator[Service]:
    """A session daemon: skipped loudly when its binaries are missing, timed, stopped at the end."""
    try:
        check()
    except WorldUnavailable as exc:
        _missing(label, exc)
    service = make()
    try:
        service.start()
        _timings[timing(service)] = service.start_seconds or 0.0
        _started.append(service)
        yield service
    finally:
        # A parametrized fixture's instance ends before the session does: not to be restarted.
        if service in _started:
            _started.remove(service)
        service.close()


def _binary(name: str) -> str:
    try:
        return require_binary(name)
    except WorldUnavailable as exc:
        _missing(name, exc)


def _dockerd(variant: str) -> Iterator[Dockerd]:
    yield from _service(
        variant,
        lambda: Dockerd.check_available(variant),
        lambda: Dockerd(variant),
        lambda d: f"{variant} (dockerd {d.version}, API {d.api_version}, {d.driver})",
    )


@pytest.fixture(scope="session")
def docker26() -> Iterator[Dockerd]:
    """Docker 26.1 (API 1.45), classic graph-driver store (overlay2, or vfs where overlay fails)."""
    yield from _dockerd("docker26")


@pytest.fixture(scope="session")
def docker26_containerd() -> Iterator[Dockerd]:
    """Docker 26.1 with the containerd image store (containerd-snapshotter feature)."""
    yield from _dockerd("docker26-containerd")


@pytest.fixture(scope="session")
def docker28() -> Iterator[Dockerd]:
    """Docker 28.5 (API 1.51, image save takes `platform`) on containerd 2.1, classic graph-driver store."""
    yield from _dockerd("docker28")


@pytest.fixture(scope="session")
def docker28_containerd() -> Iterator[Dockerd]:
    """Docker 28.5 with the containerd image store: what a fresh Docker 29 installation runs."""
    yield from _dockerd("docker28-containerd")


@pytest.fixture(scope="session", params=["docker26", "docker28", "docker28_containerd"])
def docker(request: pytest.FixtureRequest) -> Dockerd:
    """The Docker a test runs against, each test on all three: 26.1 and 28.5 with the classic store, and
    28.5 with the containerd image store (a fresh Docker 29's default)."""
    daemon: Dockerd = request.getfixturevalue(request.param)
    return daemon


@pytest.fixture(scope="session")
def docker20() -> Iterator[Dockerd]:
    """Docker 20.10 (API 1.41): legacy `docker save` format."""
    yield from _dockerd("docker20")


def _podman(release: str) -> Iterator[Podman]:
    yield from _service(
        f"podman{release}",
        lambda: Podman.check_available(release),
        lambda: Podman(release=release),
        lambda p: f"podman ({p.version})",
    )


@pytest.fixture(scope="session")
def podman4() -> Iterator[Podman]:
    """Bookworm's Podman 4.3."""
    yield from _podman("4")


@pytest.fixture(scope="session")
def podman5() -> Iterator[Podman]:
    """Trixie's Podman 5.4 (what Podman users run), from its debootstrapped root."""
    yield from _podman("5")


@pytest.fixture(scope="session")
def podman5_rootless() -> Iterator[Podman]:
    """Podman 5 run as an unprivileged user (ROOTLESS_UID), its store that user's."""
    yield from _service(
        "podman5-rootless",
        lambda: Podman.check_available("5"),
        lambda: Podman(release="5", rootless=True),
        lambda p: f"rootless podman ({p.version})",
    )


@pytest.fixture(scope="session", params=["podman4", "podman5"])
def podman(request: pytest.FixtureRequest) -> Podman:
    """Podman's Docker-compatible API service (legacy save format), rootful, private store and socket: each
    test on 4.3 and 5.4."""
    daemon: Podman = request.getfixturevalue(request.param)
    return daemon


@pytest.fixture(scope="session")
def debootstrap() -> str:
    """Path of debootstrap, which makes the base image for the container-image test."""
    return _binary("debootstrap")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless Chromium, for the status page test."""
    return _binary("chromium")


def _upstream(name: str, user: str | None = None, password: str | None = None) -> Iterator[UpstreamRegistry]:
    yield from _service(
        name,
        lambda: UpstreamRegistry.check_available(auth=user is not None),
        lambda: UpstreamRegistry(user=user, password=password),
        lambda _registry: name,
    )


@pytest.fixture(scope="session")
def upstream() -> Iterator[UpstreamRegistry]:
    """An open distribution registry on 127.0.0.1 (`.addr`, `.requests()` from its access log)."""
    yield from _upstream("upstream")


@pytest.fixture(scope="session")
def upstream_auth() -> Iterator[UpstreamRegistry]:
    """A distribution registry requiring HTTP Basic auth: puller / s3cret-pw (`.credentials`)."""
    yield from _upstream("upstream_auth", user=UPSTREAM_USER, password=UPSTREAM_PASSWORD)


@pytest.fixture(scope="session", params=sorted(NODES))
def node(request: pytest.FixtureRequest) -> Iterator[Containerd]:
    """A 'k3s node': containerd 1.7 (k3s up to 1.32) and 2.1 (k3s 1.33+, kind), each test using it runs
    on both. Emptied (images, content, mirrors) before each test using it."""
    usr = NODES[request.param]
    yield from _service(
        f"node (containerd {request.param})",
        lambda: Containerd.check_available(usr),
        lambda: Containerd(usr=usr),
        lambda ctd: f"node (containerd {ctd.version})",
    )


@pytest.fixture(scope="session", params=sorted(NODES))
def cri_node(request: pytest.FixtureRequest) -> Iterator[CriNode]:
    """kubelet's node: containerd 1.7 and 2.1 with the CRI plugin, its `config_path` the hosts dir that
    `set_mirror` writes (`_default/hosts.toml`, as k3s writes it for `mirrors: "*"`); each test using it
    runs on both. `pull_image(ref, username, password)` is kubelet's PullImage with a pull secret; also
    `list_images()`, `image_status(ref)`, `remove_image(ref)`, `client` (tests/world/cri.py). Emptied
    (images, content, mirrors) before each test using it."""
    usr = NODES[request.param]
    yield from _service(
        f"cri node (containerd {request.param})",
        lambda: CriNode.check_available(usr),
        lambda: CriNode(usr=usr),
        lambda ctd: f"cri node (containerd {ctd.version}, CRI)",
    )


@pytest.fixture
def cri_node_factory() -> Iterator[CriNodeFactory]:
    """Factory: ``cri_node_factory("1.7" | "2.1", image_pull_progress_timeout="4s",
    use_local_image_pull=True)`` starts a CRI node of the test's own with settings the session's
    ``cri_node`` does not have (containerd reads them at start); stopped and removed when the test ends."""
    made: list[CriNode] = []

    def factory(
        version: str, *, image_pull_progress_timeout: str = "5m0s", use_local_image_pull: bool = False
    ) -> CriNode:
        usr = NODES[version]
        try:
            CriNode.check_available(usr)
        except WorldUnavailable as exc:
            _missing(f"cri node (containerd {version})", exc)
        created = CriNode(
            usr=usr,
            image_pull_progress_timeout=image_pull_progress_timeout,
            use_local_image_pull=use_local_image_pull,
        )
        made.append(created)
        return created.start()

    yield factory
    for created in made:
        created.close()


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Dockerd | Podman]]:
    """Factory: ``daemon_factory("docker26" | "docker28-containerd" | … | "podman4" | "podman5",
    insecure_registries=[upstream.addr])`` starts a daemon of the test's own, for a test that removes or
    prunes every image (the session's daemons keep other tests' images: the container-image tests' one for
    the whole session); Podman reaches the registries named over plain HTTP, as Docker does 127.0.0.0/8 by
    itself. Stopped and removed when the test ends."""
    made: list[Dockerd | Podman] = []

    def factory(variant: str, *, insecure_registries: Sequence[str] = ()) -> Dockerd | Podman:
        release = {"podman4": "4", "podman5": "5"}.get(variant)
        try:
            if release:
                Podman.check_available(release)
            else:
                Dockerd.check_available(variant)
        except WorldUnavailable as exc:
            _missing(variant, exc)
        daemon = (
            Podman(release=release, insecure_registries=insecure_registries) if release else Dockerd(variant)
        )
        made.append(daemon)
        return daemon.start()

    yield factory
    for daemon in made:
        daemon.close()


@pytest.fixture
def node_factory() -> Iterator[Callable[[str], Containerd]]:
    """Factory: ``node_factory("1.7" | "2.1")`` starts a node (as the ``node`` fixture's) of the test's own,
    for a test that needs several at once; stopped and removed when the test ends."""
    made: list[Containerd] = []

    def factory(version: str) -> Containerd:
        try:
            Containerd.check_available(NODES[version])
        except WorldUnavailable as exc:
            _missing(f"node (containerd {version})", exc)
        created = Containerd(usr=NODES[version])
        made.append(created)
        return created.start()

    yield factory
    for created in made:
        created.close()


@pytest.fixture(autouse=True)
def _world_reset(request: pytest.FixtureRequest) -> Iterator[None]:
    """Give each test a clean node, and bring back any daemon an earlier test left stopped."""
    for daemon in _started:
        if not daemon.running:
            daemon.start()
    if "node" in request.fixturenames:
        ctd: Containerd = request.getfixturevalue("node")
        ctd.clean()
        ctd.clear_mirrors()
    if "cri_node" in request.fixturenames:
        cri: CriNode = request.getfixturevalue("cri_node")
        cri.clean()
        cri.clear_mirrors()
    yield


@pytest.fixture
def registry_under_test() -> Iterator[RegistryFactory]:
    """Factory: ``registry_under_test(daemon)`` runs ``python -m k3d_registry_dockerd`` against it.

    Returns a started RegistryProcess (`.url`, `.addr`, `.cache_dir`, `.log_text()`, `.stop()`,
    `.kill()`, `.start()`); all are stopped and their temp dirs removed when the test ends.
    """
    made: list[RegistryProcess] = []

    def factory(
        daemon: Dockerd | str,
        *,
        cache_dir: Path | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        start: bool = True,
        timeout: float = 30.0,
        ca_file: Path | None = None,
        user: int | None = None,
    ) -> RegistryProcess:
        host = daemon.host if isinstance(daemon, Dockerd) else daemon
        proc = RegistryProcess(
            host, cache_dir=cache_dir, port=port, extra_args=extra_args, env=env, ca_file=ca_file, user=user
        )
        made.append(proc)
        return proc.start(timeout=timeout) if start else proc

    yield factory
    for proc in made:
        proc.close()
