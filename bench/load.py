#!/usr/bin/env python3
"""1,000 keep-alive connections of manifest HEADs and blob GETs, against distribution's registry, in one run.

    python bench/load.py [--connections 1000] [--threads 2] [--duration 20] [--cold 20]

Starts a private dockerd, k3d-registry-dockerd and Debian's distribution registry (2.8), builds small
deterministic images, pulls the "hot" ones through our registry (cache filled) and copies them from it into
distribution with ``skopeo copy --preserve-digests``, so both serve the same bytes under the same paths.
Then ``wrk`` (bench/load.lua: HEAD manifest by tag, GET blob, alternating, on every keep-alive connection)
runs three times:

- ours: our registry, nothing else going on;
- distribution: the same load on distribution's registry (the baseline);
- ours + cold pulls: our registry again, and a few seconds in, ``--cold`` concurrent cold pulls
  (tests/world/oci_client.pull with ns=docker.io, every digest verified) of different images only dockerd
  has, so every one is an export from Docker while the load runs.

Per run: requests/s, latency percentiles (wrk's, client side; and per request kind from the registry's own
log, server side), errors (wrk's socket errors, non-2xx answers), the registry's CPU time, RSS sampled during
the run and its peak (VmHWM), and open fds before, during (max) and after (waiting until they return to the
level before). Prints a table with ours/distribution ratios and writes bench/results/load-TIMESTAMP.json.
Only prints: no assertions on timings. Everything listens on loopback or unix sockets and is stopped at the
end, also on Ctrl-C, SIGTERM and exceptions.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import hashlib
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpload  # noqa: E402
from common import EXPORTING, add_world_arguments, begin, log, machine, read_log, write_results  # noqa: E402
from watch import (  # noqa: E402
    Sampler,
    checked_pid,
    cpu_seconds,
    fd_count,
    fd_kinds,
    nofile_limit,
    set_nofile,
    status_mib,
    tcp_counters,
    wait_fds,
)

from tests.world import oci_client  # noqa: E402
from tests.world.daemons import (  # noqa: E402
    Dockerd,
    RegistryProcess,
    UpstreamRegistry,
    WorldUnavailable,
    make_temp_dir,
    require_binary,
)
from tests.world.images import MiB, build_image, skopeo  # noqa: E402

LUA_SCRIPT = Path(__file__).resolve().parent / "load.lua"
HOT_SIZES = (8 * 1024, 128 * 1024, 512 * 1024, 2 * MiB)
"""Data bytes of each hot image (2 layers each, no busybox): blobs of 4 KiB to 1 MiB plus the configs."""
HOT_NAME = "k3rd-load-hot-{}"
COLD_NAME = "k3rd-load-cold-{:02d}"
TAG = "1"
NS = "docker.io"
SETTLE_TIMEOUT = 60.0
"""How long to wait for the open fds to return to the level before a run (idle keep-alive connections to
dockerd expire after 15 s in aiohttp's client)."""
SAMPLE_INTERVAL = 0.25
COLD_TIMEOUT = 600.0

_OUR_ACCESS = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) -?\d+ (?P<seconds>[0-9.]+)s '
)
_DIST_DONE = re.compile(
    r"http\.request\.method=(?P<method>[A-Z]+) .*?http\.request\.uri=\"?(?P<path>[^\s\"]+)\"? .*?"
    r"http\.response\.duration=\"?(?P<duration>[0-9.]+)(?P<unit>ns|µs|us|ms|s)\"? "
    r"http\.response\.status=(?P<status>\d{3})"
)
_DIST_UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
_TROUBLE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback|level=(error|fatal|panic)")
_EXPORTED = re.compile(r"exported (\S+) in ([0-9.]+)s")


# --------------------------------------------------------------------------- content


@dataclass
class HotImage:
    name: str
    """Docker name (k3rd-load-hot-N); clients ask for library/NAME with ns=docker.io."""
    data_bytes: int
    manifest_digest: str = ""
    blobs: dict[str, int] = field(default_factory=dict)


@dataclass
class ColdImage:
    name: str
    image_id: str
    data_bytes: int


def build_hot(daemon: Dockerd) -> list[HotImage]:
    images = []
    for i, size in enumerate(HOT_SIZES):
        name = HOT_NAME.format(i)
        build_image(daemon, f"{name}:{TAG}", layers=2, size=size, seed=f"load-hot-{i}", busybox=False)
        images.append(HotImage(name, size))
    return images


def build_cold(daemon: Dockerd, count: int) -> list[ColdImage]:
    """``count`` images of 2 data layers + busybox (1.9 MiB), ~5 to ~20 MiB each, no blob shared but
    busybox's."""
    images = []
    for i in range(count):
        data = (3 + (15 * i) // max(count - 1, 1)) * MiB
        name = COLD_NAME.format(i)
        built = build_image(daemon, f"{name}:{TAG}", layers=2, size=data, seed=f"load-cold-{i}")
        images.append(ColdImage(name, built.image_id, data))
    return images


def check_pulled(pulled: oci_client.Pulled, image_id: str, layers: int, what: str) -> None:
    """oci_client verified every digest; the image must also be Docker's (its ID: the config's digest on
    the classic store, the manifest's on the containerd image store) and complete."""
    config = pulled.manifest["config"]["digest"]
    if image_id not in (config, pulled.digest) or len(pulled.manifest["layers"]) != layers:
        raise RuntimeError(
            f"{what}: config {config} with {len(pulled.manifest['layers'])} layers, expected Docker's "
            f"image {image_id} with {layers}"
        )


def fill_ours(daemon: Dockerd, registry: RegistryProcess, hot: list[HotImage]) -> None:
    for image in hot:
        pulled = oci_client.pull(registry.url, f"library/{image.name}", TAG, ns=NS)
        check_pulled(pulled, daemon.image_id(f"{image.name}:{TAG}"), 2, f"warm-up pull of {image.name}")
        image.manifest_digest = pulled.digest
        image.blobs = {pulled.manifest["config"]["digest"]: 0} | pulled.blobs


def copy_to_distribution(registry: RegistryProcess, upstream: UpstreamRegistry, hot: list[HotImage]) -> None:
    """The same manifests and blobs, byte for byte, under library/NAME in distribution's registry."""
    for image in hot:
        skopeo(
            "copy", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false",
            f"docker://{registry.addr}/{image.name}:{TAG}",
            f"docker://{upstream.addr}/library/{image.name}:{TAG}",
        )  # fmt: skip


def wrk_paths(hot: list[HotImage]) -> list[str]:
    lines = [f"HEAD /v2/library/{image.name}/manifests/{TAG}?ns={NS}" for image in hot]
    lines += [f"GET /v2/library/{image.name}/blobs/{d}?ns={NS}" for image in hot for d in image.blobs]
    return lines


def check_paths(base: str, hot: list[HotImage], who: str) -> None:
    """Every request target of the load answers 200 with the expected digest or bytes."""
    for image in hot:
        head = oci_client.request(
            f"{base}/v2/library/{image.name}/manifests/{TAG}?ns={NS}",
            method="HEAD",
            headers={"Accept": oci_client.MANIFEST_ACCEPT},
        )
        digest = head.headers.get("docker-content-digest")
        if head.status != 200 or digest != image.manifest_digest:
            raise RuntimeError(f"{who}: HEAD {image.name}:{TAG} -> {head.status} {digest}")
        for blob in image.blobs:
            got = oci_client.request(f"{base}/v2/library/{image.name}/blobs/{blob}?ns={NS}")
            if got.status != 200 or f"sha256:{hashlib.sha256(got.body).hexdigest()}" != blob:
                raise RuntimeError(f"{who}: GET blob {blob} -> {got.status}, {len(got.body)} bytes")
            image.blobs[blob] = len(got.body)


# --------------------------------------------------------------------------- the load


@dataclass
class Target:
    """A registry under load: ours or distribution's."""

    registry: str
    url: str
    pid: int
    log_path: Path
    idle_fds: int = 0


@dataclass
class ColdPull:
    name: str
    seconds: float = 0.0
    started_at: float = 0.0
    blob_bytes: int = 0
    error: str = ""


@dataclass
class Run:
    label: str
    registry: str
    tool: str
    pid: int
    nofile_soft: int = 0
    load: dict[str, Any] = field(default_factory=dict)
    requests_per_s: float = 0.0
    mb_per_s: float = 0.0
    socket_errors: int = 0
    non_2xx: int = 0
    log_statuses: dict[str, int] = field(default_factory=dict)
    log_requests: int = 0
    server_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    client_cpu_seconds: float = 0.0
    dockerd_cpu_seconds: float = 0.0
    rss_before_mib: float = 0.0
    rss_max_mib: float = 0.0
    rss_after_mib: float = 0.0
    hwm_mib: float = 0.0
    fds_before: int = 0
    fds_max: int = 0
    fds_at_end: int = 0
    fds_after: int = 0
    fds_settle_seconds: float = 0.0
    listen_overflows: int = 0
    fd_kinds_before: dict[str, int] = field(default_factory=dict)
    fd_kinds_max: dict[str, int] = field(default_factory=dict)
    fd_kinds_at_end: dict[str, int] = field(default_factory=dict)
    fd_kinds_after: dict[str, int] = field(default_factory=dict)
    cold_pulls: list[ColdPull] = field(default_factory=list)
    cold_exports: int = 0
    export_seconds: list[float] = field(default_factory=list)
    trouble: list[str] = field(default_factory=list)


def run_wrk(args: argparse.Namespace, url: str, paths_file: Path, connections: int, seconds: float) -> str:
    argv = [
        require_binary("wrk"),
        "-c", str(connections), "-t", str(args.threads), "-d", f"{seconds:g}s",
        "--timeout", f"{args.timeout:g}s", "--latency",
        "-s", str(LUA_SCRIPT), url, "--", str(paths_file),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + args.timeout + 120)
    if proc.returncode != 0 or "K3RD-RESULT" not in proc.stdout:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def parse_wrk(text: str) -> dict[str, Any]:
    """wrk's figures (from load.lua's done()) in httpload's shape."""
    line = next(line for line in text.splitlines() if line.startswith("K3RD-RESULT "))
    found: dict[str, Any] = json.loads(line.removeprefix("K3RD-RESULT "))
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    duration = found["duration_us"] / 1e6
    return {
        "requests": found["requests"],
        "bytes": found["bytes"],
        "duration_s": duration,
        "requests_per_s": found["requests"] / duration,
        "errors": {k: found["errors"][k] for k in ("connect", "read", "write", "timeout")},
        "non_2xx": int(match.group(1)) if match else 0,
        "latency_us": found["latency_us"],
        "wrk_output": text,
    }


def run_load(
    args: argparse.Namespace, tool: str, url: str, paths_file: Path, connections: int, seconds: float
) -> dict[str, Any]:
    """One load run with ``tool``; the client's CPU time (its processes are our children) added."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    if tool == "wrk":
        result = parse_wrk(run_wrk(args, url, paths_file, connections, seconds))
    else:
        result = httpload.run(url, paths_file, connections, args.threads, seconds, args.timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["client_cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result


def percentiles_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000

    return {"count": len(ordered), "p50": at(50), "p90": at(90), "p99": at(99), "max": ordered[-1] * 1000}


def scan_log(text: str, ours: bool, targets: set[str], run: Run) -> None:
    """Statuses and server-side latency per kind (manifest, blob) of the load's requests; oddities."""
    statuses: collections.Counter[str] = collections.Counter()
    seconds: dict[str, list[float]] = {"manifest": [], "blob": []}
    for line in text.splitlines():
        if _TROUBLE.search(line):
            run.trouble.append(line.strip()[:400])
        match = (_OUR_ACCESS if ours else _DIST_DONE).search(line)
        if not match or match["path"] not in targets:
            continue
        statuses[match["status"]] += 1
        kind = "manifest" if "/manifests/" in match["path"] else "blob"
        if ours:
            seconds[kind].append(float(match["seconds"]))
        else:
            seconds[kind].append(float(match["duration"]) * _DIST_UNITS[match["unit"]])
    run.log_statuses = dict(sorted(statuses.items()))
    run.log_requests = sum(statuses.values())
    run.server_ms = {kind: percentiles_ms(values) for kind, values in seconds.items()}


def cold_pulls(registry: RegistryProcess, images: list[ColdImage], began: float) -> list[ColdPull]:
    """All at once, one thread each; returns when every pull ended."""
    results = [ColdPull(image.name) for image in images]

    def pull(image: ColdImage, result: ColdPull) -> None:
        result.started_at = time.monotonic() - began
        start = time.perf_counter()
        try:
            pulled = oci_client.pull(registry.url, f"library/{image.name}", TAG, ns=NS)
            check_pulled(pulled, image.image_id, 3, f"cold pull of {image.name}")
            result.blob_bytes = pulled.bytes
        except Exception as exc:  # reported, not raised: the load goes on
            result.error = f"{type(exc).__name__}: {exc}"[:500]
        result.seconds = time.perf_counter() - start

    threads = [
        threading.Thread(target=pull, args=(image, result), name=f"cold-{image.name}")
        for image, result in zip(images, results, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(COLD_TIMEOUT)
    for result, thread in zip(results, threads, strict=True):
        if thread.is_alive():
            result.error = f"still running after {COLD_TIMEOUT:.0f}s"
    return results


@dataclass
class Setup:
    paths_file: Path
    targets: set[str]
    dockerd_pid: int
    registry: RegistryProcess
    cold: list[ColdImage]


def measure(args: argparse.Namespace, label: str, tool: str, target: Target, setup: Setup, cold: bool) -> Run:
    pid = target.pid
    run = Run(label, target.registry, tool, pid, nofile_soft=nofile_limit(pid)[0])
    if args.warmup > 0:
        run_load(args, tool, target.url, setup.paths_file, min(100, args.connections), args.warmup)
    # Idle keep-alive connections of the warm-up (and, for ours, pooled ones to dockerd) close first.
    run.fds_before, _ = wait_fds(pid, target.idle_fds, SETTLE_TIMEOUT)
    run.fd_kinds_before = fd_kinds(pid)
    run.rss_before_mib = status_mib(pid, "VmRSS")
    mark = target.log_path.stat().st_size
    cpu0, dockerd_cpu0 = cpu_seconds(pid), cpu_seconds(setup.dockerd_pid)
    overflows0 = tcp_counters("ListenOverflows")["ListenOverflows"]
    log(
        f"{label}: {tool} -c {args.connections} -t {args.threads} -d {args.duration:g}s, {run.fds_before} fds"
    )
    began = time.monotonic()
    pulls: list[ColdPull] = []
    puller: threading.Thread | None = None
    if cold:

        def start_pulls() -> None:
            time.sleep(args.cold_delay)
            pulls.extend(cold_pulls(setup.registry, setup.cold, began))

        puller = threading.Thread(target=start_pulls, name="cold-pulls")
        puller.start()
    with Sampler(pid, SAMPLE_INTERVAL) as sampler:
        run.load = run_load(args, tool, target.url, setup.paths_file, args.connections, args.duration)
        run.fds_at_end = fd_count(pid)
        run.fd_kinds_at_end = fd_kinds(pid)
        if puller is not None:
            puller.join(COLD_TIMEOUT + args.cold_delay + 10)
    run.cold_pulls = pulls
    run.cpu_seconds = cpu_seconds(pid) - cpu0
    run.listen_overflows = tcp_counters("ListenOverflows")["ListenOverflows"] - overflows0
    run.dockerd_cpu_seconds = cpu_seconds(setup.dockerd_pid) - dockerd_cpu0
    run.client_cpu_seconds = run.load["client_cpu_s"]
    run.fds_max = max(sampler.max_fds, run.fds_at_end)
    run.fd_kinds_max = sampler.peak_fd_kinds
    run.rss_max_mib = sampler.max_rss_mib
    run.fds_after, run.fds_settle_seconds = wait_fds(pid, run.fds_before, SETTLE_TIMEOUT)
    run.fd_kinds_after = fd_kinds(pid)
    run.rss_after_mib = status_mib(pid, "VmRSS")
    run.hwm_mib = status_mib(pid, "VmHWM")
    run.requests_per_s = run.load["requests_per_s"]
    run.mb_per_s = run.load["bytes"] / 1e6 / run.load["duration_s"]
    run.socket_errors = sum(run.load["errors"].values())
    run.non_2xx = run.load["non_2xx"]
    text = read_log(target.log_path, mark)
    scan_log(text, target.registry == "ours", setup.targets, run)
    if cold:
        names = {f"docker.io/library/{image.name}:{TAG}" for image in setup.cold}
        run.cold_exports = sum(1 for m in EXPORTING.finditer(text) if m.group(1) in names)
        run.export_seconds = [float(m.group(2)) for m in _EXPORTED.finditer(text) if m.group(1) in names]
    log(
        f"{label}: {run.requests_per_s:.0f} req/s, p99 {run.load['latency_us']['p99'] / 1000:.1f} ms, "
        f"{run.socket_errors} socket errors, {run.non_2xx} non-2xx, fds {run.fds_before}/"
        f"{run.fds_max}/{run.fds_after}, RSS max {run.rss_max_mib:.0f} MiB"
    )
    return run


# --------------------------------------------------------------------------- report


def environment(daemon: Dockerd) -> dict[str, Any]:
    wrk = subprocess.run([require_binary("wrk"), "-v"], capture_output=True, text=True, check=False)
    registry = subprocess.run(
        [require_binary(UpstreamRegistry.binary), "--version"], capture_output=True, text=True, check=False
    )
    wrk_text = (wrk.stdout or wrk.stderr).strip()
    return {
        **machine(daemon),
        "distribution": registry.stdout.strip().rsplit(" ", 1)[-1],
        "wrk": wrk_text.splitlines()[0] if wrk_text else "",
    }


def _ms(run: Run, key: str, which: str = "latency_us") -> float:
    return float(run.load.get(which, {}).get(key, 0.0)) / 1000


def _pair(a: float | None, b: float | None, fmt: str = ".1f") -> str:
    return "/".join("-" if v is None else f"{v:{fmt}}" for v in (a, b))


def _server(run: Run, kind: str) -> str:
    found = run.server_ms.get(kind, {})
    return _pair(found.get("p50"), found.get("p99"))


def _kinds(kinds: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in kinds.items())


ROWS: list[tuple[str, Any]] = [
    ("requests/s", lambda r: f"{r.requests_per_s:.0f}"),
    ("MB/s of bodies received", lambda r: f"{r.mb_per_s:.0f}"),
    ("latency p50 / p90 ms", lambda r: _pair(_ms(r, "p50"), _ms(r, "p90"))),
    ("latency p99 / max ms", lambda r: _pair(_ms(r, "p99"), _ms(r, "max"), ".0f")),
    (
        "p99 ms HEAD manifest / GET blob",
        lambda r: (
            _pair(_ms(r, "p99", "latency_us_head"), _ms(r, "p99", "latency_us_get"))
            if "latency_us_head" in r.load
            else "-"
        ),
    ),
    ("socket errors c/r/w/timeout", lambda r: "/".join(str(v) for v in r.load["errors"].values())),
    ("non-2xx answers", lambda r: str(r.non_2xx)),
    ("non-2xx in the registry's log", lambda r: str(r.log_requests - r.log_statuses.get("200", 0))),
    ("server p50/p99 ms manifest", lambda r: _server(r, "manifest")),
    ("server p50/p99 ms blob", lambda r: _server(r, "blob")),
    ("registry CPU s", lambda r: f"{r.cpu_seconds:.1f}"),
    ("  per 10k requests", lambda r: f"{r.cpu_seconds / max(r.load['requests'], 1) * 1e4:.2f}"),
    ("client CPU s", lambda r: f"{r.client_cpu_seconds:.1f}"),
    ("dockerd CPU s", lambda r: f"{r.dockerd_cpu_seconds:.1f}"),
    (
        "RSS MiB before/max/after",
        lambda r: f"{r.rss_before_mib:.0f}/{r.rss_max_mib:.0f}/{r.rss_after_mib:.0f}",
    ),
    ("peak RSS MiB (VmHWM, so far)", lambda r: f"{r.hwm_mib:.0f}"),
    ("open fds before/max/after", lambda r: f"{r.fds_before}/{r.fds_max}/{r.fds_after}"),
    ("  s until back to before", lambda r: f"{r.fds_settle_seconds:.1f}"),
    ("open-files limit (soft)", lambda r: str(r.nofile_soft)),
    ("listen queue overflows (system)", lambda r: str(r.listen_overflows)),
]


def report(
    args: argparse.Namespace, env: dict[str, Any], hot: list[HotImage], runs: list[Run]
) -> tuple[dict[str, Any], list[str]]:
    by = {run.label: run for run in runs}
    blob_sizes = [size for image in hot for size in image.blobs.values()]
    width, col = 33, 16
    lines = [
        f"load: {args.connections} keep-alive connections, {args.threads} client processes/threads, "
        f"{args.duration:g}s per run (after {args.warmup:g}s at {min(100, args.connections)}), timeout "
        f"{args.timeout:g}s; {env['variant']} (Docker {env['docker_version']}, {env['docker_storage']}), "
        f"distribution {env['distribution']}, {env['cpus']} CPUs, load average at start "
        f"{' '.join(env['loadavg_at_start'])}",
        f"{len(hot)} images, {len(blob_sizes)} blobs ({min(blob_sizes) / 1024:.1f} KiB to "
        f"{max(blob_sizes) / 1024:.0f} KiB, mean {statistics.mean(blob_sizes) / 1024:.0f} KiB), all cached, "
        "the same bytes under the same paths in both registries",
        "httpload (bench/httpload.py): HEAD manifest by tag, GET blob, alternating; "
        "wrk: GET manifest by tag, GET blob (wrk cannot HEAD)",
        "",
        f"{'':<{width}}" + "".join(f"{run.label:>{col}}" for run in runs),
        f"{'':<{width}}" + "".join(f"{run.tool:>{col}}" for run in runs),
    ]
    for label, fn in ROWS:
        lines.append(f"{label:<{width}}" + "".join(f"{fn(run):>{col}}" for run in runs))

    def ratios(a: Run | None, b: Run | None) -> dict[str, float | None]:
        if a is None or b is None:
            return {}
        return {
            "requests_per_s": a.requests_per_s / b.requests_per_s if b.requests_per_s else None,
            "p50": _ms(a, "p50") / _ms(b, "p50") if _ms(b, "p50") else None,
            "p99": _ms(a, "p99") / _ms(b, "p99") if _ms(b, "p99") else None,
        }

    compared = {
        "ours / distribution (httpload, HEAD + GET)": ratios(by.get("ours"), by.get("distribution")),
        "ours / distribution (wrk, GET + GET)": ratios(by.get("ours wrk"), by.get("dist wrk")),
        "ours + cold pulls / distribution (httpload)": ratios(by.get("ours+cold"), by.get("distribution")),
    }
    lines.append("")
    for name, found in compared.items():
        if found:
            lines.append(
                f"{name}: " + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in found.items())
            )
    loaded = by.get("ours+cold")
    if loaded is not None:
        pulls = loaded.cold_pulls
        ok = [p for p in pulls if not p.error]
        secs = [p.seconds for p in ok] or [0.0]
        lines.append(
            f"cold pulls during the load: {len(ok)}/{len(pulls)} ok (every digest verified, config = "
            f"Docker's image ID), {sum(p.blob_bytes for p in ok) / MiB:.0f} MiB, "
            f"started {args.cold_delay:g}s in; "
            f"seconds min/median/max {min(secs):.1f}/{statistics.median(secs):.1f}/{max(secs):.1f}; "
            f"exports {loaded.cold_exports}"
            + (
                f", the registry's export time median {statistics.median(loaded.export_seconds):.1f}s"
                if loaded.export_seconds
                else ""
            )
        )
    lines.append("open fds by kind:")
    for run in runs:
        lines.append(f"  {run.label}: before: {_kinds(run.fd_kinds_before)}")
        lines.append(f"  {'':{len(run.label)}}  at max: {_kinds(run.fd_kinds_max)}")
        lines.append(f"  {'':{len(run.label)}}  after:  {_kinds(run.fd_kinds_after)}")
    odd = oddities(args, runs, bool(env.get("zero_copy")))
    lines.append(f"oddities: {len(odd)}")
    lines += [f"  ODD: {item}" for item in odd[:60]]
    data: dict[str, Any] = {
        "benchmark": "load",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "args": vars(args),
        "environment": env,
        "units": {"latency": "ms (µs where named _us)", "size": "MiB (2^20 bytes); MB/s in 10^6 bytes"},
        "hot_images": [asdict(image) for image in hot],
        "ratios": compared,
        "runs": [asdict(run) for run in runs],
        "oddities": odd,
    }
    return data, lines


def oddities(args: argparse.Namespace, runs: list[Run], zero_copy: bool) -> list[str]:
    """What went wrong or differently than expected; with zero-copy a cold pull exports nothing."""
    odd = []
    for run in runs:
        if run.socket_errors or run.non_2xx:
            odd.append(f"{run.label}: {run.load['errors']} socket errors, {run.non_2xx} non-2xx answers")
        if run.log_statuses.keys() - {"200"}:
            odd.append(f"{run.label}: statuses in the registry's log {run.log_statuses}")
        if run.fds_after > run.fds_before:
            odd.append(
                f"{run.label}: {run.fds_after} fds {run.fds_settle_seconds:.0f}s after the load, "
                f"{run.fds_before} before: {_kinds(run.fd_kinds_after)}"
            )
        if 0 < run.nofile_soft < args.connections + 100:
            odd.append(f"{run.label}: open-files limit {run.nofile_soft} for {args.connections} connections")
        odd += [f"{run.label}: cold pull of {p.name}: {p.error}" for p in run.cold_pulls if p.error]
        expected = 0 if zero_copy else len(run.cold_pulls)
        if run.cold_pulls and run.cold_exports != expected:
            odd.append(f"{run.label}: {run.cold_exports} exports for {len(run.cold_pulls)} cold pulls")
        odd += [f"{run.label}: log: {line}" for line in run.trouble[:20]]
    return odd


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=1000, help="keep-alive connections (default 1000)")
    parser.add_argument("--threads", type=int, default=2, help="client threads/processes (default 2)")
    parser.add_argument("--duration", type=float, default=20, help="seconds per run (default 20)")
    parser.add_argument("--warmup", type=float, default=3, help="seconds at 100 connections before each run")
    parser.add_argument(
        "--timeout", type=float, default=30, help="seconds a request may take before it counts as lost"
    )
    parser.add_argument(
        "--cold", type=int, default=20, help="concurrent cold pulls in the last run (0: none)"
    )
    parser.add_argument("--cold-delay", type=float, default=3, help="seconds into the run they start")
    parser.add_argument("--no-wrk", action="store_true", help="skip the two wrk runs (GET + GET)")
    parser.add_argument(
        "--nofile", type=int, default=65536, help="open-files limit of every process started (capped by hard)"
    )
    parser.add_argument(
        "--registry-nofile", type=int, default=None, help="a different limit for our registry (e.g. 1024)"
    )
    add_world_arguments(parser)
    args = parser.parse_args(argv)
    if args.connections < 1 or args.threads < 1 or args.duration <= 0 or args.cold < 0:
        parser.error("--connections, --threads and --duration must be positive, --cold >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begin()
    daemon: Dockerd | None = None
    registry: RegistryProcess | None = None
    upstream: UpstreamRegistry | None = None
    work: Path | None = None
    try:
        Dockerd.check_available(args.variant)
        UpstreamRegistry.check_available()
        require_binary("wrk")
        require_binary("skopeo")
        soft, hard = set_nofile(args.nofile)
        log(f"open-files limit {soft} (hard {hard}) for the clients and daemons")
        log(f"starting dockerd ({args.variant}), our registry and distribution's")
        daemon = Dockerd(args.variant).start()
        if args.registry_nofile:
            set_nofile(args.registry_nofile)
        registry = RegistryProcess(daemon.host, log_level="info").start(timeout=60)
        set_nofile(args.nofile)
        upstream = UpstreamRegistry().start()
        # The daemons' own PIDs (setpriv execs them): ManagedProcess keeps them; only ours has a property.
        dockerd_pid = checked_pid(daemon.pid, "dockerd")
        ours = Target(
            "ours", registry.url, checked_pid(registry.pid, "k3d_registry_dockerd"), registry.log_path
        )
        dist_pid = checked_pid(upstream.pid, "docker-registry")
        dist = Target("distribution", upstream.url, dist_pid, upstream.log_path)
        log(f"building {len(HOT_SIZES)} hot and {args.cold} cold images")
        hot = build_hot(daemon)
        cold = build_cold(daemon, args.cold)
        fill_ours(daemon, registry, hot)
        copy_to_distribution(registry, upstream, hot)
        check_paths(registry.url, hot, "ours")
        check_paths(upstream.url, hot, "distribution")
        work = make_temp_dir("load")
        paths = wrk_paths(hot)
        paths_file = work / "paths.txt"
        paths_file.write_text("\n".join(paths) + "\n")
        setup = Setup(paths_file, {line.split(" ", 1)[1] for line in paths}, dockerd_pid, registry, cold)
        # The level each registry's open fds return to when idle.
        time.sleep(1)
        for target in (ours, dist):
            target.idle_fds = fd_count(target.pid)
        env = {**environment(daemon), "zero_copy": daemon.zero_copy}
        plan = [("ours", "httpload", ours, False), ("distribution", "httpload", dist, False)]
        if not args.no_wrk:
            plan += [("ours wrk", "wrk", ours, False), ("dist wrk", "wrk", dist, False)]
        if args.cold:
            plan.append(("ours+cold", "httpload", ours, True))
        runs = [measure(args, label, tool, target, setup, cold) for label, tool, target, cold in plan]
        data, lines = report(args, env, hot, runs)
        write_results(args.results_dir, "load", data, lines)
        return 0
    except WorldUnavailable as exc:
        print(f"load: test world unavailable: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("load: interrupted, stopping daemons", file=sys.stderr)
        return 130
    finally:
        for closing in (registry, upstream, daemon):
            if closing is not None:
                with contextlib.suppress(Exception):
                    closing.close()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
