#!/usr/bin/env python3
"""How the export cache holds up as it grows: 50, 200 and 1,000 small images, each count in one run.

    python bench/scale.py [--counts 50,200,1000] [--variant docker26] [--code SRC]

Starts a private dockerd and, per count N, imports N distinct one-layer images (``docker import`` of a
tiny tar over the Engine API, one repository each: ``k3rd-scale-NNNN:1``), then measures, each against a
baseline taken in the same run:

- cold pulls: a fresh registry with no size limit pulls all N images one after another
  (tests/world/oci_client.pull with ns=docker.io, every digest verified; each pull is an export); then a
  second fresh registry with ``--cache-max-size`` far above what N images take does the same. Printed: the
  median per-image time over the last tenth (the cache holding about N images), with a limit / without;
  and last tenth / first tenth of each (does a pull get slower as the cache fills?);
- eviction: the second registry is restarted with the limit at half its cache's size and pulls one new
  image, which evicts about half the cache: that pull's time, against a cold pull without eviction (the
  first registry's last tenth);
- warm HEADs: manifest HEADs by tag, one after another, each to an image's tag not asked for since the
  registry started (so it records the tag's last use, a record write). Idle (the baseline), during the
  eviction above, and on the first registry while ``/status.json`` is fetched every 2 s as the status page
  does: median and worst, against idle; and what one ``/status.json`` costs (time and bytes).

``--code SRC`` runs the registry from another checkout's ``src`` (the code before a change, say) while the
benchmark and the daemons come from this one. Prints a table, writes bench/results/scale-TIMESTAMP.json.
Only prints: no timing assertions. Everything listens on loopback or unix sockets and is stopped at the end,
also on Ctrl-C, SIGTERM and exceptions.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import re
import shutil
import statistics
import sys
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common import TROUBLE, add_world_arguments, begin, log, machine, read_log, write_results  # noqa: E402

from tests.world import oci_client  # noqa: E402
from tests.world.daemons import (  # noqa: E402
    NO_ZERO_COPY,
    Dockerd,
    RegistryProcess,
    make_temp_dir,
    remove_tree,
    unix_http,
)
from tests.world.images import seeded_bytes  # noqa: E402

PREFIX = "k3rd-scale"
# Far above what any count here stores: a limit that never evicts.
HIGH_LIMIT = "100GiB"
STATUS_EVERY = 2.0
HEAD_SECONDS = 8.0
_EVICTED = re.compile(r" evicted \S+ ")
_UNUSED = re.compile(r"stored but nothing uses")


def repo(i: int) -> str:
    return f"library/{PREFIX}-{i:04d}"


def import_images(daemon: Dockerd, start: int, stop: int) -> None:
    """Images start..stop-1 as `docker import` of a tar of one small seeded file each (a new image ID
    each: one config and one layer of their own)."""
    for i in range(start, stop):
        data = seeded_bytes(f"scale/{i}", 2048)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo(f"data/{i}.bin")
            info.size, info.mtime = len(data), 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
        query = urllib.parse.urlencode({"fromSrc": "-", "repo": f"{PREFIX}-{i:04d}", "tag": "1"})
        status, body = unix_http(
            daemon.socket,
            "POST",
            f"/images/create?{query}",
            body=buffer.getvalue(),
            headers={"Content-Type": "application/x-tar"},
            timeout=120,
        )
        if status != 200:
            raise RuntimeError(f"docker import {i}: {status} {body[:300]!r}")


def pull(registry: RegistryProcess, i: int) -> float:
    began = time.perf_counter()
    oci_client.pull(registry.url, repo(i), "1", ns="docker.io")
    return time.perf_counter() - began


def head(registry: RegistryProcess, i: int) -> float:
    began = time.perf_counter()
    resp = oci_client.request(
        f"{registry.url}/v2/{repo(i)}/manifests/1?ns=docker.io",
        method="HEAD",
        headers={"Accept": oci_client.MANIFEST_ACCEPT},
    )
    if resp.status != 200:
        raise RuntimeError(f"HEAD {repo(i)}:1 -> {resp.status}")
    return time.perf_counter() - began


class HeadLoop:
    """Warm HEADs one after another, round and round `indices` (the first round records each tag's last
    use), until stopped."""

    def __init__(self, registry: RegistryProcess, indices: list[int]) -> None:
        self._registry = registry
        self._indices = indices
        self._stop = threading.Event()
        self.latencies: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for i in itertools.cycle(self._indices):
            if self._stop.is_set():
                return
            self.latencies.append(head(self._registry, i))

    def __enter__(self) -> HeadLoop:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def heads_for(registry: RegistryProcess, indices: list[int], seconds: float) -> list[float]:
    with HeadLoop(registry, indices) as loop:
        time.sleep(seconds)
    return loop.latencies


@contextlib.contextmanager
def polling_status(registry: RegistryProcess, out: list[tuple[float, int]]) -> Iterator[None]:
    """GET /status.json every STATUS_EVERY seconds, as an open status page does; (seconds, bytes) each."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            resp = oci_client.request(f"{registry.url}/status.json")
            out.append((time.perf_counter() - began, len(resp.body)))
            stop.wait(STATUS_EVERY)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "n": len(latencies),
        "median": statistics.median(latencies) if latencies else float("nan"),
        "worst": max(latencies, default=float("nan")),
    }


def tenth(times: list[float], last: bool) -> float:
    k = max(1, len(times) // 10)
    return statistics.median(times[-k:] if last else times[:k])


def cache_bytes(registry: RegistryProcess) -> int:
    return sum(p.stat().st_size for p in (registry.cache_dir / "blobs").rglob("*") if p.is_file())


def new_registry(
    args: argparse.Namespace, daemon: Dockerd, extra: tuple[str, ...] = (), cache_dir: Path | None = None
) -> RegistryProcess:
    env = {"PYTHONPATH": str(args.code)} if args.code else {}
    return RegistryProcess(
        daemon.host,
        cache_dir=cache_dir,
        extra_args=(*NO_ZERO_COPY, "--no-prefetch", *extra),
        env=env,
        log_level="info",
    ).start(timeout=300)


def measure(args: argparse.Namespace, daemon: Dockerd, n: int, spare: int) -> dict[str, Any]:
    """Everything for a cache of `n` images (indices 0..n-1); image `spare` is pulled to evict."""
    result: dict[str, Any] = {"images": n}
    made = [new_registry(args, daemon)]
    plain = made[0]
    limited = new_registry(args, daemon, ("--cache-max-size", HIGH_LIMIT))
    made.append(limited)
    copy: Path | None = None
    try:
        for label, registry in (("no_limit", plain), ("high_limit", limited)):
            began = time.perf_counter()
            times = [pull(registry, i) for i in range(n)]
            log(f"{n} images: {label} filled in {time.perf_counter() - began:.1f}s")
            result[label] = {
                "times": times,
                "first_tenth": tenth(times, False),
                "last_tenth": tenth(times, True),
            }
        text = read_log(plain.log_path, 0)
        result["unused_removed"] = len(_UNUSED.findall(text))
        result["trouble"] = [line for line in text.splitlines() if TROUBLE.search(line)][:20]

        # Warm HEADs on the registry without a limit: idle, then with the status page polling.
        quarter = max(1, n // 4)
        result["head_idle"] = summary(heads_for(plain, list(range(0, quarter)), HEAD_SECONDS))
        idle = []
        for _ in range(5):
            began = time.perf_counter()
            oci_client.request(f"{plain.url}/status.json")
            idle.append(time.perf_counter() - began)
        result["status_idle_seconds"] = statistics.median(idle)
        polls: list[tuple[float, int]] = []
        with polling_status(plain, polls):
            result["head_status"] = summary(heads_for(plain, list(range(quarter, 2 * quarter)), HEAD_SECONDS))
        result["status_seconds"] = statistics.median(t for t, _ in polls)
        result["status_bytes"] = polls[-1][1]

        # Eviction: the limited registry again, its limit at half its cache, so the next export evicts;
        # once on its own, once (on a copy of the same cache) with warm HEADs going on.
        size = cache_bytes(limited)
        limited.stop()
        copy = make_temp_dir("scale") / "cache"
        shutil.copytree(limited.cache_dir, copy, symlinks=True)
        limit = ("--cache-max-size", str(size // 2))
        limited.extra_args = (*limited.extra_args[:-2], *limit)
        limited.start(timeout=300)
        head(limited, n - 1)  # the first request after a start costs more than the others
        result["evict_seconds"] = pull(limited, spare)
        result["evicted"] = len(_EVICTED.findall(read_log(limited.log_path, 0)))
        result["cache_bytes_before_evict"] = size
        result["cache_bytes_after_evict"] = cache_bytes(limited)
        limited.close()
        busy = new_registry(args, daemon, limit, cache_dir=copy)
        made.append(busy)
        # HEADs to images the eviction keeps (the most recently used half), idle and while it runs.
        kept = list(range(n - 1, n // 2, -1))
        half = len(kept) // 2
        result["head_idle_limited"] = summary(heads_for(busy, kept[:half], HEAD_SECONDS / 2))
        with HeadLoop(busy, kept[half:]) as during:
            result["evict_busy_seconds"] = pull(busy, spare)
        result["head_evicting"] = summary(during.latencies)
    finally:
        for registry in made:
            registry.close()
        if copy is not None:
            remove_tree(copy.parent)
    return result


def report(results: list[dict[str, Any]]) -> list[str]:
    ms = 1000.0
    lines = [
        "",
        f"{'images':>7} {'cold/img':>9} {'limit/img':>9} {'limit/none':>10} {'last/first':>10} "
        f"{'evict s':>8} {'evicted':>7} {'evict/cold':>10} {'+HEADs s':>8} {'status ms':>9} {'idle ms':>7} "
        f"{'status KB':>9}",
    ]
    for r in results:
        none, high = r["no_limit"], r["high_limit"]
        growth = none["last_tenth"] / none["first_tenth"]
        lines.append(
            f"{r['images']:>7} {none['last_tenth'] * ms:>8.0f}m {high['last_tenth'] * ms:>8.0f}m "
            f"{high['last_tenth'] / none['last_tenth']:>10.2f} {growth:>10.2f} "
            f"{r['evict_seconds']:>8.2f} {r['evicted']:>7} {r['evict_seconds'] / none['last_tenth']:>10.1f} "
            f"{r['evict_busy_seconds']:>8.2f} {r['status_seconds'] * ms:>9.1f} "
            f"{r['status_idle_seconds'] * ms:>7.1f} {r['status_bytes'] / 1000:>9.1f}"
        )
    lines += ["", "warm HEAD latency, ms: median / worst (x idle median / x idle worst)"]
    for r in results:
        idle, status = r["head_idle"], r["head_status"]
        idle_l, evicting = r["head_idle_limited"], r["head_evicting"]

        def pair(s: dict[str, float], base: dict[str, float]) -> str:
            return (
                f"{s['median'] * ms:.1f} / {s['worst'] * ms:.1f} "
                f"({s['median'] / base['median']:.1f}x / {s['worst'] / base['worst']:.1f}x, n={s['n']})"
            )

        lines.append(
            f"{r['images']:>7} idle {idle['median'] * ms:.1f} / {idle['worst'] * ms:.1f}; "
            f"status polled {pair(status, idle)}; idle (limit) {idle_l['median'] * ms:.1f} / "
            f"{idle_l['worst'] * ms:.1f}; evicting {pair(evicting, idle_l)}"
        )
    for r in results:
        if r["unused_removed"]:
            lines.append(
                f"ODD: {r['images']} images: {r['unused_removed']} exports removed blobs nothing uses"
            )
        lines += [f"ODD: {r['images']} images: {line}" for line in r["trouble"]]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--counts",
        type=lambda text: [int(c) for c in text.split(",")],
        default=[50, 200, 1000],
        help="cache sizes in images, comma-separated (default 50,200,1000)",
    )
    parser.add_argument(
        "--code", type=Path, help="run the registry from this src dir (default: this checkout)"
    )
    add_world_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begin()
    counts = sorted(args.counts)
    daemon = Dockerd(args.variant)
    results: list[dict[str, Any]] = []
    timer: Callable[[], float] = time.perf_counter
    started = timer()
    try:
        daemon.start()
        env = machine(daemon)
        made = 0
        for n in counts:
            # One more than the cache holds: the image whose export evicts.
            began = timer()
            import_images(daemon, made, n + 1)
            made = n + 1
            log(f"{made} images in Docker ({timer() - began:.1f}s to import)")
            results.append(measure(args, daemon, n, n))
    finally:
        daemon.close()
    lines = report(results)
    lines.append(f"total {timer() - started:.0f}s; registry code: {args.code or REPO_ROOT / 'src'}")
    write_results(
        args.results_dir, "scale", {"environment": env, "code": str(args.code), "results": results}, lines
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
