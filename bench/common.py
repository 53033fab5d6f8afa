"""What every benchmark here shares: progress lines, the machine's description, stopping on SIGTERM and
writing the results JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

try:
    import k3d_registry_dockerd  # noqa: F401  (what the benchmarks run; tests.world needs it too)
except ImportError as missing:
    sys.exit(
        f"bench: {missing.name} is not installed for {sys.executable}: run `pip install .` in the checkout "
        "first, or use .venv/bin/python, which ./scripts/test sets up"
    )

from tests.world.daemons import VARIANTS, Dockerd, Podman, RegistryProcess, sweep_stale_dirs

Daemon = Dockerd | Podman
PODMAN_RELEASES = {"podman": "4", "podman5": "5"}
"""--variant names of Podman's service, and their releases."""

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Lines of our registry's log the benchmarks count.
ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ')
EXPORTING = re.compile(r"exporting (\S+) from Docker \(export #\d+\)")
TROUBLE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def begin(*, needs_root: bool = True) -> None:
    """SIGTERM unwinds like Ctrl-C, so the `finally` that stops the daemons runs; what a killed run left
    behind goes first. Without root (private dockerds need it) the run ends with one line."""
    if needs_root and os.geteuid() != 0:
        sys.exit("bench: the benchmarks start private dockerds, which need root: run this as root")
    signal.signal(signal.SIGTERM, _terminate)
    for path in sweep_stale_dirs():
        log(f"removed {path}, left behind by a killed run")


def add_world_arguments(parser: argparse.ArgumentParser, *, podman: bool = False) -> None:
    parser.add_argument(
        "--variant",
        default="docker26",
        choices=[*sorted(VARIANTS), *(["podman", "podman5"] if podman else [])],
        help="private dockerd (default docker26)" + (", or Podman 4.3's or 5's service" if podman else ""),
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")


def start_daemon(variant: str) -> Daemon:
    """A private dockerd of the variant, or Podman's service (raises WorldUnavailable when not installed)."""
    release = PODMAN_RELEASES.get(variant)
    if release:
        Podman.check_available(release)
        return Podman(release=release).start()
    Dockerd.check_available(variant)
    return Dockerd(variant).start()


def served_in_place(daemon: Daemon) -> bool:
    """Whether a registry started with no store settings serves this daemon's layers where they lie
    (Podman's storage is set to overlay by the world, read in place like Docker's classic store)."""
    return isinstance(daemon, Podman) or daemon.zero_copy


def local_ref(daemon: Daemon, name: str, tag: str) -> str:
    """The name to build ``name:tag`` under so that docker.io/library/NAME:TAG finds it: Docker's short
    names are docker.io/library's, Podman keeps the name as given."""
    return f"docker.io/library/{name}:{tag}" if isinstance(daemon, Podman) else f"{name}:{tag}"


def cache_blobs(registry: RegistryProcess) -> tuple[int, int]:
    """Files and bytes of the blobs in the registry's cache dir: what it copied out of the daemon."""
    blobs = registry.cache_dir / "blobs"
    files = [path for path in blobs.rglob("*") if path.is_file()] if blobs.exists() else []
    return len(files), sum(path.stat().st_size for path in files)


def proc_meminfo_mib(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def machine(daemon: Any) -> dict[str, Any]:
    """The daemon under test (a tests.world.daemons Dockerd or Podman) and the machine, for the results
    JSON."""
    return {
        "variant": daemon.name,
        "docker_version": daemon.version,
        "docker_api": daemon.api_version,
        "docker_storage": daemon.driver,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mem_total_mib": proc_meminfo_mib("MemTotal"),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def read_log(path: Path, since: int) -> str:
    """A log file from byte offset `since` on: what a run added."""
    with open(path, "rb") as f:
        f.seek(since)
        return f.read().decode(errors="replace")


def write_results(results_dir: Path, benchmark: str, data: dict[str, Any], lines: list[str]) -> None:
    """Writes RESULTS_DIR/<benchmark>-<time>.json and prints the report with its path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"{benchmark}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(data, indent=1, default=str) + "\n")
    print("\n".join([*lines, f"results: {out}"]), flush=True)
