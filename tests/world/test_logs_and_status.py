"""Long pulls and exports tell how far they got; stopping is logged. Against real dockerds slowed down on
purpose: the export by a proxy on Docker's socket, the pull by a slow link to the upstream registry."""

from __future__ import annotations

import re
import threading
from typing import Any

from . import oci_client
from .daemons import NO_ZERO_COPY, Dockerd, RegistryFactory, UpstreamRegistry, wait_until
from .docker_proxy import DockerProxy
from .images import MiB, build_image, push_image
from .relay import ThrottledRelay

EXPORT_PROGRESS = re.compile(
    r"export of (\S+): ([0-9.]+ \w+) of ~([0-9.]+ \w+), ([0-9.]+ \w+)/s, about \S+ left \(\S+ so far\)"
)


def status(url: str) -> dict[str, Any]:
    found: dict[str, Any] = oci_client.request(f"{url}/status.json").json()
    return found


def test_a_slow_export_reports_progress_and_a_stop_says_what_was_in_flight(
    docker: Dockerd, registry_under_test: RegistryFactory
) -> None:
    build_image(docker, "slow-export:1", layers=2, size=12 * MiB, seed="slow-export", busybox=False)
    with DockerProxy(docker.socket) as proxy:
        proxy.save_rate = 1 * MiB
        registry = registry_under_test(proxy.host, extra_args=NO_ZERO_COPY)
        answers: list[int] = []

        def pull() -> None:
            try:
                answers.append(oci_client.request(f"{registry.url}/v2/slow-export/manifests/1").status)
            except OSError:
                answers.append(-1)  # the connection closed by the stop

        puller = threading.Thread(target=pull)
        puller.start()
        seen = wait_until(
            lambda: [
                t for t in status(registry.url)["transfers"] if t["kind"] == "export" and t["bytes"] > 0
            ],
            timeout=30,
            what="the export on the status page",
        )
        assert seen[0]["ref"] == "docker.io/library/slow-export:1"
        assert seen[0]["expected_bytes"] >= 12 * MiB
        line = wait_until(
            lambda: EXPORT_PROGRESS.search(registry.log_text()), timeout=30, what="a progress line"
        )
        assert line[1] == "docker.io/library/slow-export:1"
        registry.stop()
        puller.join(timeout=60)
    log = registry.log_text()
    assert "stopping (SIGTERM): 1 exports and 0 uploads in flight" in log
    assert "k3d_registry_dockerd: stopped" in log.split("stopping (SIGTERM)")[1]
    # The stop lets requests in flight finish for a few seconds: a 200 only for a finished, verified export.
    assert answers
    assert answers[0] != 200 or "exported docker.io/library/slow-export:1" in log


def test_a_slow_pull_through_docker_reports_progress(
    docker: Dockerd, docker20: Dockerd, upstream: UpstreamRegistry, registry_under_test: RegistryFactory
) -> None:
    built = build_image(docker20, "slow-pull-src:1", layers=3, size=18 * MiB, seed="slow-pull", busybox=False)
    with ThrottledRelay("127.0.0.1", upstream.port, rate=0.75 * MiB) as far:
        push_image(docker20, built, upstream, "slow/app", "1")
        registry = registry_under_test(docker)
        pulled = oci_client.pull(registry.url, "slow/app", "1", ns=far.addr)
    assert pulled.bytes > 0
    lines = re.findall(
        rf"pull of {re.escape(far.addr)}/slow/app:1 through Docker: ([0-9.]+ \w+) of ([0-9.]+ \w+), ",
        registry.log_text(),
    )
    assert lines, registry.log_text()[-3000:]
    assert f"pulled {far.addr}/slow/app:1 in " in registry.log_text()
