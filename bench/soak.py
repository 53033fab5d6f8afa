#!/usr/bin/env python3
"""A bounded soak: mixed pulls, pushes, deletes and evictions for a while; is RSS and the fd count flat?

    python bench/soak.py [--minutes 10] [--interval 5] [--cache-max-size 40MB]

Starts a private dockerd and k3d-registry-dockerd with a ``--cache-max-size`` smaller than the images it
serves (images fetched in the last 5 minutes stay past it, so it mostly shows as overshoot). Then, for
``--minutes``, at the same time:

- pullers (``--pullers``): tests/world/oci_client.pull of a random image of ``--images`` (ns=docker.io,
  every digest verified, the config checked to be Docker's image ID): warm when it is cached, else a cold
  export;
- an evictor: every ``--evict-every`` seconds ``DELETE /v2/library/<name>/manifests/1?ns=docker.io`` of a
  random image (202, or 404 when the limit evicted it already), so the next pull exports again;
- a pusher: uploads an image (``--push-mb`` MiB of data + busybox, gzip layers; POST, PATCH, PUT per blob,
  then the manifest by tag) into the registry's own namespace, reads it back, then deletes the manifest
  and every blob; the registry loads each push into Docker and untags it again on the delete.

The registry's RSS and open fds (and its cache size, CPU time) are sampled every ``--interval`` seconds.
The summary compares the first and the last quarter of the samples (flat: within a small margin), with the
max, the counts of operations and errors, and what the registry's log says (exports, evictions, warnings,
non-2xx answers); then it waits for the fds to return to the idle level. Writes
bench/results/soak-TIMESTAMP.json. Only prints: nothing is asserted. Not run in CI.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import hashlib
import json
import os
import random
import re
import statistics
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common import ACCESS, EXPORTING, TROUBLE, add_world_arguments, begin, log, machine, write_results  # noqa: E402
from watch import (  # noqa: E402
    Sampler,
    checked_pid,
    cpu_seconds,
    fd_count,
    fd_kinds,
    nofile_limit,
    quarters,
    set_nofile,
    status_mib,
    wait_fds,
)

from tests.world import oci_client  # noqa: E402
from tests.world.daemons import (  # noqa: E402
    Dockerd,
    RegistryProcess,
    WorldUnavailable,
    make_temp_dir,
    remove_tree,
)
from tests.world.images import LayoutImage, MiB, build_image, write_image_layout  # noqa: E402

IMAGE_NAME = "k3rd-soak-{:02d}"
TAG = "1"
NS = "docker.io"
PUSH_LAYOUTS = 3
RSS_MARGIN = 0.10
"""Flat: the last quarter's mean RSS is within 10% of the first quarter's."""
FD_MARGIN, FD_SLACK = 0.25, 5
"""Flat: the last quarter's mean fd count is within 25% + 5 of the first quarter's (fds follow activity)."""
SETTLE_TIMEOUT = 60.0
_EVICTED = re.compile(r"evicted \S+ \S+ \([0-9.]+ MB, tags")
_LOADED = re.compile(r"loaded \S+ into Docker as ")
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


# --------------------------------------------------------------------------- HTTP


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def send(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> Answer:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=300) as resp:
            return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        return Answer(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


class OpFailed(Exception):
    pass


def expect(answer: Answer, status: int, what: str) -> Answer:
    if answer.status != status:
        raise OpFailed(f"{what}: {answer.status} (expected {status}) {answer.body[:300]!r}")
    return answer


# --------------------------------------------------------------------------- the workers


@dataclass
class Counts:
    """Operations of one kind: how many, how many failed (first messages kept), how long they took."""

    ok: int = 0
    failed: int = 0
    other: dict[str, int] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_times: list[float] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failed += 1
        if len(self.errors) < 20:
            self.errors.append(f"{time.strftime('%H:%M:%S')} {message[:400]}")
            self.error_times.append(time.time())


@dataclass
class Image:
    name: str
    image_id: str


class Soak:
    def __init__(self, args: argparse.Namespace, registry: RegistryProcess, images: list[Image]) -> None:
        self.args = args
        self.registry = registry
        self.images = images
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: dict[str, Counts] = collections.defaultdict(Counts)

    def record(self, kind: str, began: float, error: str | None = None, other: str | None = None) -> None:
        with self.lock:
            counts = self.counts[kind]
            if error is not None:
                counts.fail(error)
            elif other is not None:
                counts.other[other] = counts.other.get(other, 0) + 1
            else:
                counts.ok += 1
                counts.seconds.append(time.perf_counter() - began)

    def puller(self, number: int) -> None:
        rng = random.Random(f"soak-pull-{number}")
        while not self.stop.is_set():
            image = rng.choice(self.images)
            began = time.perf_counter()
            try:
                pulled = oci_client.pull(self.registry.url, f"library/{image.name}", TAG, ns=NS)
                config = pulled.manifest["config"]["digest"]
                if config != image.image_id:
                    raise OpFailed(f"{image.name}: config {config}, Docker's image is {image.image_id}")
                self.record("pull", began)
            except Exception as exc:
                self.record("pull", began, error=f"{image.name}: {type(exc).__name__}: {exc}")
            self.stop.wait(self.args.pause)

    def evictor(self) -> None:
        rng = random.Random("soak-evict")
        while not self.stop.wait(self.args.evict_every):
            image = rng.choice(self.images)
            began = time.perf_counter()
            url = f"{self.registry.url}/v2/library/{image.name}/manifests/{TAG}?ns={NS}"
            try:
                answer = send(url, "DELETE")
                if answer.status == 202:
                    self.record("evict", began)
                elif answer.status == 404:
                    self.record("evict", began, other="404 not cached")
                else:
                    self.record("evict", began, error=f"{image.name}: {answer.status} {answer.body[:300]!r}")
            except Exception as exc:
                self.record("evict", began, error=f"{image.name}: {type(exc).__name__}: {exc}")

    def pusher(self, layouts: list[LayoutImage]) -> None:
        round_number = 0
        while not self.stop.is_set():
            image = layouts[round_number % len(layouts)]
            repository = f"soak/push-{round_number % len(layouts)}"
            tag = f"r{round_number}"
            round_number += 1
            began = time.perf_counter()
            try:
                self.push(image, repository, tag)
                self.record("push", began)
            except Exception as exc:
                self.record("push", began, error=f"{repository}:{tag}: {type(exc).__name__}: {exc}")
            began = time.perf_counter()
            try:
                self.delete(image, repository)
                self.record("delete pushed", began)
            except Exception as exc:
                self.record("delete pushed", began, error=f"{repository}: {type(exc).__name__}: {exc}")
            self.stop.wait(self.args.push_pause)

    def push(self, image: LayoutImage, repository: str, tag: str) -> None:
        """Blob by blob as docker push does (POST, PATCH, PUT ?digest=), the manifest by tag; read back."""
        base = f"{self.registry.url}/v2/{repository}"
        for digest in image.blob_digests:
            started = expect(send(f"{base}/blobs/uploads/", "POST", b""), 202, f"POST upload {digest}")
            location = urllib.parse.urljoin(base, started.headers["location"])
            patched = expect(
                send(location, "PATCH", image.blob(digest), {"Content-Type": "application/octet-stream"}),
                202,
                f"PATCH {digest}",
            )
            location = urllib.parse.urljoin(base, patched.headers["location"])
            joiner = "&" if "?" in location else "?"
            expect(send(f"{location}{joiner}digest={digest}", "PUT", b""), 201, f"PUT {digest}")
        manifest = image.blob(image.digest)
        headers = {"Content-Type": json.loads(manifest)["mediaType"]}
        put = expect(send(f"{base}/manifests/{tag}", "PUT", manifest, headers), 201, "PUT manifest")
        if put.headers.get("docker-content-digest") != image.digest:
            raise OpFailed(
                f"manifest stored as {put.headers.get('docker-content-digest')}, not {image.digest}"
            )
        got = expect(
            send(f"{base}/manifests/{tag}", headers={"Accept": oci_client.MANIFEST_ACCEPT}), 200, "GET"
        )
        if hashlib.sha256(got.body).hexdigest() != image.digest.removeprefix("sha256:"):
            raise OpFailed(f"{repository}:{tag} read back differs from what was pushed")
        layer = image.layer_digests[-1]
        blob = expect(send(f"{base}/blobs/{layer}"), 200, f"GET blob {layer}")
        if hashlib.sha256(blob.body).hexdigest() != layer.removeprefix("sha256:"):
            raise OpFailed(f"blob {layer} read back differs")

    def delete(self, image: LayoutImage, repository: str) -> None:
        """The manifest by digest (its tag goes too, and the image loaded into Docker), then every blob."""
        base = f"{self.registry.url}/v2/{repository}"
        expect(send(f"{base}/manifests/{image.digest}", "DELETE"), 202, "DELETE manifest")
        for digest in image.blob_digests:
            expect(send(f"{base}/blobs/{digest}", "DELETE"), 202, f"DELETE blob {digest}")

    def run(self, layouts: list[LayoutImage]) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self.puller, args=(i,), name=f"puller-{i}")
            for i in range(self.args.pullers)
        ]
        threads.append(threading.Thread(target=self.evictor, name="evictor"))
        if self.args.push_mb > 0:
            threads.append(threading.Thread(target=self.pusher, args=(layouts,), name="pusher"))
        for thread in threads:
            thread.start()
        return threads


# --------------------------------------------------------------------------- setup


def build_images(daemon: Dockerd, count: int, size_mib: int) -> list[Image]:
    images = []
    for i in range(count):
        name = IMAGE_NAME.format(i)
        built = build_image(daemon, f"{name}:{TAG}", layers=2, size=size_mib * MiB, seed=f"soak-{i}")
        images.append(Image(name, built.image_id))
    return images


def write_layouts(root: Path, size_mib: int) -> list[LayoutImage]:
    return [
        write_image_layout(root / f"push-{k}", tag="1", layer_sizes=(size_mib * MiB,), seed=f"soak-push-{k}")
        for k in range(PUSH_LAYOUTS)
    ]


def tree_mib(path: Path) -> float:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total / MiB


# --------------------------------------------------------------------------- report


def scan_log(text: str) -> dict[str, Any]:
    statuses: collections.Counter[str] = collections.Counter()
    trouble = []
    for line in text.splitlines():
        if match := ACCESS.search(line):
            kind = "manifests" if "/manifests/" in match["path"] else "blobs"
            if "/blobs/uploads" in match["path"]:
                kind = "uploads"
            statuses[f"{match['method']} {kind} {match['status']}"] += 1
        if TROUBLE.search(line):
            trouble.append(line.strip()[:400])
    return {
        "requests": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "exports": len(EXPORTING.findall(text)),
        "evictions_by_limit": len(_EVICTED.findall(text)),
        "loads_into_docker": len(_LOADED.findall(text)),
        "trouble": trouble,
    }


def explain(text: str, message: str, at: float) -> str:
    """For a failed pull: the registry's last eviction or delete of that image in the 10 s before (or
    just after: the registry logs a delete once it is done, the pull may have hit it halfway)."""
    match = re.search(r"(k3rd-soak-\d+)", message)
    if not match:
        return ""
    found = ""
    for line in text.splitlines():
        stamp = _LOG_TIME.match(line)
        if not stamp or match.group(1) not in line or not ("evicted" in line or "deleted" in line):
            continue
        when = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if at - 10 <= when <= at + 2:
            found = line.split(": ", 1)[-1]
    return f" -- after: {found[:200]}" if found else ""


def report(
    args: argparse.Namespace,
    env: dict[str, Any],
    soak: Soak,
    sampler: Sampler,
    seen: dict[str, Any],
    end: dict[str, Any],
) -> tuple[dict[str, Any], list[str]]:
    samples = sampler.samples
    rss = [s.rss_mib for s in samples]
    fds = [float(s.fds) for s in samples]
    cache = [float(s.extra.get("cache_mib", 0.0)) for s in samples]
    rss_first, rss_last = quarters(rss)
    fds_first, fds_last = quarters(fds)
    rss_flat = rss_last <= rss_first * (1 + RSS_MARGIN)
    fds_flat = fds_last <= fds_first * (1 + FD_MARGIN) + FD_SLACK
    minutes = (samples[-1].seconds if samples else 0) / 60
    pushes = f"a pusher ({args.push_mb} MiB)" if args.push_mb else "no pushes"
    cache_first, cache_last = quarters(cache)
    lines = [
        f"soak: {minutes:.1f} min, {args.pullers} pullers (pause {args.pause:g}s), an eviction every "
        f"{args.evict_every:g}s, {pushes}; "
        f"{args.images} images of {args.image_mb} MiB + busybox, --cache-max-size {args.cache_max_size}; "
        f"{env['variant']} (Docker {env['docker_version']}), {env['cpus']} CPUs",
        f"{len(samples)} samples every {args.interval:g}s",
        "",
        f"{'':<22}{'2nd quarter':>15}{'last quarter':>15}{'max':>10}",
        f"{'RSS MiB':<22}{rss_first:>15.1f}{rss_last:>15.1f}{max(rss, default=0):>10.1f}   "
        + ("flat" if rss_flat else f"GROWING (> {RSS_MARGIN:.0%})"),
        f"{'open fds':<22}{fds_first:>15.1f}{fds_last:>15.1f}{max(fds, default=0):>10.0f}   "
        + ("flat" if fds_flat else f"GROWING (> {FD_MARGIN:.0%} + {FD_SLACK})"),
        f"{'cache MiB':<22}{cache_first:>15.1f}{cache_last:>15.1f}{max(cache, default=0):>10.1f}"
        f"   limit {args.cache_max_size}",
        f"peak RSS (VmHWM) {end['hwm_mib']:.1f} MiB; registry CPU {end['cpu_seconds']:.0f}s "
        f"({end['cpu_seconds'] / max(minutes * 60, 1):.0%} of one CPU)",
        f"after the soak: {end['fds_after']} fds ({end['fds_settle_seconds']:.0f}s after stopping; "
        f"idle level {seen['idle_fds']}): {', '.join(f'{k} {v}' for k, v in end['fd_kinds_after'].items())}; "
        f"RSS {end['rss_after_mib']:.1f} MiB; {end['tmp_files']} files left in the cache's tmp dir; "
        f"{end['docker_pushed_left']} pushed images left in Docker",
        "",
        f"{'operations':<22}{'ok':>8}{'failed':>8}{'median s':>10}{'max s':>8}   other",
    ]
    for kind in ("pull", "evict", "push", "delete pushed"):
        counts = soak.counts.get(kind, Counts())
        secs = counts.seconds or [0.0]
        other = ", ".join(f"{k} {v}" for k, v in counts.other.items())
        lines.append(
            f"{kind:<22}{counts.ok:>8}{counts.failed:>8}{statistics.median(secs):>10.2f}{max(secs):>8.2f}"
            f"   {other}"
        )
    scanned = end["log"]
    lines.append(
        f"registry log: {scanned['requests']} requests, {scanned['exports']} exports, "
        f"{scanned['evictions_by_limit']} evictions by the cache limit, "
        f"{scanned['loads_into_docker']} pushes loaded into Docker, {len(scanned['trouble'])} warnings/errors"
    )
    non_2xx = {k: v for k, v in scanned["statuses"].items() if not k.rsplit(" ", 1)[1].startswith("2")}
    lines.append(f"non-2xx answers: {non_2xx or 'none'}")
    odd, cut_by_delete = [], []
    for kind, counts in soak.counts.items():
        for message, at in zip(counts.errors, counts.error_times, strict=True):
            why = explain(end["log_text"], message, at)
            (cut_by_delete if kind == "pull" and why else odd).append(f"{kind}: {message}{why}")
    if cut_by_delete:
        lines.append(
            f"pulls cut short by a DELETE of their image (expected: a delete removes what a pull in progress "
            f"still fetches): {len(cut_by_delete)}"
        )
        lines += [f"  {item}" for item in cut_by_delete]
    odd += [f"log: {line}" for line in scanned["trouble"][:30]]
    unexpected = {k: v for k, v in non_2xx.items() if k != "DELETE manifests 404"}
    if unexpected:
        odd.append(f"non-2xx answers besides evictions of uncached images: {unexpected}")
    if not rss_flat:
        odd.append(f"RSS grew: {rss_first:.1f} -> {rss_last:.1f} MiB (2nd -> last quarter)")
    if not fds_flat:
        odd.append(f"open fds grew: {fds_first:.1f} -> {fds_last:.1f} (2nd -> last quarter)")
    if end["fds_after"] > seen["idle_fds"]:
        odd.append(f"{end['fds_after']} fds after the soak, {seen['idle_fds']} when idle before it")
    if end["tmp_files"] or end["docker_pushed_left"]:
        odd.append(
            f"left behind: {end['tmp_files']} tmp files, {end['docker_pushed_left']} pushed images in Docker"
        )
    if sampler.errors:
        odd.append(f"sampler errors: {sampler.errors[:5]}")
    lines.append(f"oddities: {len(odd)}")
    lines += [f"  ODD: {item}" for item in odd[:60]]
    data: dict[str, Any] = {
        "benchmark": "soak",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "args": vars(args),
        "environment": env,
        "units": {"time": "seconds", "size": "MiB (2^20 bytes)"},
        "summary": {
            "rss_mib": {"first_quarter": rss_first, "last_quarter": rss_last, "max": max(rss, default=0)},
            "rss_flat": rss_flat,
            "fds": {"first_quarter": fds_first, "last_quarter": fds_last, "max": max(fds, default=0)},
            "fds_flat": fds_flat,
            "operations": {
                kind: {"ok": c.ok, "failed": c.failed, "other": c.other, "errors": c.errors}
                for kind, c in soak.counts.items()
            },
        },
        "setup": seen,
        "end": {k: v for k, v in end.items() if k != "log_text"},
        "samples": [asdict(s) for s in samples],
        "seconds_by_operation": {kind: c.seconds for kind, c in soak.counts.items()},
        "oddities": odd,
    }
    return data, lines


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10, help="how long (default 10)")
    parser.add_argument("--interval", type=float, default=5, help="seconds between samples (default 5)")
    parser.add_argument("--images", type=int, default=8, help="images to pull (default 8)")
    parser.add_argument(
        "--image-mb", type=int, default=8, help="MiB of data per image, + busybox (default 8)"
    )
    parser.add_argument("--cache-max-size", default="64MB", help="the registry's limit (default 64MB)")
    parser.add_argument("--pullers", type=int, default=3, help="concurrent pull loops (default 3)")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between a puller's pulls")
    parser.add_argument("--evict-every", type=float, default=10, help="seconds between DELETE ?ns= evictions")
    parser.add_argument("--push-mb", type=int, default=3, help="MiB of data per pushed image (0: no pushes)")
    parser.add_argument("--push-pause", type=float, default=1, help="seconds between push rounds")
    add_world_arguments(parser)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0 or args.images < 1 or args.pullers < 0:
        parser.error("--minutes, --interval and --images must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begin()
    daemon: Dockerd | None = None
    registry: RegistryProcess | None = None
    work: Path | None = None
    soak: Soak | None = None
    threads: list[threading.Thread] = []
    try:
        Dockerd.check_available(args.variant)
        set_nofile(65536)
        log(f"starting dockerd ({args.variant}) and the registry (--cache-max-size {args.cache_max_size})")
        daemon = Dockerd(args.variant).start()
        registry = RegistryProcess(
            daemon.host, log_level="info", extra_args=["--cache-max-size", args.cache_max_size]
        ).start(timeout=60)
        pid = checked_pid(registry.pid, "k3d_registry_dockerd")
        time.sleep(1)
        seen: dict[str, Any] = {
            "idle_fds": fd_count(pid),
            "idle_fd_kinds": fd_kinds(pid),
            "idle_rss_mib": status_mib(pid, "VmRSS"),
            "nofile": nofile_limit(pid),
        }
        log(f"building {args.images} images of {args.image_mb} MiB + busybox, {PUSH_LAYOUTS} push layouts")
        images = build_images(daemon, args.images, args.image_mb)
        work = make_temp_dir("soak")
        layouts = write_layouts(work, args.push_mb) if args.push_mb else []
        env = machine(daemon)
        blobs_dir = registry.cache_dir / "blobs"

        def probe() -> dict[str, Any]:
            return {"cache_mib": tree_mib(blobs_dir), "cpu_s": cpu_seconds(pid)}

        soak = Soak(args, registry, images)
        cpu0 = cpu_seconds(pid)
        mark = registry.log_path.stat().st_size
        log(f"soaking for {args.minutes:g} min; {seen['idle_fds']} fds, {seen['idle_rss_mib']:.0f} MiB idle")
        deadline = time.monotonic() + args.minutes * 60
        with Sampler(pid, args.interval, probe) as sampler:
            threads = soak.run(layouts)
            next_note = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                if time.monotonic() >= next_note and sampler.samples:
                    last = sampler.samples[-1]
                    done = {kind: c.ok + c.failed for kind, c in soak.counts.items()}
                    log(f"RSS {last.rss_mib:.0f} MiB, {last.fds} fds, operations {done}")
                    next_note += 60
            soak.stop.set()
            for thread in threads:
                thread.join(600)
        fds_after, settle = wait_fds(pid, seen["idle_fds"], SETTLE_TIMEOUT)
        with open(registry.log_path, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        leftovers = daemon.docker(
            "images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", "reference=soak/*"
        ).stdout.split()
        end = {
            "fds_after": fds_after,
            "fds_settle_seconds": settle,
            "fd_kinds_after": fd_kinds(pid),
            "rss_after_mib": status_mib(pid, "VmRSS"),
            "hwm_mib": status_mib(pid, "VmHWM"),
            "cpu_seconds": cpu_seconds(pid) - cpu0,
            "cache_mib": tree_mib(blobs_dir),
            "tmp_files": len(list((registry.cache_dir / "tmp").iterdir())),
            "docker_pushed_left": len(leftovers),
            "log": scan_log(text),
            "log_text": text,
        }
        data, lines = report(args, env, soak, sampler, seen, end)
        write_results(args.results_dir, "soak", data, lines)
        return 0
    except WorldUnavailable as exc:
        print(f"soak: test world unavailable: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted, stopping daemons", file=sys.stderr)
        return 130
    finally:
        if soak is not None:
            soak.stop.set()
            for thread in threads:
                thread.join(60)
        for closing in (registry, daemon):
            if closing is not None:
                with contextlib.suppress(Exception):
                    closing.close()
        if work is not None:
            remove_tree(work)


if __name__ == "__main__":
    sys.exit(main())
