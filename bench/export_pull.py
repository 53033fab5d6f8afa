#!/usr/bin/env python3
"""Cold export and pull through k3d-registry-dockerd against a `docker save` baseline, in one run.

    python bench/export_pull.py [--size-mb 240] [--repeat 3] [--variant docker26]
    python bench/export_pull.py --variant docker28-containerd   # zero-copy, and the export path beside it
    python bench/export_pull.py --variant podman5               # Podman's storage in place (or podman: 4.3)
    python bench/export_pull.py --small-files 30000             # plus a layer of 30,000 small files

Starts a private dockerd or Podman (and a containerd "k3s node"), builds one deterministic image of
``--size-mb`` MiB (4 incompressible data layers + busybox, and with ``--small-files N`` a layer of N files of
256 B to 4 KiB: what the classic store's per-file reassembly costs), then measures, ``--repeat`` rounds,
interleaved (the order of the groups rotates every round, so machine noise and page-cache effects hit all of
them alike):

- ``docker save``: ``GET /images/{name}/get`` on the Engine API, read to the end (the floor of a cold export);
  and the same stream written to a new file in /tmp, like ``docker save -o`` (the registry has to store the
  bytes too; on some VMs page cache the guest has not used lately costs more than the rest of the export);
- client: a fresh registry (empty cache), then tests/world/oci_client.pull (manifest + all blobs in
  parallel, digests verified) cold, and again warm on the same registry;
- ctr: another fresh registry as the node's mirror for every registry (``certs.d/_default/hosts.toml``),
  ``ctr content fetch docker.io/library/IMAGE`` cold, then warm (node emptied, registry warm);
- export: where the pulls above are served in place (the containerd image store from its content store,
  the classic store and Podman's storage from their layer files and tar-split records), the client's cold and
  warm pulls again with ``--no-zero-copy``: the export path;
- ahead: where served in place, a fresh registry sees the image tagged (as after a build or pull), verifies
  its blobs where they lie ahead of any pull (its log says when), then the client's cold pull: what a node's
  first pull of a newly built image costs.

After each registry's runs its peak RSS (VmHWM from /proc/PID/status), its log (exports, warnings,
non-2xx answers) and the blob bytes in its cache dir (none expected when served in place) are read. Prints
a table and ratios, writes the numbers to bench/results/export_pull-TIMESTAMP.json. Only prints: no timing
assertions. Everything listens on loopback or unix sockets and is stopped at the end, also on Ctrl-C,
SIGTERM and exceptions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import re
import socket
import statistics
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common import (  # noqa: E402
    ACCESS,
    EXPORTING,
    TROUBLE,
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
from watch import status_mib  # noqa: E402

from tests.world import oci_client  # noqa: E402
from tests.world.daemons import (  # noqa: E402
    NO_ZERO_COPY,
    Containerd,
    RegistryProcess,
    WorldUnavailable,
    make_temp_dir,
    remove_tree,
    unix_http,
)
from tests.world.images import MiB, build_image  # noqa: E402

IMAGE_NAME = "k3rd-bench-export"
"""Tag in dockerd; the node pulls docker.io/library/k3rd-bench-export:TAG (mirror request, ns=docker.io)."""
DATA_LAYERS = 4
SEED = "export-pull"
SAVE_TIMEOUT = 900.0
CTR_TIMEOUT = 900.0
COLD_TARGET = 1.3
RSS_TARGET_MIB = 150.0

METRICS: dict[str, str] = {
    "docker_save": "docker save -> /dev/null",
    "docker_save_file": "docker save -o FILE (/tmp)",
    "client_cold": "pull, cold (fresh registry)",
    "client_warm": "pull, warm (cache filled)",
    "ctr_cold": "ctr content fetch, cold",
    "ctr_warm": "ctr content fetch, warm",
}
# Where the pulls above are served in place: the export path instead, and a cold pull verified ahead.
EXPORT_METRICS: dict[str, str] = {
    "export_cold": "pull, cold, export path",
    "export_warm": "pull, warm, export path",
    "ahead_cold": "pull, cold, verified ahead",
}
AHEAD_TIMEOUT = 900.0
VERIFIED_AHEAD = "ahead of its first pull"
IN_PLACE_TARGET = 1.2
GROUPS = ("docker_save", "client", "ctr")

_EXPORTED = re.compile(r"exported \S+ in ([0-9.]+)s: (\w+) layout, (\d+) new blobs, ([0-9.]+ \w+) written")


# --------------------------------------------------------------------------- measurements


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = str(socket_path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._socket_path)
        self.sock = sock


def docker_save(daemon: Daemon, ref: str, sink: IO[bytes] | None = None) -> tuple[float, int]:
    """Seconds and bytes of ``GET /images/{ref}/get`` read to the end (what `docker save` streams),
    written to `sink` if given."""
    conn = _UnixConnection(daemon.socket, timeout=SAVE_TIMEOUT)
    try:
        began = time.perf_counter()
        conn.request("GET", f"/images/{urllib.parse.quote(ref, safe=':/@')}/get")
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"docker save {ref}: {resp.status} {resp.read(500)!r}")
        size = 0
        while chunk := resp.read(1 << 20):
            size += len(chunk)
            if sink is not None:
                sink.write(chunk)
        if sink is not None:
            sink.flush()
        return time.perf_counter() - began, size
    finally:
        conn.close()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    result = fn()
    return time.perf_counter() - began, result


def registry_pid(registry: RegistryProcess) -> int:
    """PID of the registry's Python process (setpriv execs it, so it is the spawned PID); checked."""
    pid = registry.pid
    if pid is None:
        raise RuntimeError(f"{registry} is not running")
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    if b"k3d_registry_dockerd" not in cmdline or b"setpriv" in cmdline.split(b" ", 1)[0]:
        raise RuntimeError(f"pid {pid} is not the registry process: {cmdline!r}")
    return pid


@dataclass
class RegistryRun:
    """What one registry process did: peak RSS, exports and anything odd in its log."""

    role: str
    idle_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    exports_cold: int = 0
    exports_warm: int = 0
    export_seconds: list[float] = field(default_factory=list)
    export_lines: list[str] = field(default_factory=list)
    requests: int = 0
    non_2xx: list[str] = field(default_factory=list)
    trouble: list[str] = field(default_factory=list)
    cache_blob_bytes: int = 0


def log_size(registry: RegistryProcess) -> int:
    return registry.log_path.stat().st_size if registry.log_path.exists() else 0


def scan_log(run: RegistryRun, text: str, phase: str) -> None:
    exports = len(EXPORTING.findall(text))
    if phase == "cold":
        run.exports_cold += exports
    else:
        run.exports_warm += exports
    for line in text.splitlines():
        if match := _EXPORTED.search(line):
            run.export_seconds.append(float(match.group(1)))
            run.export_lines.append(line.strip())
        if match := ACCESS.search(line):
            run.requests += 1
            if not match["status"].startswith("2"):
                run.non_2xx.append(f"{phase}: {line.strip()}")
        if TROUBLE.search(line):
            run.trouble.append(f"{phase}: {line.strip()}")


@contextlib.contextmanager
def fresh_registry(
    daemon: Daemon, role: str, extra_args: tuple[str, ...] = ()
) -> Iterator[tuple[RegistryProcess, RegistryRun]]:
    """A registry with a new, empty cache dir; stopped and removed (cache included) afterwards."""
    registry = RegistryProcess(daemon.host, log_level="info", extra_args=extra_args)
    try:
        registry.start(timeout=60)
        run = RegistryRun(role, idle_rss_mib=status_mib(registry_pid(registry), "VmRSS"))
        yield registry, run
    finally:
        registry.close()


@dataclass
class Image:
    ref: str
    node_ref: str
    repository: str
    tag: str
    layers: int
    data_bytes: int
    manifest_digest: str = ""
    blob_bytes: int = 0
    save_bytes: int = 0
    digests: list[str] = field(default_factory=list)


@dataclass
class Round:
    number: int
    order: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    registries: list[RegistryRun] = field(default_factory=list)


def run_save(daemon: Daemon, image: Image, rnd: Round) -> None:
    seconds, size = docker_save(daemon, image.ref)
    if size != image.save_bytes:
        raise RuntimeError(f"docker save streamed {size} bytes, earlier {image.save_bytes}")
    rnd.seconds["docker_save"] = seconds
    # Like the registry's cache, a new directory in /tmp, removed afterwards.
    directory = make_temp_dir("save")
    try:
        with open(directory / "image.tar", "wb") as sink:
            rnd.seconds["docker_save_file"], _ = docker_save(daemon, image.ref, sink)
    finally:
        remove_tree(directory)


def check_pulled(image: Image, pulled: oci_client.Pulled, what: str) -> None:
    if pulled.digest != image.manifest_digest or pulled.bytes != image.blob_bytes:
        raise RuntimeError(
            f"{what}: got {pulled.digest} ({pulled.bytes} blob bytes), "
            f"expected {image.manifest_digest} ({image.blob_bytes})"
        )


def run_client(daemon: Daemon, image: Image, rnd: Round, *, export_path: bool = False) -> None:
    """Cold and warm pulls with the raw client; `export_path`: with zero-copy off (metrics export_*)."""
    role, args = ("export", NO_ZERO_COPY) if export_path else ("client", ())
    with fresh_registry(daemon, role, args) as (registry, run):
        pid = registry_pid(registry)

        def pull() -> oci_client.Pulled:
            return oci_client.pull(registry.url, image.repository, image.tag, ns="docker.io")

        for phase in ("cold", "warm"):
            mark = log_size(registry)
            seconds, pulled = timed(pull)
            check_pulled(image, pulled, f"{phase} pull")
            rnd.seconds[f"{role}_{phase}"] = seconds
            scan_log(run, read_log(registry.log_path, mark), phase)
        run.peak_rss_mib = status_mib(pid, "VmHWM")
        _, run.cache_blob_bytes = cache_blobs(registry)
        rnd.registries.append(run)


def run_ahead(daemon: Daemon, image: Image, rnd: Round) -> None:
    """A fresh registry sees the image tagged, verifies it ahead, then serves its first (cold) pull."""
    extra = f"{image.tag}-ahead-{rnd.number}"
    name = image.ref.rpartition(":")[0]
    with fresh_registry(daemon, "ahead") as (registry, run):
        pid = registry_pid(registry)
        mark = log_size(registry)
        engine(daemon, "POST", f"/images/{image.ref}/tag?repo={urllib.parse.quote(name)}&tag={extra}")
        began = time.monotonic()
        while VERIFIED_AHEAD not in read_log(registry.log_path, mark):
            if time.monotonic() - began > AHEAD_TIMEOUT:
                raise RuntimeError(f"{registry} did not verify {image.ref} ahead within {AHEAD_TIMEOUT:.0f}s")
            time.sleep(0.2)
        mark = log_size(registry)
        seconds, pulled = timed(
            lambda: oci_client.pull(registry.url, image.repository, image.tag, ns="docker.io")
        )
        check_pulled(image, pulled, "cold pull verified ahead")
        rnd.seconds["ahead_cold"] = seconds
        scan_log(run, read_log(registry.log_path, mark), "cold")
        run.peak_rss_mib = status_mib(pid, "VmHWM")
        _, run.cache_blob_bytes = cache_blobs(registry)
        rnd.registries.append(run)
    engine(daemon, "DELETE", f"/images/{name}:{extra}?noprune=1")


def engine(daemon: Daemon, method: str, path: str) -> None:
    status, body = unix_http(daemon.socket, method, path, timeout=60)
    if status >= 300:
        raise RuntimeError(f"{method} {path} on {daemon.name}: {status} {body[:300]!r}")


def run_ctr(daemon: Daemon, node: Containerd, image: Image, rnd: Round) -> None:
    with fresh_registry(daemon, "ctr") as (registry, run):
        pid = registry_pid(registry)
        node.set_mirror(registry.addr)
        for phase in ("cold", "warm"):
            node.clean()
            mark = log_size(registry)
            seconds, _ = timed(lambda: node.content_fetch(image.node_ref, check=True, timeout=CTR_TIMEOUT))
            missing = set(image.digests) - set(node.content())
            if missing:
                raise RuntimeError(f"ctr content fetch ({phase}) left out {sorted(missing)}")
            rnd.seconds[f"ctr_{phase}"] = seconds
            scan_log(run, read_log(registry.log_path, mark), phase)
        run.peak_rss_mib = status_mib(pid, "VmHWM")
        _, run.cache_blob_bytes = cache_blobs(registry)
        rnd.registries.append(run)
        node.clean()
        node.clear_mirrors()


# --------------------------------------------------------------------------- setup


def prepare_image(daemon: Daemon, size_mib: int, small_files: int) -> Image:
    tag = f"{size_mib}m" + (f"-{small_files}f" if small_files else "")
    ref = local_ref(daemon, IMAGE_NAME, tag)
    extra = f", a layer of {small_files} small files" if small_files else ""
    log(f"building {ref}: {DATA_LAYERS} data layers, {size_mib} MiB, + busybox{extra}")
    built = build_image(
        daemon, ref, layers=DATA_LAYERS, size=size_mib * MiB, seed=SEED, small_files=small_files
    )
    image = Image(
        ref=ref,
        node_ref=f"docker.io/library/{IMAGE_NAME}:{tag}",
        repository=f"library/{IMAGE_NAME}",
        tag=tag,
        layers=built.layer_count,
        data_bytes=built.data_bytes,
    )
    # Untimed warm-up: the baseline's first round should not pay for cold page cache alone.
    seconds, image.save_bytes = docker_save(daemon, ref)
    log(f"warm-up docker save: {image.save_bytes / MiB:.1f} MiB in {seconds:.2f}s")
    # The digests to expect, from a throwaway registry (not part of any measurement).
    with fresh_registry(daemon, "probe") as (registry, _):
        pulled = oci_client.pull(registry.url, image.repository, image.tag, ns="docker.io")
    image.manifest_digest = pulled.digest
    image.blob_bytes = pulled.bytes
    image.digests = [pulled.digest, *pulled.blobs]
    return image


def environment(daemon: Daemon, node: Containerd) -> dict[str, Any]:
    return {**machine(daemon), "node_containerd": node.version}


# --------------------------------------------------------------------------- report


def summary(rounds: list[Round], metrics: dict[str, str]) -> dict[str, dict[str, float]]:
    out = {}
    for key in metrics:
        values = [r.seconds[key] for r in rounds]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def paired(rounds: list[Round], key: str, base: str = "docker_save") -> dict[str, float]:
    """key / base of the same round: median and min over rounds."""
    ratios = [r.seconds[key] / r.seconds[base] for r in rounds]
    return {"median": statistics.median(ratios), "best": min(ratios)}


def report(
    args: argparse.Namespace, env: dict[str, Any], image: Image, rounds: list[Round], in_place: bool
) -> tuple[dict[str, Any], list[str]]:
    metrics = {**METRICS, **(EXPORT_METRICS if in_place else {})}
    stats = summary(rounds, metrics)
    keys = ["client_cold", "client_warm", "ctr_cold", "ctr_warm", *(["export_cold"] if in_place else [])]
    ratios = {key: paired(rounds, key) for key in keys}
    to_warm = {
        "client_cold": paired(rounds, "client_cold", "client_warm"),
        "ctr_cold": paired(rounds, "ctr_cold", "ctr_warm"),
        **(
            {
                "export_cold": paired(rounds, "export_cold", "client_warm"),
                "ahead_cold": paired(rounds, "ahead_cold", "client_warm"),
            }
            if in_place
            else {}
        ),
    }
    cold_exports = {"export": 1, "ahead": 0, "client": 0 if in_place else 1, "ctr": 0 if in_place else 1}
    to_file = {key: paired(rounds, key, "docker_save_file") for key in ("client_cold", "ctr_cold")}
    warm_mib_s = [image.blob_bytes / MiB / r.seconds["client_warm"] for r in rounds]
    save_mib_s = [image.save_bytes / MiB / r.seconds["docker_save"] for r in rounds]
    runs = [run for r in rounds for run in r.registries]
    peak_rss = max(run.peak_rss_mib for run in runs)
    export_s = [s for run in runs for s in run.export_seconds]
    odd = [
        f"{run.role} registry, round {r.number}: {problem}"
        for r in rounds
        for run in r.registries
        for problem in (
            (
                [f"{run.exports_cold} exports in the cold run (expected {cold_exports[run.role]})"]
                if run.exports_cold != cold_exports[run.role]
                else []
            )
            + ([f"{run.exports_warm} exports in the warm run (expected 0)"] if run.exports_warm else [])
            + run.non_2xx
            + run.trouble
        )
    ]

    lines = [
        f"export_pull: {env['variant']} (Docker {env['docker_version']}, API {env['docker_api']}, "
        f"{env['docker_storage']}), node containerd {env['node_containerd']}, {env['cpus']} CPUs, "
        f"Linux {env['kernel']}",
        f"image {image.node_ref}: {image.layers} layers, {image.blob_bytes / MiB:.1f} MiB of blobs "
        f"(docker save stream {image.save_bytes / MiB:.1f} MiB); {len(rounds)} round(s), order rotated",
        "",
        f"{'seconds':<34}{'median':>9}{'min':>9}{'max':>9}",
    ]
    for key, label in metrics.items():
        s = stats[key]
        lines.append(f"{label:<34}{s['median']:>9.2f}{s['min']:>9.2f}{s['max']:>9.2f}")

    def row(label: str, median: float, best: float, fmt: str = ".2f", note: str = "") -> str:
        return f"{label:<34}{median:>9{fmt}}{best:>9{fmt}}{note}"

    def ratio_row(label: str, key: str, note: str = "") -> str:
        return row(label, ratios[key]["median"], ratios[key]["best"], note=note)

    def file_row(label: str, key: str) -> str:
        return row(label, to_file[key]["median"], to_file[key]["best"])

    lines += [
        "",
        f"{'ratios (per round, paired)':<34}{'median':>9}{'best':>9}",
        ratio_row("cold pull / docker save", "client_cold", f"   target <= {COLD_TARGET}"),
        ratio_row("ctr cold / docker save", "ctr_cold"),
        ratio_row("ctr warm / docker save", "ctr_warm"),
        ratio_row("warm pull / docker save", "client_warm"),
        file_row("cold pull / docker save -o FILE", "client_cold"),
        file_row("ctr cold / docker save -o FILE", "ctr_cold"),
        *([ratio_row("export-path cold / docker save", "export_cold")] if in_place else []),
        "",
        f"{'cold / warm (per round, paired)':<34}{'median':>9}{'best':>9}",
        row(
            "cold pull / warm pull",
            to_warm["client_cold"]["median"],
            to_warm["client_cold"]["best"],
            note=f"   target <= {IN_PLACE_TARGET} (in place)" if in_place else "",
        ),
        row("ctr cold / ctr warm", to_warm["ctr_cold"]["median"], to_warm["ctr_cold"]["best"]),
        *(
            [
                row(
                    "cold, verified ahead / warm pull",
                    to_warm["ahead_cold"]["median"],
                    to_warm["ahead_cold"]["best"],
                    note=f"   target <= {IN_PLACE_TARGET}",
                ),
                row(
                    "export-path cold / warm pull",
                    to_warm["export_cold"]["median"],
                    to_warm["export_cold"]["best"],
                ),
            ]
            if in_place
            else []
        ),
        "",
        f"{'MiB/s':<34}{'median':>9}{'best':>9}",
        row("warm pull (blob bytes / time)", statistics.median(warm_mib_s), max(warm_mib_s), ".0f"),
        row("docker save (stream bytes / time)", statistics.median(save_mib_s), max(save_mib_s), ".0f"),
        "",
        f"registry peak RSS (VmHWM, cold + warm): {peak_rss:.1f} MiB, max of {len(runs)} registry runs"
        f"   target <= {RSS_TARGET_MIB:.0f} at 1 GiB",
    ]
    for role in ("client", "ctr", *(["export", "ahead"] if in_place else [])):
        mine = [run for run in runs if run.role == role]
        lines.append(
            f"  {role:<7} peak {', '.join(f'{run.peak_rss_mib:.1f}' for run in mine)}"
            f"   idle after start {', '.join(f'{run.idle_rss_mib:.1f}' for run in mine)}"
        )
    lines.append(
        "cache dir blob bytes after cold + warm: "
        + ", ".join(f"{run.role} {run.cache_blob_bytes / MiB:.1f} MiB" for run in runs if run.role != "probe")
    )
    lines.append(
        "exports per registry (cold/warm): "
        + ", ".join(f"{run.role} {run.exports_cold}/{run.exports_warm}" for run in runs)
        + (f"; registry's own export time median {statistics.median(export_s):.2f}s" if export_s else "")
    )
    lines.append(f"registry log: {sum(run.requests for run in runs)} requests, {len(odd)} oddities")
    lines += [f"  ODD: {item}" for item in odd[:40]]

    data: dict[str, Any] = {
        "benchmark": "export_pull",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "args": vars(args),
        "environment": env,
        "image": {k: v for k, v in asdict(image).items() if k != "digests"},
        "units": {"time": "seconds", "size": "MiB (2^20 bytes)"},
        "summary_seconds": stats,
        "ratios_to_docker_save": ratios,
        "ratios_to_docker_save_file": to_file,
        "ratios_cold_to_warm": to_warm,
        "in_place": in_place,
        "warm_pull_mib_s": {"median": statistics.median(warm_mib_s), "best": max(warm_mib_s)},
        "docker_save_mib_s": {"median": statistics.median(save_mib_s), "best": max(save_mib_s)},
        "peak_rss_mib": peak_rss,
        "targets": {
            "cold_over_save": COLD_TARGET,
            "peak_rss_mib_at_1GiB": RSS_TARGET_MIB,
            "in_place_cold_over_warm": IN_PLACE_TARGET,
        },
        "oddities": odd,
        "rounds": [asdict(r) for r in rounds],
    }
    return data, lines


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=240, help="image data size in MiB (default 240)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of all measurements (default 3)")
    parser.add_argument(
        "--small-files", type=int, default=0, help="add a layer of this many small files (default none)"
    )
    add_world_arguments(parser, podman=True)
    args = parser.parse_args(argv)
    if args.size_mb < 1 or args.repeat < 1 or args.small_files < 0:
        parser.error("--size-mb and --repeat must be >= 1, --small-files >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begin()
    daemon: Daemon | None = None
    node: Containerd | None = None
    try:
        Containerd.check_available()
        log(f"starting {args.variant} and the containerd node")
        daemon = start_daemon(args.variant)
        node = Containerd().start()
        image = prepare_image(daemon, args.size_mb, args.small_files)
        env = environment(daemon, node)
        rounds: list[Round] = []
        in_place = served_in_place(daemon)
        groups = (*GROUPS, "export", "ahead") if in_place else GROUPS
        metrics = {**METRICS, **(EXPORT_METRICS if in_place else {})}
        for number in range(1, args.repeat + 1):
            shift = (number - 1) % len(groups)
            rnd = Round(number, [*groups[shift:], *groups[:shift]])
            for group in rnd.order:
                if group == "docker_save":
                    run_save(daemon, image, rnd)
                elif group in ("client", "export"):
                    run_client(daemon, image, rnd, export_path=group == "export")
                elif group == "ahead":
                    run_ahead(daemon, image, rnd)
                else:
                    run_ctr(daemon, node, image, rnd)
            rounds.append(rnd)
            log(
                f"round {number}/{args.repeat}: "
                + ", ".join(f"{key} {rnd.seconds[key]:.2f}s" for key in metrics)
                + ", peak RSS "
                + "/".join(f"{run.peak_rss_mib:.0f}" for run in rnd.registries)
                + " MiB"
            )
        data, lines = report(args, env, image, rounds, in_place)
        write_results(args.results_dir, "export_pull", data, lines)
        return 0
    except WorldUnavailable as exc:
        print(f"export_pull: test world unavailable: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export_pull: interrupted, stopping daemons", file=sys.stderr)
        return 130
    finally:
        for closing in (node, daemon):
            if closing is not None:
                with contextlib.suppress(Exception):
                    closing.close()


if __name__ == "__main__":
    sys.exit(main())
