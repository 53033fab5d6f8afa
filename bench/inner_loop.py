#!/usr/bin/env python3
"""The inner loop, in one run: a rebuilt tag pulled a few seconds after the build, with and without
pre-export; and `warm` of N images before the cluster starts, against cold pulls.

    python bench/inner_loop.py [--rebuild-size-mb 210] [--delay 3] [--images 4] [--size-mb 60]
                               [--repeat 3] [--variant docker26] [--part both|rebuild|warm]

Starts a private dockerd and a containerd "k3s node".

Rebuild loop (``--part rebuild``): one image of ``--rebuild-size-mb`` MiB (4 data layers). For each of two
registries in turn, pre-export on (the default) and off (``--no-prefetch``), each with its own cache: the node
pulls the tag once (so the registry has served it), then ``--repeat`` rounds of: rebuild the image with a
new top layer (``docker build``, as a developer would), wait ``--delay`` seconds (``kubectl rollout
restart``), the node's ``ctr content fetch`` of the tag (emptied first): the post-rebuild pull; then the
same fetch again, the warm pull, the baseline. Ratio per round: post-rebuild / warm (target <= 1.2 with
pre-export). Docker's event stream tells how many ``docker save`` ran during each post-rebuild pull.

Warm before the cluster (``--part warm``): builds ``--images`` deterministic images of ``--size-mb`` MiB each,
then measures, ``--repeat`` rounds (the order of the two groups alternates):

- cold: a fresh registry as the node's mirror; ``ctr content fetch`` of every image, one after another,
  each a cold pull (an export from Docker per image, none with zero-copy);
- warmed: a fresh registry; ``k3d-registry-dockerd warm`` of all images (timed on its own, as a CI job would
  run it before ``k3d cluster create``), then the node's fetches; then the node emptied and the fetches
  again on the same registry: warm pulls, the baseline.

Prints the seconds and the ratios pulls-after-warm / warm pulls (target <= 1.2) and cold / warm;
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
from tests.world.images import MiB, build_image, rebuild_image  # noqa: E402

NAME = "k3rd-bench-loop"
REBUILT = "k3rd-bench-rebuilt"
AFTER_WARM_TARGET = 1.2
AFTER_REBUILD_TARGET = 1.2
PREFETCH_MODES = {"pre-export": (), "no pre-export": ("--no-prefetch",)}


@contextlib.contextmanager
def fresh_registry(daemon: Dockerd, args: tuple[str, ...] = ()) -> Iterator[RegistryProcess]:
    registry = RegistryProcess(daemon.host, log_level="info", extra_args=args)
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


def rebuild_loop(
    daemon: Dockerd, node: Containerd, args: argparse.Namespace
) -> dict[str, list[dict[str, float]]]:
    """Per pre-export mode, the rounds' post-rebuild and warm pull seconds and Docker's saves during the
    post-rebuild pull."""
    ref = f"{REBUILT}:dev"
    image = build_image(daemon, ref, layers=4, size=args.rebuild_size_mb * MiB, seed="rebuilt")
    found: dict[str, list[dict[str, float]]] = {}
    for mode, registry_args in PREFETCH_MODES.items():
        found[mode] = []
        with fresh_registry(daemon, registry_args) as registry:
            node.set_mirror(registry.addr)
            fetch_all(node, [f"docker.io/library/{ref}"])
            for number in range(1, args.repeat + 1):
                image = rebuild_image(daemon, image, salt=f"{mode}-{number}")
                time.sleep(args.delay)
                since = time.time()
                after = fetch_all(node, [f"docker.io/library/{ref}"])
                saves = len(daemon.image_saves(since))
                warm_pull = fetch_all(node, [f"docker.io/library/{ref}"])
                found[mode].append({"after_rebuild": after, "warm": warm_pull, "saves_during_pull": saves})
                log(f"{mode} round {number}/{args.repeat}: after rebuild {after:.2f}s, warm {warm_pull:.2f}s")
        node.clean()
        node.clear_mirrors()
    return found


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
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each part (default 3)")
    parser.add_argument(
        "--rebuild-size-mb", type=int, default=210, help="MiB of the rebuilt image (default 210)"
    )
    parser.add_argument(
        "--delay", type=float, default=3.0, help="seconds from the rebuild to the node's pull (default 3)"
    )
    parser.add_argument("--part", choices=("both", "rebuild", "warm"), default="both", help="what to run")
    add_world_arguments(parser)
    args = parser.parse_args(argv)
    if min(args.images, args.size_mb, args.repeat, args.rebuild_size_mb) < 1 or args.delay < 0:
        parser.error("--images, --size-mb, --rebuild-size-mb and --repeat must be >= 1, --delay >= 0")
    return args


def rebuild_report(args: argparse.Namespace, found: dict[str, list[dict[str, float]]]) -> list[str]:
    lines = [
        f"rebuild loop: {args.rebuild_size_mb} MiB image, new top layer each round, ctr content fetch "
        f"{args.delay:g}s after the build; {args.repeat} rounds per mode",
        "",
        f"{'seconds':<40}{'median':>9}{'min':>9}{'max':>9}",
    ]
    for mode, rounds in found.items():
        for key, label in (("after_rebuild", "pull after rebuild"), ("warm", "warm pull (baseline)")):
            values = [r[key] for r in rounds]
            middle, low, high = statistics.median(values), min(values), max(values)
            lines.append(f"{mode + ': ' + label:<40}{middle:>9.2f}{low:>9.2f}{high:>9.2f}")
    lines += ["", f"{'after rebuild / warm (paired)':<40}{'median':>9}{'best':>9}{'saves in pull':>15}"]
    for mode, rounds in found.items():
        ratios = [r["after_rebuild"] / r["warm"] for r in rounds]
        saves = sum(int(r["saves_during_pull"]) for r in rounds)
        target = f"   target <= {AFTER_REBUILD_TARGET}" if mode == "pre-export" else ""
        lines.append(f"{mode:<40}{statistics.median(ratios):>9.2f}{min(ratios):>9.2f}{saves:>15}{target}")
    return lines


def report(args: argparse.Namespace, env: dict[str, Any], rounds: list[dict[str, float]]) -> list[str]:
    keys = ("cold", "warm_command", "after_warm", "warm")
    medians = {key: statistics.median(r[key] for r in rounds) for key in keys}
    after = [r["after_warm"] / r["warm"] for r in rounds]
    cold = [r["cold"] / r["warm"] for r in rounds]
    lines = [
        f"warm before the cluster: {args.images} images of {args.size_mb} MiB, ctr content fetch of each in "
        f"turn; {len(rounds)} rounds",
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
    return lines


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
        env = {**machine(daemon), "node_containerd": node.version}
        lines = [
            f"inner_loop: {env['variant']} (Docker {env['docker_version']}, {env['docker_storage']}), "
            f"node containerd {env['node_containerd']}, {env['cpus']} CPUs",
        ]
        data: dict[str, Any] = {
            "benchmark": "inner_loop",
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": [sys.executable, *sys.argv],
            "args": vars(args),
            "environment": env,
            "units": {"time": "seconds"},
        }
        if args.part in ("both", "rebuild"):
            found = rebuild_loop(daemon, node, args)
            data["rebuild"] = {"rounds": found, "target_after_rebuild_over_warm": AFTER_REBUILD_TARGET}
            lines += ["", *rebuild_report(args, found)]
        if args.part in ("both", "warm"):
            images = []
            for number in range(args.images):
                image = f"{NAME}-{number}:{args.size_mb}m"
                log(f"building {image}")
                build_image(daemon, image, layers=3, size=args.size_mb * MiB, seed=f"loop-{number}")
                images.append(image)
            rounds = []
            for number in range(1, args.repeat + 1):
                rounds.append(run_round(daemon, node, images, number))
                log(
                    f"round {number}/{args.repeat}: "
                    + ", ".join(f"{k} {v:.2f}s" for k, v in rounds[-1].items())
                )
            data["warm"] = {"rounds": rounds, "target_after_warm_over_warm": AFTER_WARM_TARGET}
            lines += ["", *report(args, env, rounds)]
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
