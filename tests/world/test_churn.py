"""Churn (issue 27, section 4) for a minute per daemon: two nodes (containerd 1.7 and 2.1) pull a rotating
set of images through the registry, served in place or zero-copy, while a loop rebuilds, removes, prunes,
pulls and retags them in the daemon (tests/world/churn.py: the cycle, and how each pull is judged).
bench/churn.py runs the same for minutes, with numbers.

Each variant gets a daemon of its own: the churn prunes every image, and the session's daemons keep other
tests' images. No timing is asserted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from bench.watch import Sampler, fd_count, status_mib, threads, wait_fds

from . import oci_client
from .churn import THREAD_POOLS, Churn
from .daemons import NODES, Containerd, Dockerd, Podman, RegistryFactory, UpstreamRegistry

CHURN_SECONDS = 60
SETTLE_SECONDS = 60.0
"""Keep-alive connections to the daemon close within this once the pulls stop."""
RSS_SLACK_MIB = 64.0
"""What the registry's RSS may keep after the churn, above its level after the warm-up: page-sized buffers
and allocator arenas stay; a leak per pull (hundreds of pulls) shows beyond it."""


@pytest.mark.parametrize("variant", ["docker26", "docker28-containerd", "podman5"])
def test_every_pull_is_byte_exact_or_fails_cleanly_while_images_churn(
    variant: str,
    daemon_factory: Callable[..., Dockerd | Podman],
    node_factory: Callable[[str], Containerd],
    upstream: UpstreamRegistry,
    registry_under_test: RegistryFactory,
) -> None:
    daemon = daemon_factory(variant, insecure_registries=[upstream.addr])
    nodes = [node_factory(version) for version in sorted(NODES)]
    registry = registry_under_test(daemon.host, start=False)
    churn = Churn(daemon, registry, upstream, nodes, pull_timeout=60)
    churn.prepare()
    registry.start(timeout=60)
    for node in nodes:
        node.set_mirror(registry.addr)
    bytes_path = oci_client.request(f"{registry.url}/status.json").json()["bytes_path"]
    assert bytes_path.startswith(("in place", "zero-copy")), bytes_path
    pid = registry.pid
    assert pid is not None
    idle_fds = fd_count(pid)
    upstream_mark, since = upstream.log_mark(), time.time()
    warm = churn.every_node_pulls_everything("warm-up")
    assert [p for p in warm if p.error] == [] and churn.crashes == []
    threads_before, rss_before = threads(pid), status_mib(pid, "VmRSS")

    with Sampler(pid, 2) as sampler:
        churn.start()
        time.sleep(CHURN_SECONDS)
        churn.finish()
    fds_after, _ = wait_fds(pid, idle_fds, SETTLE_SECONDS)
    threads_after, rss_after = threads(pid), status_mib(pid, "VmRSS")
    churn.restore()
    final = churn.every_node_pulls_everything("final", tries=2)
    churn.judge()
    log_text = registry.log_text()
    found = churn.summary(log_text, upstream_mark, since)
    failures = "\n".join(found["failures"])

    # The churn happened: every kind of step, pulls on every node, some of them cut short.
    assert {"rebuild", "rmi", "prune", "pull", "tag"} <= set(found["ops_by_kind"]), found["ops_by_kind"]
    assert all(counts["ok"] for counts in found["pulls_by_node"].values()), found["pulls_by_node"]
    assert churn.crashes == []
    # After the churn every reference works again on every node, byte for byte, at the latest on a second try.
    last = {(p.node, p.ref): p.verdict for p in final}
    assert list(last.values()) == ["byte-exact"] * len(nodes) * len(churn.refs), failures
    # No completed pull got other bytes than the daemon's, no pull hung.
    assert not [p for p in churn.pulls if not p.error and p.verdict != "byte-exact"]
    assert not [p for p in churn.pulls if p.verdict == "hang"], failures
    # Nothing went around the registry but what a failed or disturbed pull explains.
    assert found["upstream"]["containerd_odd"] == []
    # Served in place: nothing exported, nothing copied, nothing left behind.
    assert found["registry_log"]["exports"] == 0, found["registry_log"]["fallbacks"]
    assert found["daemon_saves"] == []
    assert found["cache"]["blob_files"] == found["cache"]["tmp_files"] == 0, found["cache"]
    assert found["registry_log"]["unexplained"] == []
    # Back to the level before: fds once idle connections closed, threads and RSS within a margin.
    assert fds_after <= idle_fds
    counts = [s.threads for s in sampler.samples]
    assert max(counts) <= threads_before + THREAD_POOLS, (threads_before, counts)
    assert threads_after <= threads_before + THREAD_POOLS, (threads_before, threads_after)
    assert rss_after <= rss_before + RSS_SLACK_MIB, (rss_before, rss_after)

    # Every other failure was caused by the churn itself, and the node's next try worked.
    odd = [p for p in churn.pulls if p.odd]
    cut = "\n".join(
        f"{time.strftime('%H:%M:%S', time.localtime(p.began))} {p.node} {p.ref} ({p.phase}): {p.verdict} "
        f"({p.note}): {p.error}"
        for p in odd
    )
    assert odd == [], cut
