#!/usr/bin/env python3
"""Churn: images removed and rebuilt while nodes pull through the registry (issue 27, section 4).

    python bench/churn.py [--minutes 5] [--variant docker26|docker28-containerd|podman5|…] [--nodes 3]

Starts a private daemon (a dockerd of ``--variant``, or Podman 4.3's or 5's service), the world's upstream
registry holding ``--upstreams`` images, the registry in its default mode (in place, or zero-copy on the
containerd image store; the start checks which) and ``--nodes`` containerd nodes (1.7 and 2.1 in turn) whose
``_default/hosts.toml`` names the registry, as k3s writes it for ``mirrors: "*"``. After a warm-up (each node
pulls every reference once), for ``--minutes``: the nodes pull a rotating set of references (``--locals``
locally built tags, an alias tag, the upstream images) with ``ctr images pull`` (unpacked, so every diff ID
is checked), empty themselves after each; a loop rebuilds tags, removes one (``rmi``), prunes everything
(``image prune -af``), pulls upstream images again and retags, then brings back what is gone
(tests/world/churn.py has the cycle and how each pull is judged).

The registry's RSS, open fds and threads are sampled every ``--interval`` seconds. After the loop stops:
the fds once back at the idle level (waiting up to a minute for keep-alive connections to Docker to close),
threads and RSS; every tag restored and each node pulls every reference once more (a failure gets a second
try, which must work); the cache dir (in place, nothing may be copied into it), exports (the registry's log
and the daemon's `save` events), the upstream's access log (containerd there means the mirror failed it),
the registry's warnings.
Writes bench/results/churn-TIMESTAMP.json. Only prints: nothing is asserted. Not run in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common import add_world_arguments, begin, log, machine, write_results  # noqa: E402
from soak import FD_MARGIN, FD_SLACK, RSS_MARGIN, SETTLE_TIMEOUT  # noqa: E402
from watch import (  # noqa: E402
    Sampler,
    checked_pid,
    cpu_seconds,
    fd_count,
    fd_kinds,
    quarters,
    status_mib,
    threads,
    wait_fds,
)

from tests.world import oci_client  # noqa: E402
from tests.world.churn import THREAD_POOLS, Churn  # noqa: E402
from tests.world.daemons import (  # noqa: E402
    NODES,
    Containerd,
    Dockerd,
    Podman,
    RegistryProcess,
    UpstreamRegistry,
    WorldUnavailable,
)

IN_PLACE = ("in place", "zero-copy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=5, help="how long the churn runs (default 5)")
    parser.add_argument("--interval", type=float, default=5, help="seconds between samples (default 5)")
    parser.add_argument(
        "--nodes", type=int, default=3, help="containerd nodes, 1.7 and 2.1 in turn (default 3)"
    )
    parser.add_argument("--locals", type=int, default=3, help="locally built tags (default 3)")
    parser.add_argument(
        "--upstreams", type=int, default=2, help="images in the upstream registry (default 2)"
    )
    parser.add_argument(
        "--image-mb", type=float, default=4, help="MiB of data per image, + busybox (default 4)"
    )
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between the churn loop's steps")
    parser.add_argument("--node-pause", type=float, default=0.2, help="seconds between a node's pulls")
    parser.add_argument("--pull-timeout", type=float, default=120, help="seconds a node's pull may take")
    add_world_arguments(parser, podman=True)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0 or args.nodes < 1 or args.locals < 1 or args.upstreams < 1:
        parser.error("--minutes, --interval, --nodes, --locals and --upstreams must be positive")
    return args


def start_daemon(variant: str, upstream: UpstreamRegistry) -> Dockerd | Podman:
    release = {"podman": "4", "podman5": "5"}.get(variant)
    if release:
        Podman.check_available(release)
        return Podman(release=release, insecure_registries=[upstream.addr]).start()
    Dockerd.check_available(variant)
    return Dockerd(variant).start()


def figures(pid: int) -> dict[str, float]:
    return {"rss_mib": status_mib(pid, "VmRSS"), "fds": fd_count(pid), "threads": threads(pid)}


def report(
    args: argparse.Namespace,
    env: dict[str, Any],
    churn: Churn,
    sampler: Sampler,
    seen: dict[str, Any],
    summary: dict[str, Any],
) -> tuple[dict[str, Any], list[str]]:
    samples = sampler.samples
    before, after = seen["before"], seen["after"]
    series = {
        "rss_mib": [s.rss_mib for s in samples],
        "fds": [float(s.fds) for s in samples],
        "threads": [float(s.threads) for s in samples],
    }
    margins = {
        "rss_mib": lambda second, last: last <= second * (1 + RSS_MARGIN),
        "fds": lambda second, last: last <= second * (1 + FD_MARGIN) + FD_SLACK,
        # Bounded pools start threads as work comes, up to their sizes: more than those would be a leak.
        "threads": lambda _second, _last: (
            max(series["threads"], default=0) <= before["threads"] + THREAD_POOLS
        ),
    }
    growth: dict[str, dict[str, Any]] = {}
    for key, values in series.items():
        second, last = quarters(values) if values else (0.0, 0.0)
        growth[key] = {
            "second_quarter": second,
            "last_quarter": last,
            "max": max(values, default=0),
            "flat": margins[key](second, last),
        }
    minutes = (samples[-1].seconds if samples else 0) / 60
    lines = [
        f"churn: {minutes:.1f} min on {env['variant']} ({env['docker_version']}, {env['docker_storage']}), "
        f"{env['cpus']} CPUs; {env['bytes_path']}",
        f"{len(churn.nodes)} nodes (containerd {', '.join(node.version for node in churn.nodes)}) pulling "
        f"{len(churn.refs)} references ({' '.join(ref.name for ref in churn.refs)}) of {args.image_mb:g} "
        f"MiB + busybox; the churn loop pauses {args.pause:g}s between steps, a node {args.node_pause:g}s "
        "between pulls",
        f"{len(samples)} samples every {args.interval:g}s",
        "",
        f"{'':<12}{'idle':>8}{'before':>8}{'2nd quarter':>13}{'last quarter':>14}{'max':>8}{'after':>8}",
    ]
    for key, label in (("rss_mib", "RSS MiB"), ("fds", "open fds"), ("threads", "threads")):
        g = growth[key]
        verdict = "flat" if g["flat"] else "GROWING"
        lines.append(
            f"{label:<12}{seen['idle'][key]:>8.1f}{before[key]:>8.1f}{g['second_quarter']:>13.1f}"
            f"{g['last_quarter']:>14.1f}{g['max']:>8.1f}{after[key]:>8.1f}   {verdict}"
        )
    lines += [
        f"(idle: the registry just started; before: after the warm-up; after: {seen['settle_seconds']:.0f}s "
        "after the loop stopped, once the fds were back at the idle level or a minute passed)",
        f"fds after by kind: {', '.join(f'{k} {v}' for k, v in seen['fd_kinds_after'].items())}; "
        f"peak RSS (VmHWM) {seen['hwm_mib']:.1f} MiB; registry CPU {seen['cpu_seconds']:.0f}s "
        f"({seen['cpu_seconds'] / max(minutes * 60, 1):.0%} of one CPU)",
        "",
        f"{'operations':<22}{'ok':>8}{'failed':>8}{'median s':>10}{'max s':>8}",
    ]
    rows = [(f"node {name} pull", counts) for name, counts in summary["pulls_by_node"].items()]
    rows += [(f"daemon {kind}", counts) for kind, counts in summary["ops_by_kind"].items()]
    for label, counts in rows:
        lines.append(
            f"{label:<22}{counts['ok']:>8}{counts['failed']:>8}{counts['median_s']:>10.2f}{counts['max_s']:>8.2f}"
        )
    lines += ["", "node pulls by verdict:"]
    lines += [f"  {verdict}: {count}" for verdict, count in summary["verdicts"].items()]
    retries = ", ".join(f"{k} {v}" for k, v in summary["retries"].items()) or "no failures"
    lines.append(f"after a failed pull, the node's next try of that reference: {retries}")
    cache = summary["cache"]
    lines.append(
        f"cache dir: {cache['blob_files']} blob files ({cache['blob_bytes'] / 2**20:.1f} MiB), "
        f"{cache['records']} records, {cache['tmp_files']} files in tmp/"
    )
    registry_log = summary["registry_log"]
    lines.append(
        f"exports: {registry_log['exports']} in the registry's log ({len(registry_log['fallbacks'])} images "
        f"not served in place), {len(summary['daemon_saves'])} `save` events in the daemon"
    )
    lines += [f"  {line}" for line in registry_log["fallbacks"][:10]]
    lines += [f"  saved: {line}" for line in summary["daemon_saves"][:10]]
    upstream = summary["upstream"]
    lines.append(
        "upstream requests by client: "
        + ", ".join(f"{agent} {count}" for agent, count in upstream["by_agent"].items())
        + f"; containerd's (the mirror failed it): {len(upstream['containerd_during_failed'])} during failed "
        f"pulls, {len(upstream['containerd_during_completed'])} during disturbed pulls that completed"
    )
    lines.append(
        "registry warnings/errors explained by the churn: "
        + (", ".join(f"{count}x {why}" for why, count in registry_log["explained"].items()) or "none")
    )
    lines.append(
        "failed node pulls by verdict and ctr's error (digests and addresses elided; each in the JSON):"
    )
    for verdict, messages in summary["errors_by_verdict"].items():
        lines.append(f"  {verdict}:")
        lines += [f"    {count:>4}  {message}" for message, count in messages.items()]
    odd = [
        f"pull {p['node']} {p['ref']} ({p['phase']}): {p['verdict']}"
        + (f" ({p['note']})" if p["note"] else "")
        + f": {p['error'][:300]}"
        for p in summary["odd_pulls"]
    ]
    odd += [f"crash: {line}" for line in summary["crashes"]]
    odd += [f"upstream served containerd: {line}" for line in upstream["containerd_odd"]]
    odd += [f"log: {record}".replace("\n", "\n       ") for record in registry_log["unexplained"][:30]]
    if env["in_place"] and max(registry_log["exports"], len(summary["daemon_saves"])) > len(
        registry_log["fallbacks"]
    ):
        odd.append(
            f"{registry_log['exports']} exports and saves of {summary['daemon_saves']}, "
            f"{len(registry_log['fallbacks'])} images not served in place"
        )
    if env["in_place"] and cache["blob_files"] and not registry_log["exports"]:
        odd.append(f"{cache['blob_files']} blob files in the cache dir, and no export")
    if cache["tmp_files"]:
        odd.append(f"{cache['tmp_files']} files left in the cache's tmp/")
    if after["fds"] > seen["idle"]["fds"]:
        odd.append(f"{after['fds']} fds after the churn, {seen['idle']['fds']} when idle")
    odd += [
        f"{key} grew: {g['second_quarter']:.1f} -> {g['last_quarter']:.1f}"
        for key, g in growth.items()
        if not g["flat"]
    ]
    if sampler.errors:
        odd.append(f"sampler errors: {sampler.errors[:5]}")
    lines.append(f"oddities: {len(odd)}")
    lines += [f"  ODD: {item}" for item in odd[:80]]
    data: dict[str, Any] = {
        "benchmark": "churn",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "args": vars(args),
        "environment": env,
        "units": {"time": "seconds", "size": "MiB (2^20 bytes)"},
        "resources": {"seen": seen, "growth": growth},
        "summary": summary,
        "samples": [asdict(s) for s in samples],
        "pulls": [asdict(p) for p in churn.pulls],
        "ops": [asdict(op) for op in churn.ops],
        "oddities": odd,
    }
    return data, lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begin()
    upstream: UpstreamRegistry | None = None
    daemon: Dockerd | Podman | None = None
    registry: RegistryProcess | None = None
    nodes: list[Containerd] = []
    churn: Churn | None = None
    try:
        usrs = [NODES[version] for version in sorted(NODES)]
        for usr in usrs:
            Containerd.check_available(usr)
        UpstreamRegistry.check_available()
        log(f"starting {args.variant}, the upstream registry and {args.nodes} containerd nodes")
        upstream = UpstreamRegistry().start()
        daemon = start_daemon(args.variant, upstream)
        nodes = [Containerd(usr=usrs[i % len(usrs)]).start() for i in range(args.nodes)]
        registry = RegistryProcess(daemon.host, log_level="info")
        churn = Churn(
            daemon, registry, upstream, nodes,
            locals_=args.locals, upstreams=args.upstreams, image_mib=args.image_mb,
            pause=args.pause, node_pause=args.node_pause, pull_timeout=args.pull_timeout,
        )  # fmt: skip
        log(f"building {args.locals} tags, pushing {args.upstreams} images upstream and pulling them back")
        churn.prepare()
        registry.start(timeout=60)
        pid = checked_pid(registry.pid, "k3d_registry_dockerd")
        for node in nodes:
            node.set_mirror(registry.addr)
        time.sleep(1)
        idle = figures(pid)
        bytes_path = oci_client.request(f"{registry.url}/status.json").json()["bytes_path"]
        in_place = bytes_path.startswith(IN_PLACE)
        env = {
            **machine(daemon),
            "nodes": [node.version for node in nodes],
            "bytes_path": bytes_path,
            "in_place": in_place,
        }
        log(f"the registry: {bytes_path}")
        upstream_mark, since = upstream.log_mark(), time.time()
        warm = churn.every_node_pulls_everything("warm-up")
        broken = [f"{p.node} {p.ref}: {p.error}" for p in warm if p.error]
        if broken or churn.crashes:
            raise RuntimeError(f"warm-up pulls failed: {broken + churn.crashes}")
        before = figures(pid)
        cpu0 = cpu_seconds(pid)
        log(f"churning for {args.minutes:g} min; idle {idle}, after the warm-up {before}")
        deadline = time.monotonic() + args.minutes * 60
        with Sampler(pid, args.interval, lambda: {"threads": threads(pid)}) as sampler:
            churn.start()
            next_note = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                if time.monotonic() >= next_note and sampler.samples:
                    last = sampler.samples[-1]
                    done = len([p for p in churn.pulls if p.phase == "churn"])
                    failed = len([p for p in churn.pulls if p.phase == "churn" and p.error])
                    log(
                        f"RSS {last.rss_mib:.0f} MiB, {last.fds} fds, {last.threads} threads; "
                        f"{done} pulls ({failed} failed), {len(churn.ops)} churn steps"
                    )
                    next_note += 60
            log("stopping the churn (pulls in flight run to their end)")
            churn.finish()
        stopped = time.monotonic()
        _, settle = wait_fds(pid, int(idle["fds"]), SETTLE_TIMEOUT)
        seen: dict[str, Any] = {
            "idle": idle,
            "before": before,
            "after": figures(pid),
            "settle_seconds": time.monotonic() - stopped,
            "fds_wait_seconds": settle,
            "fd_kinds_after": fd_kinds(pid),
            "hwm_mib": status_mib(pid, "VmHWM"),
            "cpu_seconds": cpu_seconds(pid) - cpu0,
        }
        log("restoring every tag; each node pulls every reference once more (a second try after a failure)")
        churn.restore()
        churn.every_node_pulls_everything("final", tries=2)
        churn.judge()
        summary = churn.summary(registry.log_text(), upstream_mark, since)
        data, lines = report(args, env, churn, sampler, seen, summary)
        write_results(args.results_dir, "churn", data, lines)
        return 0
    except WorldUnavailable as exc:
        print(f"churn: test world unavailable: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("churn: interrupted, stopping daemons", file=sys.stderr)
        return 130
    finally:
        if churn is not None:
            churn.stop.set()
            churn.finish()
        for closing in (*nodes, registry, daemon, upstream):
            if closing is not None:
                with contextlib.suppress(Exception):
                    closing.close()


if __name__ == "__main__":
    sys.exit(main())
