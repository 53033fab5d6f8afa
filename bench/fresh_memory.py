#!/usr/bin/env python3
"""What it costs this machine to put new data into the page cache: in memory it has not used lately, and
in memory it just freed.

    python bench/fresh_memory.py [--size-mb 240] [--repeat 4]

A cold export must store every byte it gets from Docker, so the page cache grows by the image's size;
`docker save` to /dev/null needs only dockerd's temp files, which it frees again. On a VM whose host takes
back the guest's free memory (virtio-balloon free page reporting, as on Firecracker), every page the guest
touches again costs a host page fault. This writes ``--size-mb`` MiB into new files in /tmp:

- grow: ``--repeat`` files, all kept, so each needs memory the page cache did not hold before (the first
  may still get memory something freed just before: keep ``--repeat`` at 4 or more for a fair median);
- recycled: then, each file freed and at once written again (the kernel hands out the pages just freed).

It prints both, per MiB, and the ratio. Holds ``--size-mb`` x ``--repeat`` MiB of page cache at the peak.
No daemons, no timing assertions; results also go to bench/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common import RESULTS_DIR, begin, log, write_results  # noqa: E402

MiB = 1 << 20


def write_file(directory: Path, name: str, size_mb: int, chunk: bytes) -> float:
    began = time.perf_counter()
    with open(directory / name, "wb") as file:
        for _ in range(size_mb):
            file.write(chunk)
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=240, help="MiB written per measurement (default 240)")
    parser.add_argument("--repeat", type=int, default=4, help="measurements of each kind (default 4)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    args = parser.parse_args(argv)
    if args.size_mb < 1 or args.repeat < 1:
        parser.error("--size-mb and --repeat must be >= 1")
    begin(needs_root=False)
    # Incompressible and the same every time; nothing here depends on the content.
    chunk = os.urandom(MiB)
    grow: list[float] = []
    recycled: list[float] = []
    with tempfile.TemporaryDirectory(prefix="k3rd-fresh-memory-", dir="/tmp") as tmp:
        directory = Path(tmp)
        for number in range(args.repeat):
            grow.append(write_file(directory, f"grow-{number}", args.size_mb, chunk))
            log(f"grow {number + 1}/{args.repeat}: {grow[-1]:.3f}s")
        for number in range(args.repeat):
            os.unlink(directory / f"grow-{number}")
            recycled.append(write_file(directory, f"recycled-{number}", args.size_mb, chunk))
            log(f"recycled {number + 1}/{args.repeat}: {recycled[-1]:.3f}s")

    grow_s, recycled_s = statistics.median(grow), statistics.median(recycled)
    per_mib = {
        "grow_ms_per_mib": grow_s * 1000 / args.size_mb,
        "recycled_ms_per_mib": recycled_s * 1000 / args.size_mb,
    }
    ratio = per_mib["grow_ms_per_mib"] / per_mib["recycled_ms_per_mib"]
    lines = [
        f"fresh_memory: {args.size_mb} MiB written into new files in /tmp, {args.repeat} round(s), "
        f"{os.cpu_count()} CPUs, Linux {os.uname().release}",
        "",
        f"{'':<44}{'median s':>10}{'ms/MiB':>9}",
        f"{'grow (page cache takes new memory)':<44}{grow_s:>10.3f}{per_mib['grow_ms_per_mib']:>9.2f}",
        f"{'recycled (right after freeing as much)':<44}{recycled_s:>10.3f}"
        f"{per_mib['recycled_ms_per_mib']:>9.2f}",
        f"grow / recycled: {ratio:.1f}x",
    ]
    data = {
        "benchmark": "fresh_memory",
        "args": vars(args),
        "seconds": {"grow": grow, "recycled": recycled},
        **per_mib,
        "grow_over_recycled": ratio,
    }
    write_results(args.results_dir, "fresh_memory", data, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
