#!/usr/bin/env python3
"""1,000 keep-alive connections of manifest HEADs and blob GETs, against distribution's registry, in one run.

    python bench/load.py [--connections 1000] [--threads 2] [--duration 20] [--cold 20]
    python bench/load.py --in-place [--loop asyncio,uvloop] [--code ../main] [--big-mb 200]

Starts a private dockerd (or Podman's service), k3d-registry-dockerd and Debian's distribution registry
(2.8), builds small deterministic images, pulls the "hot" ones through our registry (cache filled) and copies
them from it into distribution with ``skopeo copy --preserve-digests``, so both serve the same bytes under
the same paths. Then the load (bench/httpload.py: HEAD manifest by tag, GET blob, on every keep-alive
connection; wrk, which cannot HEAD, as a cross-check with GETs only) runs:

- ours: our registry, nothing else going on;
- distribution: the same load on distribution's registry (the baseline);
- ours + cold pulls: our registry again, and a few seconds in, ``--cold`` concurrent cold pulls
  (tests/world/oci_client.pull with ns=docker.io, every digest verified) of different images only the
  daemon has, so every one is an export from Docker while the load runs (where not served in place).

``--in-place`` compares, in one run against one daemon, our registry serving the daemon's store in place
(the default) with one serving the same image from its cache (``--no-zero-copy``: one export fills it) and
with distribution holding the same bytes: ``--connections`` and ``--connections-low`` keep-alive connections
GETting one ~410 KiB layer, then the mixed load above; then ``--big-gets`` sequential GETs of a
``--big-mb`` MiB layer by one client hashing what it receives. ``--loop`` runs our registries on other event
loops (bench/loop_launch.py), ``--code DIR`` adds registries run from another checkout's ``src``; each
(loop, code) gets its own pair. It proves the in-place registries served in place (no export in their log,
no blob in their cache dir, no image save in the daemon's events once the caches were filled).

Per run: requests/s, latency percentiles (client side; and per request kind from the registry's own log,
server side), a probe's latency (GET /v2/ every 0.1 s on a connection of its own: queueing in the registry),
errors (socket errors, timeouts, non-2xx answers), the registry's CPU time (and per GiB of bodies sent), RSS
sampled during the run and its peak in the run (VmHWM, reset before it), threads and open fds before, during
(max) and after (waiting until the fds return to the level before). Prints tables with ratios against the
baselines of the same run and writes bench/results/load[-in-place]-TIMESTAMP.json. Only prints: no
assertions on timings. Everything listens on loopback or unix sockets and is stopped at the end, also on
Ctrl-C, SIGTERM and exceptions.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import hashlib
import http.client
import importlib.util
import json
import math
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpload  # noqa: E402
from common import (  # noqa: E402
    EXPORTING,
    Daemon,
    add_world_arguments,
    begin,
    cache_blobs,
    local_ref,
    log,
    machine,
    read_log,
    served_in_place,
    start_daemon,
    write_results,
)
from loop_launch import LINE as LOOP_LINE  # noqa: E402
from loop_launch import LOOPS  # noqa: E402
from watch import (  # noqa: E402
    Sampler,
    checked_pid,
    cpu_seconds,
    fd_count,
    fd_kinds,
    nofile_limit,
    reset_peak_rss,
    set_nofile,
    status_mib,
    tcp_counters,
    threads,
    wait_fds,
)

from tests.world import oci_client  # noqa: E402
from tests.world.daemons import (  # noqa: E402
    NO_ZERO_COPY,
    Dockerd,
    RegistryProcess,
    UpstreamRegistry,
    WorldUnavailable,
    make_temp_dir,
    require_binary,
)
from tests.world.images import MiB, build_image, skopeo  # noqa: E402

LUA_SCRIPT = Path(__file__).resolve().parent / "load.lua"
LAUNCHER = Path(__file__).resolve().parent / "loop_launch.py"
HOT_SIZES = (8 * 1024, 128 * 1024, 512 * 1024, 2 * MiB)
"""Data bytes of each hot image (2 layers each, no busybox): blobs of 4 KiB to 1 MiB plus the configs."""
HOT_NAME = "k3rd-load-hot-{}"
COLD_NAME = "k3rd-load-cold-{:02d}"
LAYER_NAME = "k3rd-load-layer"
LAYER_BYTES = 410 * 1024
"""The one data layer --in-place GETs under load: the size issue 27 measured with."""
BIG_NAME = "k3rd-load-big"
TAG = "1"
NS = "docker.io"
GiB = 1024 * MiB
SETTLE_TIMEOUT = 60.0
"""How long to wait for the open fds to return to the level before a run (idle keep-alive connections to
dockerd expire after 15 s in aiohttp's client)."""
SAMPLE_INTERVAL = 0.25
PROBE_EVERY = 0.1
COLD_TIMEOUT = 600.0
# Issue 27's targets for serving in place, printed beside what was measured.
CACHE_RATIO_TARGET = 1.0
RSS_TARGET_MIB = 150.0
THREADS_SLACK = 8
"""Threads a run may add and still count as flat: a bounded pool's, not one per connection."""
BIG_TARGET = 0.75

_OUR_ACCESS = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) -?\d+ (?P<seconds>[0-9.]+)s '
)
_DIST_DONE = re.compile(
    r"http\.request\.method=(?P<method>[A-Z]+) .*?http\.request\.uri=\"?(?P<path>[^\s\"]+)\"? .*?"
    r"http\.response\.duration=\"?(?P<duration>[0-9.]+)(?P<unit>ns|µs|us|ms|s)\"? "
    r"http\.response\.status=(?P<status>\d{3})"
)
_DIST_UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
_TROUBLE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback|Exception ignored|level=(error|fatal|panic)")
_EXPORTED = re.compile(r"exported (\S+) in ([0-9.]+)s")
# What differs between log lines that say the same: their time, digests, clients' ports.
_SAME = re.compile(r"^\d{4}-\d\d-\d\d [0-9:,.]+ |(?<=sha256:)[0-9a-f]{64}|(?<=127\.0\.0\.1:)\d+")


# --------------------------------------------------------------------------- content


@dataclass
class LoadImage:
    name: str
    """Repository in the daemon (docker.io/library/NAME); clients ask for library/NAME with ns=docker.io."""
    data_bytes: int
    layers: int = 2
    manifest_digest: str = ""
    blobs: dict[str, int] = field(default_factory=dict)
    """Config and layers, digest -> size."""

    @property
    def top_layer(self) -> str:
        return list(self.blobs)[-1]


@dataclass
class ColdImage:
    name: str
    image_id: str
    data_bytes: int


def build_hot(daemon: Daemon) -> list[LoadImage]:
    images = []
    for i, size in enumerate(HOT_SIZES):
        name = HOT_NAME.format(i)
        build_image(
            daemon, local_ref(daemon, name, TAG), layers=2, size=size, seed=f"load-hot-{i}", busybox=False
        )
        images.append(LoadImage(name, size))
    return images


def build_one_layer(daemon: Daemon, name: str, size: int) -> LoadImage:
    """An image of one layer of ``size`` seeded bytes (no busybox), for the GETs of --in-place."""
    build_image(daemon, local_ref(daemon, name, TAG), layers=1, size=size, seed=name, busybox=False)
    return LoadImage(name, size, layers=1)


def build_cold(daemon: Daemon, count: int) -> list[ColdImage]:
    """``count`` images of 2 data layers + busybox (1.9 MiB), ~5 to ~20 MiB each, no blob shared but
    busybox's."""
    images = []
    for i in range(count):
        data = (3 + (15 * i) // max(count - 1, 1)) * MiB
        name = COLD_NAME.format(i)
        built = build_image(daemon, local_ref(daemon, name, TAG), layers=2, size=data, seed=f"load-cold-{i}")
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


def fill_ours(daemon: Daemon, registry: RegistryProcess, images: list[LoadImage]) -> None:
    """One pull of each image (an export on the export path, the first verification in place); every
    registry must serve the same manifest and blobs."""
    for image in images:
        pulled = oci_client.pull(registry.url, f"library/{image.name}", TAG, ns=NS)
        image_id = daemon.image_id(local_ref(daemon, image.name, TAG))
        check_pulled(pulled, image_id, image.layers, f"{registry}: warm-up pull of {image.name}")
        if image.manifest_digest and (pulled.digest, list(pulled.blobs)) != (
            image.manifest_digest,
            list(image.blobs),
        ):
            raise RuntimeError(
                f"{registry} serves {image.name} as {pulled.digest}, another as {image.manifest_digest}"
            )
        image.manifest_digest = pulled.digest
        image.blobs = pulled.blobs


def copy_to_distribution(
    registry: RegistryProcess, upstream: UpstreamRegistry, images: list[LoadImage]
) -> None:
    """The same manifests and blobs, byte for byte, under library/NAME in distribution's registry."""
    for image in images:
        skopeo(
            "copy", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false",
            f"docker://{registry.addr}/{image.name}:{TAG}",
            f"docker://{upstream.addr}/library/{image.name}:{TAG}",
        )  # fmt: skip


def request_lines(images: list[LoadImage]) -> list[str]:
    """The mixed load: HEAD of each manifest by tag, then GET of each blob (configs included)."""
    lines = [f"HEAD /v2/library/{image.name}/manifests/{TAG}?ns={NS}" for image in images]
    lines += [f"GET /v2/library/{image.name}/blobs/{d}?ns={NS}" for image in images for d in image.blobs]
    return lines


def blob_path(image: LoadImage) -> str:
    return f"/v2/library/{image.name}/blobs/{image.top_layer}?ns={NS}"


def check_paths(base: str, images: list[LoadImage], who: str) -> None:
    """Every request target of the load answers 200 with the expected digest or bytes."""
    for image in images:
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
    """A registry under load: ours (in place or from its cache, on an event loop) or distribution's."""

    registry: str
    url: str
    pid: int
    log_path: Path
    ours: bool = True
    variant: str = ""
    """Event loop and code of ours in --in-place (``uvloop @main``)."""
    process: RegistryProcess | None = None
    idle_fds: int = 0

    @property
    def label(self) -> str:
        return f"{self.registry} {self.variant}".strip()


@dataclass
class Workload:
    """What one load run sends: the request lines (httpload's and load.lua's paths file), and over how
    many connections."""

    name: str
    paths_file: Path
    connections: int

    @property
    def targets(self) -> set[str]:
        return {line.split(" ", 1)[1] for line in self.paths_file.read_text().splitlines() if line}


def workload(work: Path, name: str, lines: list[str], connections: int) -> Workload:
    paths_file = work / f"{name.replace(' ', '-')}.txt"
    paths_file.write_text("\n".join(lines) + "\n")
    return Workload(name, paths_file, connections)


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
    workload: str = ""
    connections: int = 0
    variant: str = ""
    nofile_soft: int = 0
    load: dict[str, Any] = field(default_factory=dict)
    requests_per_s: float = 0.0
    mb_per_s: float = 0.0
    socket_errors: int = 0
    non_2xx: int = 0
    log_statuses: dict[str, int] = field(default_factory=dict)
    log_requests: int = 0
    server_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    probe_ms: dict[str, float] = field(default_factory=dict)
    probe_errors: int = 0
    cpu_seconds: float = 0.0
    client_cpu_seconds: float = 0.0
    daemon_cpu_seconds: float = 0.0
    rss_before_mib: float = 0.0
    rss_max_mib: float = 0.0
    rss_after_mib: float = 0.0
    hwm_mib: float = 0.0
    """Peak RSS during the run: VmHWM, reset just before it."""
    threads_before: int = 0
    threads_max: int = 0
    threads_after: int = 0
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

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx

    @property
    def cpu_per_gib(self) -> float | None:
        sent = self.load.get("bytes", 0) / GiB
        return self.cpu_seconds / sent if sent else None


def run_wrk(args: argparse.Namespace, url: str, paths_file: Path, connections: int, seconds: float) -> str:
    # wrk takes whole seconds only.
    argv = [
        require_binary("wrk"),
        "-c", str(connections), "-t", str(args.threads), "-d", f"{max(1, math.ceil(seconds))}s",
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
    lines = text.splitlines()
    for at, line in enumerate(lines):
        if line.startswith("Traceback"):
            # The exception a traceback ends with says more than its first line.
            raised = next((later for later in lines[at + 1 :] if later and not later[0].isspace()), "")
            run.trouble.append(f"Traceback: {raised.strip()[:400]}")
        elif _TROUBLE.search(line):
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


class Prober:
    """GET /v2/ every PROBE_EVERY seconds on a keep-alive connection of its own while a load runs: how long
    a request that waits for nothing else takes to be answered, i.e. the queueing in front of every handler
    (a starved event loop shows here first)."""

    def __init__(self, url: str, timeout: float) -> None:
        parsed = urllib.parse.urlsplit(url)
        self._host, self._port = parsed.hostname or "127.0.0.1", parsed.port
        self._timeout = timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
        self.seconds: list[float] = []
        self.errors = 0

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.wait(PROBE_EVERY):
            began = time.perf_counter()
            try:
                conn = conn or http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
                conn.request("GET", "/v2/")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise http.client.HTTPException(f"status {resp.status}")
                self.seconds.append(time.perf_counter() - began)
            except (OSError, http.client.HTTPException):
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(self._timeout + 10)


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
    daemon_pid: int
    registry: RegistryProcess | None = None
    """Where the cold pulls go."""
    cold: list[ColdImage] = field(default_factory=list)


def measure(
    args: argparse.Namespace,
    tool: str,
    target: Target,
    load: Workload,
    setup: Setup,
    *,
    label: str = "",
    cold: bool = False,
) -> Run:
    pid = target.pid
    label = label or target.label
    run = Run(
        label, target.registry, tool, pid, load.name, load.connections, target.variant, nofile_limit(pid)[0]
    )
    if args.warmup > 0:
        run_load(args, tool, target.url, load.paths_file, min(100, load.connections), args.warmup)
    # Idle keep-alive connections of the warm-up (and, for ours, pooled ones to the daemon) close first.
    run.fds_before, _ = wait_fds(pid, target.idle_fds, SETTLE_TIMEOUT)
    run.fd_kinds_before = fd_kinds(pid)
    run.rss_before_mib = status_mib(pid, "VmRSS")
    run.threads_before = threads(pid)
    mark = target.log_path.stat().st_size
    cpu0, daemon_cpu0 = cpu_seconds(pid), cpu_seconds(setup.daemon_pid)
    overflows0 = tcp_counters("ListenOverflows")["ListenOverflows"]
    reset_peak_rss(pid)
    log(
        f"{label}: {load.name}, {tool} -c {load.connections} -t {args.threads} -d {args.duration:g}s, "
        f"{run.fds_before} fds"
    )
    began = time.monotonic()
    pulls: list[ColdPull] = []
    puller: threading.Thread | None = None
    if cold and setup.registry is not None:
        registry = setup.registry

        def start_pulls() -> None:
            time.sleep(args.cold_delay)
            pulls.extend(cold_pulls(registry, setup.cold, began))

        puller = threading.Thread(target=start_pulls, name="cold-pulls")
        puller.start()
    with Sampler(pid, SAMPLE_INTERVAL) as sampler, Prober(target.url, args.timeout) as prober:
        run.load = run_load(args, tool, target.url, load.paths_file, load.connections, args.duration)
        run.fds_at_end = fd_count(pid)
        run.fd_kinds_at_end = fd_kinds(pid)
        if puller is not None:
            puller.join(COLD_TIMEOUT + args.cold_delay + 10)
    run.hwm_mib = status_mib(pid, "VmHWM")
    run.cold_pulls = pulls
    run.cpu_seconds = cpu_seconds(pid) - cpu0
    run.listen_overflows = tcp_counters("ListenOverflows")["ListenOverflows"] - overflows0
    run.daemon_cpu_seconds = cpu_seconds(setup.daemon_pid) - daemon_cpu0
    run.client_cpu_seconds = run.load["client_cpu_s"]
    run.probe_ms, run.probe_errors = percentiles_ms(prober.seconds), prober.errors
    run.fds_max = max(sampler.max_fds, run.fds_at_end)
    run.fd_kinds_max = sampler.peak_fd_kinds
    run.rss_max_mib = sampler.max_rss_mib
    run.threads_max = sampler.max_threads
    run.fds_after, run.fds_settle_seconds = wait_fds(pid, run.fds_before, SETTLE_TIMEOUT)
    run.fd_kinds_after = fd_kinds(pid)
    run.rss_after_mib = status_mib(pid, "VmRSS")
    run.threads_after = threads(pid)
    run.requests_per_s = run.load["requests_per_s"]
    run.mb_per_s = run.load["bytes"] / 1e6 / run.load["duration_s"]
    run.socket_errors = sum(run.load["errors"].values())
    run.non_2xx = run.load["non_2xx"]
    text = read_log(target.log_path, mark)
    scan_log(text, target.ours, load.targets, run)
    if cold:
        names = {f"docker.io/library/{image.name}:{TAG}" for image in setup.cold}
        run.cold_exports = sum(1 for m in EXPORTING.finditer(text) if m.group(1) in names)
        run.export_seconds = [float(m.group(2)) for m in _EXPORTED.finditer(text) if m.group(1) in names]
    log(
        f"{label}: {run.requests_per_s:.0f} req/s, p99 {run.load['latency_us']['p99'] / 1000:.1f} ms, "
        f"{run.socket_errors} socket errors, {run.non_2xx} non-2xx, fds {run.fds_before}/"
        f"{run.fds_max}/{run.fds_after}, threads {run.threads_before}/{run.threads_max}/{run.threads_after}, "
        f"peak RSS {run.hwm_mib:.0f} MiB"
    )
    return run


# --------------------------------------------------------------------------- a large blob, warm


@dataclass
class BlobGets:
    """Sequential GETs of one large layer from one registry, each hashed by the client."""

    label: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    peak_rss_mib: float = 0.0
    bytes: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu_seconds / (self.bytes * len(self.seconds) / GiB)


def big_gets(targets: list[Target], image: LoadImage, rounds: int) -> list[BlobGets]:
    """One untimed GET from each registry, then ``rounds`` rounds of one GET from each, the order rotated
    every round so that noise from the rest of the machine hits all alike."""
    name, digest = f"library/{image.name}", image.top_layer
    results = [BlobGets(target.label) for target in targets]
    for target in targets:
        oci_client.fetch_blob(target.url, name, digest, NS)
    pairs = list(zip(targets, results, strict=True))
    for number in range(rounds):
        shift = number % len(pairs)
        for target, result in pairs[shift:] + pairs[:shift]:
            reset_peak_rss(target.pid)
            cpu0 = cpu_seconds(target.pid)
            began = time.perf_counter()
            result.bytes = oci_client.fetch_blob(target.url, name, digest, NS)
            result.seconds.append(time.perf_counter() - began)
            result.cpu_seconds += cpu_seconds(target.pid) - cpu0
            result.peak_rss_mib = max(result.peak_rss_mib, status_mib(target.pid, "VmHWM"))
    for result in results:
        log(f"{image.name} from {result.label}: median {result.median:.3f}s, min {min(result.seconds):.3f}s")
    return results


# --------------------------------------------------------------------------- report


def environment(daemon: Daemon) -> dict[str, Any]:
    wrk = subprocess.run([require_binary("wrk"), "-v"], capture_output=True, text=True, check=False)
    registry = subprocess.run(
        [require_binary(UpstreamRegistry.binary), "--version"], capture_output=True, text=True, check=False
    )
    wrk_text = (wrk.stdout or wrk.stderr).strip()
    return {
        **machine(daemon),
        "distribution": registry.stdout.strip().rsplit(" ", 1)[-1],
        "wrk": wrk_text.splitlines()[0] if wrk_text else "",
        "in_place": served_in_place(daemon),
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


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _x(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else f"{value:{fmt}}"


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
    ("probe GET /v2/ p50/p99 ms", lambda r: _pair(r.probe_ms.get("p50"), r.probe_ms.get("p99"))),
    ("registry CPU s", lambda r: f"{r.cpu_seconds:.1f}"),
    ("  per 10k requests", lambda r: f"{r.cpu_seconds / max(r.load['requests'], 1) * 1e4:.2f}"),
    ("  per GiB of bodies sent", lambda r: _x(r.cpu_per_gib)),
    ("client CPU s", lambda r: f"{r.client_cpu_seconds:.1f}"),
    ("daemon CPU s", lambda r: f"{r.daemon_cpu_seconds:.1f}"),
    (
        "RSS MiB before/max/after",
        lambda r: f"{r.rss_before_mib:.0f}/{r.rss_max_mib:.0f}/{r.rss_after_mib:.0f}",
    ),
    ("peak RSS MiB (VmHWM, this run)", lambda r: f"{r.hwm_mib:.0f}"),
    ("threads before/max/after", lambda r: f"{r.threads_before}/{r.threads_max}/{r.threads_after}"),
    ("open fds before/max/after", lambda r: f"{r.fds_before}/{r.fds_max}/{r.fds_after}"),
    ("  s until back to before", lambda r: f"{r.fds_settle_seconds:.1f}"),
    ("open-files limit (soft)", lambda r: str(r.nofile_soft)),
    ("listen queue overflows (system)", lambda r: str(r.listen_overflows)),
]
WIDTH, COLUMN = 33, 16


def table(runs: list[Run], headers: list[list[str]]) -> list[str]:
    cells = [[fn(run) for run in runs] for _, fn in ROWS]
    col = max([COLUMN, *(len(text) + 2 for row in [*headers, *cells] for text in row)])
    lines = [f"{'':<{WIDTH}}" + "".join(f"{h:>{col}}" for h in row) for row in headers]
    for (label, _), row in zip(ROWS, cells, strict=True):
        lines.append(f"{label:<{WIDTH}}" + "".join(f"{text:>{col}}" for text in row))
    return lines


def _name(run: Run, runs: list[Run]) -> str:
    """The run's label, with its load and tool where several loads ran."""
    return run.label if len({r.workload for r in runs}) < 2 else f"{run.label} ({run.workload}, {run.tool})"


def fd_lines(runs: list[Run]) -> list[str]:
    lines = ["open fds by kind:"]
    for run in runs:
        name = _name(run, runs)
        lines.append(f"  {name}: before: {_kinds(run.fd_kinds_before)}")
        lines.append(f"  {'':{len(name)}}  at max: {_kinds(run.fd_kinds_max)}")
        lines.append(f"  {'':{len(name)}}  after:  {_kinds(run.fd_kinds_after)}")
    return lines


def report(
    args: argparse.Namespace, env: dict[str, Any], hot: list[LoadImage], runs: list[Run]
) -> tuple[dict[str, Any], list[str]]:
    by = {run.label: run for run in runs}
    blob_sizes = [size for image in hot for size in image.blobs.values()]
    lines = [
        f"load: {args.connections} keep-alive connections, {args.threads} client processes/threads, "
        f"{args.duration:g}s per run (after {args.warmup:g}s at {min(100, args.connections)}), timeout "
        f"{args.timeout:g}s; {env['variant']} (Docker {env['docker_version']}, {env['docker_storage']}), "
        f"distribution {env['distribution']}, {env['cpus']} CPUs, load average at start "
        f"{' '.join(env['loadavg_at_start'])}",
        f"{len(hot)} images, {len(blob_sizes)} blobs ({min(blob_sizes) / 1024:.1f} KiB to "
        f"{max(blob_sizes) / 1024:.0f} KiB, mean {statistics.mean(blob_sizes) / 1024:.0f} KiB), all cached, "
        "the same bytes under the same paths in both registries",
        "httpload (bench/httpload.py): the 4 manifest HEADs by tag, then the 12 blob GETs, in turn; "
        "wrk: GET manifest by tag, GET blob (wrk cannot HEAD)",
        f"our registry: {env['our_registry']}",
        "",
        *table(runs, [[run.label for run in runs], [run.tool for run in runs]]),
    ]

    def ratios(a: Run | None, b: Run | None) -> dict[str, float | None]:
        if a is None or b is None:
            return {}
        return {
            "requests_per_s": _ratio(a.requests_per_s, b.requests_per_s),
            "p50": _ratio(_ms(a, "p50"), _ms(b, "p50")),
            "p99": _ratio(_ms(a, "p99"), _ms(b, "p99")),
        }

    compared = {
        "ours / distribution (httpload, HEAD + GET)": ratios(by.get("ours"), by.get("distribution")),
        "ours / distribution (wrk, GET + GET)": ratios(by.get("ours wrk"), by.get("dist wrk")),
        "ours + cold pulls / distribution (httpload)": ratios(by.get("ours+cold"), by.get("distribution")),
    }
    lines.append("")
    for name, found in compared.items():
        if found:
            lines.append(f"{name}: " + ", ".join(f"{k} {_x(v)}" for k, v in found.items()))
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
    lines += fd_lines(runs)
    odd = oddities(runs, args.connections, bool(env.get("in_place")))
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


def oddities(runs: list[Run], connections: int, in_place: bool) -> list[str]:
    """What went wrong or differently than expected; served in place a cold pull exports nothing."""
    odd = []
    for run in runs:
        name = _name(run, runs)
        if run.socket_errors or run.non_2xx:
            odd.append(f"{name}: {run.load['errors']} socket errors, {run.non_2xx} non-2xx answers")
        if run.log_statuses.keys() - {"200"}:
            odd.append(f"{name}: statuses in the registry's log {run.log_statuses}")
        if run.probe_errors:
            odd.append(f"{name}: {run.probe_errors} probes of GET /v2/ failed")
        if run.fds_after > run.fds_before:
            odd.append(
                f"{name}: {run.fds_after} fds {run.fds_settle_seconds:.0f}s after the load, "
                f"{run.fds_before} before: {_kinds(run.fd_kinds_after)}"
            )
        if 0 < run.nofile_soft < connections + 100:
            odd.append(f"{name}: open-files limit {run.nofile_soft} for {connections} connections")
        odd += [f"{name}: cold pull of {p.name}: {p.error}" for p in run.cold_pulls if p.error]
        expected = 0 if in_place else len(run.cold_pulls)
        if run.cold_pulls and run.cold_exports != expected:
            odd.append(f"{name}: {run.cold_exports} exports for {len(run.cold_pulls)} cold pulls")
        alike = collections.Counter(
            _SAME.sub(lambda m: "…" if m.start() else "", line) for line in run.trouble
        )
        odd += [f"{name}: log ({count}x): {line}" for line, count in alike.most_common(10)]
    return odd


# --------------------------------------------------------------------------- --in-place


@dataclass
class Ours:
    """Our registries on one event loop and code: serving in place, and from the cache."""

    variant: str
    loop: str
    code: Path | None
    in_place: Target
    cache: Target
    started_as: str = ""
    """What loop_launch.py said: the loop, whether it has sendfile, the code's path."""


Groups = dict[tuple[str, str], list[Run]]
"""Runs by (workload, tool): one table each."""


def find(groups: Groups, key: tuple[str, str], registry: str, variant: str = "") -> Run | None:
    return next((r for r in groups.get(key, []) if (r.registry, r.variant) == (registry, variant)), None)


def ratio_lines(groups: Groups, ours: list[Ours]) -> tuple[list[str], dict[str, dict[str, float | None]]]:
    """requests/s of in place, cache and distribution against each other, per load and (loop, code)."""
    compared: dict[str, dict[str, float | None]] = {}
    for key in groups:
        dist = find(groups, key, "distribution")
        for o in ours:
            place, cache = find(groups, key, "in place", o.variant), find(groups, key, "cache", o.variant)
            rps = [r.requests_per_s if r else None for r in (place, cache, dist)]
            found = {
                "in_place_over_cache": _ratio(rps[0], rps[1]),
                "in_place_over_distribution": _ratio(rps[0], rps[2]),
                "cache_over_distribution": _ratio(rps[1], rps[2]),
            }
            compared[f"{key[0]} ({key[1]}), {o.variant}"] = found
    width = max(len(name) for name in [*compared, "requests/s ratios (same load, same run)"]) + 2
    lines = [
        f"{'requests/s ratios (same load, same run)':<{width}}{'in place/cache':>16}{'in place/dist':>16}"
        f"{'cache/dist':>12}"
    ]
    for name, found in compared.items():
        values = [_x(value) for value in found.values()]
        lines.append(f"{name:<{width}}{values[0]:>16}{values[1]:>16}{values[2]:>12}")
    return lines, compared


def target_lines(args: argparse.Namespace, groups: Groups, ours: list[Ours]) -> list[str]:
    """Issue 27's targets for serving in place, beside what the layer loads at --connections measured."""
    lines = [f"targets for in place, layer GET at {args.connections} connections (issue 27):"]
    for key, group in groups.items():
        if not key[0].startswith("layer") or group[0].connections != args.connections:
            continue
        for o in ours:
            place, cache = find(groups, key, "in place", o.variant), find(groups, key, "cache", o.variant)
            if place is None or cache is None:
                continue
            ratio = _ratio(place.requests_per_s, cache.requests_per_s)
            threads = f"{place.threads_before}/{place.threads_max}/{place.threads_after}"
            checks = [
                (f"{_x(ratio)}x cache (>= {CACHE_RATIO_TARGET:g})", (ratio or 0) >= CACHE_RATIO_TARGET),
                (
                    f"peak RSS {place.hwm_mib:.0f} MiB (<= {RSS_TARGET_MIB:.0f})",
                    place.hwm_mib <= RSS_TARGET_MIB,
                ),
                (
                    f"threads {threads} (flat: max <= before + {THREADS_SLACK})",
                    place.threads_max <= place.threads_before + THREADS_SLACK,
                ),
                (f"errors {place.errors} (0)", place.errors == 0),
            ]
            marks = "; ".join(f"{text} {'met' if ok else 'MISSED'}" for text, ok in checks)
            lines.append(f"  {key[1]}, {o.variant}: {marks}")
    return lines


def variant_lines(groups: Groups, ours: list[Ours]) -> list[str]:
    """Each other (loop, code) against the first (asyncio on this checkout's code, unless told otherwise):
    requests/s, and the server-side p50 of manifests and blobs."""
    if len(ours) < 2:
        return []
    base = ours[0]

    def p50s(run: Run) -> str:
        return "/".join(_x(run.server_ms.get(kind, {}).get("p50"), ".1f") for kind in ("manifest", "blob"))

    lines = [f"against {base.variant}: requests/s ratio (server p50 ms manifest/blob, then {base.variant}'s)"]
    for o in ours[1:]:
        for key in groups:
            parts = []
            for registry in ("in place", "cache"):
                mine, theirs = (
                    find(groups, key, registry, o.variant),
                    find(groups, key, registry, base.variant),
                )
                if mine and theirs:
                    rps = _x(_ratio(mine.requests_per_s, theirs.requests_per_s))
                    parts.append(f"{registry} {rps}x ({p50s(mine)}, {p50s(theirs)})")
            lines.append(f"  {o.variant}, {key[0]} ({key[1]}): " + "; ".join(parts))
    return lines


def big_lines(args: argparse.Namespace, image: LoadImage, big: list[BlobGets], ours: list[Ours]) -> list[str]:
    dist = big[-1]
    size = image.blobs[image.top_layer]
    width = max(len(result.label) for result in big) + 2
    lines = [
        f"{args.big_mb} MiB layer ({size:,} bytes), warm: {args.big_gets} sequential GETs by one client "
        "hashing what it receives, after one untimed GET each, order rotated each round",
        f"{'':<{width}}{'median s':>10}{'min s':>10}{'x dist':>8}{'MiB/s':>8}{'CPU s/GiB':>11}"
        f"{'peak RSS MiB':>14}",
    ]
    for result in big:
        lines.append(
            f"{result.label:<{width}}{result.median:>10.3f}{min(result.seconds):>10.3f}"
            f"{result.median / dist.median:>8.2f}{size / MiB / result.median:>8.0f}"
            f"{result.cpu_per_gib:>11.2f}{result.peak_rss_mib:>14.0f}"
        )
    by = {result.label: result for result in big}
    for o in ours:
        place, cache = by[o.in_place.label], by[o.cache.label]
        ratio = place.median / dist.median
        lines.append(
            f"  {o.variant}: in place / distribution {ratio:.2f} (target <= {BIG_TARGET}: "
            f"{'met' if ratio <= BIG_TARGET else 'MISSED'}), in place / cache "
            f"{place.median / cache.median:.2f}, cache / distribution {cache.median / dist.median:.2f}"
        )
    return lines


def in_place_report(
    args: argparse.Namespace,
    env: dict[str, Any],
    ours: list[Ours],
    images: dict[str, LoadImage],
    runs: list[Run],
    big: list[BlobGets],
    proof: tuple[list[str], list[str]],
) -> tuple[dict[str, Any], list[str]]:
    layer = images[LAYER_NAME]
    lines = [
        f"load --in-place: {env['variant']} ({env['docker_version']}, {env['docker_storage']}), distribution "
        f"{env['distribution']}, {env['cpus']} CPUs, load average at start "
        f"{' '.join(env['loadavg_at_start'])}; "
        f"{args.duration:g}s per run after {args.warmup:g}s at 100 connections, {args.threads} client "
        f"processes, timeout {args.timeout:g}s",
        f"layer: library/{LAYER_NAME}:{TAG}'s one layer, {layer.blobs[layer.top_layer]:,} bytes; mixed: "
        f"{len(HOT_SIZES)} hot images, HEAD manifest by tag and GET blob; the same bytes under the same "
        "paths on every registry",
        "our registries:",
        *(f"  {o.variant}: {o.started_as}" for o in ours),
    ]
    groups: Groups = {}
    for run in runs:
        groups.setdefault((run.workload, run.tool), []).append(run)
    for (name, tool), group in groups.items():
        lines += ["", f"== {name} ({tool}) =="]
        lines += table(group, [[run.registry for run in group], [run.variant for run in group]])
    ratios, compared = ratio_lines(groups, ours)
    lines += ["", *ratios, "", *target_lines(args, groups, ours)]
    if len(ours) > 1:
        lines += ["", *variant_lines(groups, ours)]
    if big:
        lines += ["", *big_lines(args, images[BIG_NAME], big, ours)]
    served, odd = proof
    lines += ["", "served in place:", *(f"  {line}" for line in served), *fd_lines(runs)]
    odd = odd + oddities(runs, args.connections, True)
    lines.append(f"oddities: {len(odd)}")
    lines += [f"  ODD: {item}" for item in odd[:60]]
    data: dict[str, Any] = {
        "benchmark": "load --in-place",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "args": vars(args),
        "environment": env,
        "units": {"latency": "ms (µs where named _us)", "size": "MiB (2^20 bytes); MB/s in 10^6 bytes"},
        "registries": [
            {
                "variant": o.variant,
                "loop": o.loop,
                "code": str(o.code or REPO_ROOT / "src"),
                "started_as": o.started_as,
            }
            for o in ours
        ],
        "images": {name: asdict(image) for name, image in images.items()},
        "ratios": compared,
        "big_blob": [asdict(result) for result in big],
        "served_in_place": served,
        "runs": [asdict(run) for run in runs],
        "oddities": odd,
    }
    return data, lines


def start_ours(
    args: argparse.Namespace,
    daemon: Daemon,
    started: list[Any],
    *,
    loop: str | None = None,
    code: Path | None = None,
    extra_args: tuple[str, ...] = (),
) -> RegistryProcess:
    """Our registry (log level info, as deployed) on ``loop`` (through loop_launch.py) from ``code``
    (a src dir; this checkout's by default), with --registry-nofile if given; put in ``started`` to be
    closed at the end."""
    registry = RegistryProcess(
        daemon.host,
        log_level="info",
        extra_args=extra_args,
        env={"PYTHONPATH": str(code)} if code else None,
        launcher=(str(LAUNCHER), loop, "--") if loop else ("-m", "k3d_registry_dockerd"),
    )
    started.append(registry)
    if args.registry_nofile:
        set_nofile(args.registry_nofile)
    try:
        registry.start(timeout=60)
    finally:
        set_nofile(args.nofile)
    return registry


def target_of(registry: RegistryProcess, name: str, variant: str = "") -> Target:
    needle = LAUNCHER.name if str(LAUNCHER) in registry.launcher else "k3d_registry_dockerd"
    pid = checked_pid(registry.pid, needle)
    return Target(name, registry.url, pid, registry.log_path, variant=variant, process=registry)


def started_as(registry: RegistryProcess) -> str:
    text = registry.log_path.read_text(errors="replace")
    return next((line.split(LOOP_LINE, 1)[1].strip() for line in text.splitlines() if LOOP_LINE in line), "?")


def code_dir(text: str) -> Path:
    """A checkout, or its src: the directory holding the package k3d_registry_dockerd."""
    path = Path(text).resolve()
    for candidate in (path / "src", path):
        if (candidate / "k3d_registry_dockerd" / "__init__.py").is_file():
            return candidate
    raise argparse.ArgumentTypeError(f"no k3d_registry_dockerd package in {path} or {path / 'src'}")


def code_version(code: Path) -> str:
    """The commit a src dir's checkout is at, and whether src/ changed since (what a before/after run
    compares is often uncommitted)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(code), *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "not a git checkout"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "--", ".") else "")


def in_place_proof(
    daemon: Daemon, ours: list[Ours], images: list[LoadImage], filling: float, filled: float
) -> tuple[list[str], list[str]]:
    """Whether the in-place registries served in place (no export in their log, no blob in their cache
    dir, no image save by the daemon since the caches were filled: each cache registry exported each image
    once, before, which the daemon's events must show), and oddities where not."""
    proof, odd = [], []
    for o in ours:
        for target, expected in ((o.in_place, 0), (o.cache, len(images))):
            assert target.process is not None
            exports = len(EXPORTING.findall(target.log_path.read_text(errors="replace")))
            files, size = cache_blobs(target.process)
            proof.append(
                f"{target.label}: {exports} exports in its log, {files} blob files ({size / MiB:.1f} MiB) in "
                "its cache dir"
            )
            if exports != expected or (expected == 0 and files):
                odd.append(
                    f"{target.label}: {exports} exports (expected {expected}), {files} blob files cached"
                )
    saves, expected = daemon.image_saves(filled), len(images) * len(ours)
    filling_saves = len(daemon.image_saves(filling)) - len(saves)
    proof.append(
        f"{daemon.name}'s events: {filling_saves} image saves while the caches filled (expected {expected}), "
        f"{len(saves)} since"
    )
    if saves or filling_saves != expected:
        odd.append(
            f"{daemon.name} saved {filling_saves} images filling the caches, {len(saves)} after: {saves[:5]}"
        )
    return proof, odd


def start_variants(args: argparse.Namespace, daemon: Daemon, started: list[Any]) -> list[Ours]:
    """A pair of our registries (in place, --no-zero-copy) per event loop, for this checkout's code and
    --code's."""
    ours = []
    for code in [None, *([args.code] if args.code else [])]:
        for loop in args.loop:
            variant = loop + (f" @{(code.parent if code.name == 'src' else code).name}" if code else "")
            log(f"starting our registries on {variant}: in place, and --no-zero-copy")
            place = start_ours(args, daemon, started, loop=loop, code=code)
            cache = start_ours(args, daemon, started, loop=loop, code=code, extra_args=NO_ZERO_COPY)
            ours.append(
                Ours(
                    variant,
                    loop,
                    code,
                    target_of(place, "in place", variant),
                    target_of(cache, "cache", variant),
                    f"{started_as(place)} ({code_version(code or REPO_ROOT / 'src')})",
                )
            )
    return ours


def run_in_place(
    args: argparse.Namespace, daemon: Daemon, upstream: UpstreamRegistry, work: Path, started: list[Any]
) -> tuple[dict[str, Any], list[str]]:
    if not served_in_place(daemon):
        raise WorldUnavailable(f"{args.variant} is not served in place: --in-place needs another --variant")
    big = f" and a {args.big_mb} MiB one" if args.big_mb else ""
    log(f"building {len(HOT_SIZES)} hot images, a layer of {LAYER_BYTES // 1024} KiB{big}")
    hot = build_hot(daemon)
    layer = build_one_layer(daemon, LAYER_NAME, LAYER_BYTES)
    small = [*hot, layer]
    images = [*small, *([build_one_layer(daemon, BIG_NAME, args.big_mb * MiB)] if args.big_mb else [])]
    ours = start_variants(args, daemon, started)
    log("filling the caches (one export per image) and verifying in place (one pull each)")
    filling = time.time()
    for o in ours:
        for target in (o.in_place, o.cache):
            assert target.process is not None
            fill_ours(daemon, target.process, images)
    filled = time.time()
    assert ours[0].cache.process is not None
    copy_to_distribution(ours[0].cache.process, upstream, images)
    dist_pid = checked_pid(upstream.pid, "docker-registry")
    targets = [t for o in ours for t in (o.in_place, o.cache)]
    targets.append(Target("distribution", upstream.url, dist_pid, upstream.log_path, ours=False))
    for target in targets:
        check_paths(target.url, small, target.label)
    # The level each registry's open fds return to when idle.
    time.sleep(1)
    for target in targets:
        target.idle_fds = fd_count(target.pid)
    layer_get = [f"GET {blob_path(layer)}"]
    loads = [workload(work, f"layer GET x{args.connections}", layer_get, args.connections)]
    if args.connections_low:
        loads.append(workload(work, f"layer GET x{args.connections_low}", layer_get, args.connections_low))
    loads.append(workload(work, f"mixed HEAD+GET x{args.connections}", request_lines(hot), args.connections))
    setup = Setup(checked_pid(daemon.pid, "dockerd" if isinstance(daemon, Dockerd) else "podman"))
    runs = []
    for load in loads:
        wrk = not args.no_wrk and load.name.startswith("layer")
        for tool in ("httpload", *(["wrk"] if wrk else [])):
            runs += [measure(args, tool, target, load, setup) for target in targets]
    gets = big_gets(targets, images[-1], args.big_gets) if args.big_mb else []
    proof = in_place_proof(daemon, ours, images, filling, filled)
    by_name = {image.name: image for image in images}
    return in_place_report(args, environment(daemon), ours, by_name, runs, gets, proof)


# --------------------------------------------------------------------------- against distribution


def run_against_distribution(
    args: argparse.Namespace, daemon: Daemon, upstream: UpstreamRegistry, work: Path, started: list[Any]
) -> tuple[dict[str, Any], list[str]]:
    """The default: our registry, distribution's, and ours again while cold pulls run."""
    loop = args.loop[0] if args.loop != ["asyncio"] else None
    registry = start_ours(args, daemon, started, loop=loop, code=args.code)
    ours = target_of(registry, "ours")
    dist = Target(
        "distribution",
        upstream.url,
        checked_pid(upstream.pid, "docker-registry"),
        upstream.log_path,
        ours=False,
    )
    log(f"building {len(HOT_SIZES)} hot and {args.cold} cold images")
    hot = build_hot(daemon)
    cold = build_cold(daemon, args.cold)
    fill_ours(daemon, registry, hot)
    copy_to_distribution(registry, upstream, hot)
    check_paths(registry.url, hot, "ours")
    check_paths(upstream.url, hot, "distribution")
    load = workload(work, "mixed", request_lines(hot), args.connections)
    daemon_pid = checked_pid(daemon.pid, "dockerd" if isinstance(daemon, Dockerd) else "podman")
    setup = Setup(daemon_pid, registry, cold)
    # The level each registry's open fds return to when idle.
    time.sleep(1)
    for target in (ours, dist):
        target.idle_fds = fd_count(target.pid)
    env = {
        **environment(daemon),
        "our_registry": f"{started_as(registry) if loop else 'python -m k3d_registry_dockerd'} "
        f"({code_version(args.code or REPO_ROOT / 'src')})",
    }
    plan = [("ours", "httpload", ours, False), ("distribution", "httpload", dist, False)]
    if not args.no_wrk:
        plan += [("ours wrk", "wrk", ours, False), ("dist wrk", "wrk", dist, False)]
    if args.cold:
        plan.append(("ours+cold", "httpload", ours, True))
    runs = [
        measure(args, tool, target, load, setup, label=label, cold=cold) for label, tool, target, cold in plan
    ]
    return report(args, env, hot, runs)


# --------------------------------------------------------------------------- main


def loops(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in LOOPS:
            raise argparse.ArgumentTypeError(f"unknown event loop {name!r}; known: {', '.join(LOOPS)}")
        if name != "asyncio" and importlib.util.find_spec(name) is None:
            raise argparse.ArgumentTypeError(
                f"{name} is not installed for {sys.executable} (zuvloop needs Python >= 3.14)"
            )
    return names


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
        "--cold",
        type=int,
        default=20,
        help="concurrent cold pulls in the last run (0: none; not with --in-place)",
    )
    parser.add_argument("--cold-delay", type=float, default=3, help="seconds into the run they start")
    parser.add_argument(
        "--no-wrk", action="store_true", help="skip the wrk runs (the cross-check of httpload)"
    )
    parser.add_argument(
        "--nofile", type=int, default=65536, help="open-files limit of every process started (capped by hard)"
    )
    parser.add_argument(
        "--registry-nofile", type=int, default=None, help="a different limit for our registry (e.g. 1024)"
    )
    parser.add_argument(
        "--in-place",
        action="store_true",
        help="ours serving in place against ours from its cache (--no-zero-copy) and distribution",
    )
    parser.add_argument(
        "--connections-low",
        type=int,
        default=200,
        help="--in-place: a second layer load (default 200; 0: none)",
    )
    parser.add_argument(
        "--big-mb",
        type=int,
        default=200,
        help="--in-place: MiB of the large layer GET warm (default 200; 0: none)",
    )
    parser.add_argument("--big-gets", type=int, default=5, help="--in-place: timed GETs of it per registry")
    parser.add_argument(
        "--loop",
        type=loops,
        default=["asyncio"],
        help=f"event loops of our registries, comma-separated ({', '.join(LOOPS)}; default asyncio); several "
        "only with --in-place",
    )
    parser.add_argument(
        "--code",
        type=code_dir,
        help="run our registry from this checkout's src (with --in-place: beside this checkout's)",
    )
    add_world_arguments(parser, podman=True)
    args = parser.parse_args(argv)
    if args.connections < 1 or args.threads < 1 or args.duration <= 0 or args.cold < 0:
        parser.error("--connections, --threads and --duration must be positive, --cold >= 0")
    if args.connections_low < 0 or args.big_mb < 0 or args.big_gets < 1:
        parser.error("--connections-low and --big-mb must be >= 0, --big-gets >= 1")
    if not args.in_place and len(args.loop) > 1:
        parser.error("several --loop values need --in-place")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begin()
    started: list[Any] = []
    """Every service started, closed in reverse order at the end."""
    work: Path | None = None
    try:
        UpstreamRegistry.check_available()
        require_binary("wrk")
        require_binary("skopeo")
        soft, hard = set_nofile(args.nofile)
        log(f"open-files limit {soft} (hard {hard}) for the clients and daemons")
        log(f"starting {args.variant} and distribution's registry")
        daemon = start_daemon(args.variant)
        started.append(daemon)
        upstream = UpstreamRegistry()
        started.append(upstream)
        upstream.start()
        work = make_temp_dir("load")
        if args.in_place:
            data, lines = run_in_place(args, daemon, upstream, work, started)
        else:
            data, lines = run_against_distribution(args, daemon, upstream, work, started)
        write_results(args.results_dir, "load-in-place" if args.in_place else "load", data, lines)
        return 0
    except WorldUnavailable as exc:
        print(f"load: test world unavailable: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("load: interrupted, stopping daemons", file=sys.stderr)
        return 130
    finally:
        for service in reversed(started):
            with contextlib.suppress(Exception):
                service.close()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
