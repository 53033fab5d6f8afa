#!/usr/bin/env python3
"""Before a cluster starts: `warm` of N images, then the node's pulls, against cold pulls, in one run.

    python bench/inner_loop.py [--images 4] [--size-mb 60] [--repeat 3] [--variant docker26]

Starts a private dockerd and a containerd "k3s node", builds ``--images`` deterministic images of
``--size-mb`` MiB each, then measures, ``--repeat`` rounds (the order of the two groups alternates):

- cold: a fresh registry as the node's mirror; ``ctr content fetch`` of every image, one after another,
  each a cold pull (an export from Docker per image, none with zero-copy);
- warmed: a fresh registry; ``k3d-registry-dockerd warm`` of all images (timed on its own, as a CI job would
  run it before ``k3d cluster create``), then the node's fetches; then the node emptied and the fetches
  again on the same registry: warm pulls, the baseline.

Prints per-image seconds and the ratios pulls-after-warm / warm pulls (target <= 1.2) and cold / warm;
writes bench/results/inner_loop-TIMESTAMP.json. Only prints: no timing assertions. Everything listens on
loopback or unix sockets and is stopped at the end, also on Ctrl-C, SIGTERM and exceptions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common import add_world_arguments, begin, log, machine, write_results  # noqa: E402

from tests.world.daemons import Containerd, Dockerd, RegistryProcess, WorldUnavailable  # noqa: E402
from tests.world.images import MiB, build_image  # noqa: E402

NAME = "k3rd-bench-loop"
AFTER_WARM_TARGET = 1.2


@contextlib.contextmanager
def fresh_registry(daemon: Dockerd) -> Iterator[RegistryProcess]:
    registry = RegistryProcess(daemon.host, log_level="info")
    try:
        yield registry.start(timeout=60)
    finally:
        registry.close()


def fetch_all(node: Containerd, refs: list[str]) -> float:
    """Seconds for the node to fetch every image (emptied first), one after another."""
    node.clean()
    began = time.perf_counter()
    for ref in refs:
        node.content_fetch(ref, check=True, timeout=900)
    return time.perf_counter() - began


def warm(registry: RegistryProcess, images: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "k3d_registry_dockerd", "warm", "--registry", registry.url, *images],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return time.perf_counter() - began


def run_round(daemon: Dockerd, node: Containerd, images: list[str], number: int) -> dict[str, float]:
    refs = [f"docker.io/library/{image}" for image in images]
    seconds: dict[str, float] = {}
    order = ["cold", "warmed"] if number % 2 else ["warmed", "cold"]
    for group in order:
        with fresh_registry(daemon) as registry:
            node.set_mirror(registry.addr)
            if group == "cold":
                seconds["cold"] = fetch_all(node, refs)
            else:
                seconds["warm_command"] = warm(registry, images)
                seconds["after_warm"] = fetch_all(node, refs)
                seconds["warm"] = fetch_all(node, refs)
    node.clean()
    node.clear_mirrors()
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--images", type=int, default=4, help="images to warm and pull (default 4)")
    parser.add_argument("--size-mb", type=int, default=60, help="MiB of data per image (default 60)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    add_world_arguments(parser)
    args = parser.parse_args(argv)
    if min(args.images, args.size_mb, args.repeat) < 1:
        parser.error("--images, --size-mb and --repeat must be >= 1")
    return args


def report(
    args: argparse.Namespace, env: dict[str, Any], rounds: list[dict[str, float]]
) -> tuple[dict[str, Any], list[str]]:
    keys = ("cold", "warm_command", "after_warm", "warm")
    medians = {key: statistics.median(r[key] for r in rounds) for key in keys}
    after = [r["after_warm"] / r["warm"] for r in rounds]
    cold = [r["cold"] / r["warm"] for r in rounds]
    lines = [
        f"inner_loop: {env['variant']} (Docker {env['docker_version']}, {env['docker_storage']}), "
        f"node containerd {env['node_containerd']}, {env['cpus']} CPUs",
        f"{args.images} images of {args.size_mb} MiB, ctr content fetch of each in turn; "
        f"{len(rounds)} rounds",
        "",
        f"{'seconds (all images)':<40}{'median':>9}{'min':>9}{'max':>9}",
    ]
    labels = {
        "cold": "node's pulls, cold registry",
        "warm_command": "k3d-registry-dockerd warm",
        "after_warm": "node's pulls right after warm",
        "warm": "node's pulls, warm (baseline)",
    }
    for key in keys:
        values = [r[key] for r in rounds]
        lines.append(f"{labels[key]:<40}{medians[key]:>9.2f}{min(values):>9.2f}{max(values):>9.2f}")
    lines += [
        "",
        f"{'ratios (per round, paired)':<40}{'median':>9}{'best':>9}",
        f"{'after warm / warm':<40}{statistics.median(after):>9.2f}{min(after):>9.2f}"
        f"   target <= {AFTER_WARM_TARGET}",
        f"{'cold / warm':<40}{statistics.median(cold):>9.2f}{min(cold):>9.2f}",
    ]
    data = {
        "benchmark": "inner_loop",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "args": vars(args),
        "environment": env,
        "units": {"time": "seconds"},
        "median_seconds": medians,
        "after_warm_over_warm": after,
        "cold_over_warm": cold,
        "target_after_warm_over_warm": AFTER_WARM_TARGET,
        "rounds": rounds,
    }
    return data, lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begin()
    daemon: Dockerd | None = None
    node: Containerd | None = None
    try:
        Dockerd.check_available(args.variant)
        Containerd.check_available()
        daemon = Dockerd(args.variant).start()
        node = Containerd().start()
        images = []
        for number in range(args.images):
            image = f"{NAME}-{number}:{args.size_mb}m"
            log(f"building {image}")
            build_image(daemon, image, layers=3, size=args.size_mb * MiB, seed=f"loop-{number}")
            images.append(image)
        env = {**machine(daemon), "node_containerd": node.version}
        rounds = []
        for number in range(1, args.repeat + 1):
            rounds.append(run_round(daemon, node, images, number))
            log(f"round {number}/{args.repeat}: " + ", ".join(f"{k} {v:.2f}s" for k, v in rounds[-1].items()))
        data, lines = report(args, env, rounds)
        write_results(args.results_dir, "inner_loop", data, lines)
        return 0
    except WorldUnavailable as exc:
        print(f"inner_loop: test world unavailable: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("inner_loop: interrupted, stopping daemons", file=sys.stderr)
        return 130
    finally:
        for closing in (node, daemon):
            if closing is not None:
                with contextlib.suppress(Exception):
                    closing.close()


if __name__ == "__main__":
    sys.exit(main())
