#!/usr/bin/env python3
"""A small HTTP/1.1 keep-alive load generator that can do HEAD: what bench/load.py needs and wrk cannot.

    python bench/httpload.py -c 1000 -t 2 -d 20 [--timeout 30] URL PATHS_FILE

wrk 4.1 (Debian's) cannot send HEAD requests: its response parser waits for the body a HEAD response's
Content-Length announces (wg/wrk#198), so every connection hangs after its first HEAD. aiohttp's client
can, but costs 2.5 times the CPU per request (56 against 22 µs, 100 connections against a trivial aiohttp
server, one process), CPU the registries under test share on a small machine. This client works
like wrk otherwise: ``-t`` worker processes, each an asyncio event loop with its share of the ``-c``
keep-alive connections; every connection sends the next request as soon as the previous answer is complete
(no pipelining), walking PATHS_FILE (lines "HEAD /path" or "GET /path"; request N of a connection is line
N modulo the file, each connection starting elsewhere). A broken connection is counted and reopened.

Prints one JSON object: requests, bytes (bodies), duration, errors (connect, read, write, timeout),
statuses, latency percentiles in microseconds (all, and per method), and the CPU seconds the workers used,
so whoever reads it can tell when the client, not the server, was the limit.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import collections
import gc
import json
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

ACCEPT = (
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)
MAX_HEAD = 64 * 1024


class Worker:
    def __init__(self, host: str, port: int, requests: list[tuple[bool, bytes]], timeout: float) -> None:
        self.host, self.port = host, port
        self.requests = requests
        self.timeout = timeout
        self.stopping = False
        self.errors = collections.Counter({"connect": 0, "read": 0, "write": 0, "timeout": 0})
        self.statuses: collections.Counter[int] = collections.Counter()
        self.latency = {True: array.array("d"), False: array.array("d")}
        self.bytes = 0
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Future[None]] = set()

    def spawn(self, index: int) -> None:
        task = asyncio.ensure_future(self.open(index))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def open(self, index: int) -> None:
        """Opens connection ``index``, retrying (each failure counted) until it works or we stop."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            try:
                await loop.create_connection(lambda: Connection(self, index), self.host, self.port)
                return
            except OSError:
                self.errors["connect"] += 1
                await asyncio.sleep(0.1)

    def reopen(self, index: int) -> None:
        if not self.stopping:
            self.spawn(index)

    async def watch_timeouts(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.25)
            deadline = time.perf_counter() - self.timeout
            for conn in list(self.connections):
                if conn.busy and conn.started < deadline:
                    self.errors["timeout"] += 1
                    conn.abort()

    async def run(self, connections: int, offset: int, duration: float) -> dict[str, Any]:
        began = time.perf_counter()
        cpu = time.process_time()
        for i in range(connections):
            self.spawn(offset + i)
        watcher = asyncio.ensure_future(self.watch_timeouts())
        await asyncio.sleep(duration)
        self.stopping = True
        elapsed = time.perf_counter() - began
        for conn in list(self.connections):
            conn.abort()
        watcher.cancel()
        return {
            "requests": len(self.latency[True]) + len(self.latency[False]),
            "bytes": self.bytes,
            "duration_s": elapsed,
            "errors": dict(self.errors),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "cpu_s": time.process_time() - cpu,
            "latency_head": base64.b64encode(self.latency[True].tobytes()).decode(),
            "latency_get": base64.b64encode(self.latency[False].tobytes()).decode(),
        }


class Connection(asyncio.Protocol):
    """One keep-alive connection: a request, its whole answer, the next request."""

    def __init__(self, worker: Worker, index: int) -> None:
        self.worker = worker
        self.index = index
        self.next = index * 7
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.aborted = False
        self.is_head = False
        self.started = 0.0
        self.head = bytearray()
        self.remaining = 0
        self.status = 0
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.worker.connections.add(self)
        self.send()

    def send(self) -> None:
        if self.worker.stopping or self.transport is None:
            return
        requests = self.worker.requests
        self.is_head, data = requests[self.next % len(requests)]
        self.next += 1
        self.busy = True
        self.started = time.perf_counter()
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self.fail("read")
            return
        if self.remaining:
            if len(data) < self.remaining:
                self.remaining -= len(data)
                self.worker.bytes += len(data)
                return
            extra = len(data) - self.remaining
            self.worker.bytes += self.remaining
            self.remaining = 0
            self.complete(self.status, self.close_after, extra)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_HEAD:
                self.fail("read")
            return
        header = bytes(self.head[:end]).lower()
        rest = len(self.head) - end - 4
        self.head.clear()
        try:
            status = int(header[9:12])
        except ValueError:
            self.fail("read")
            return
        length = 0
        at = header.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = header.find(b"\r\n", at + 2)
            length = int(header[at + 17 : stop if stop >= 0 else None])
        elif b"\r\ntransfer-encoding:" in header:
            self.fail("read")  # never sent by the registries measured here; not worth parsing
            return
        if self.is_head or status in (204, 304) or status < 200:
            length = 0
        self.status, self.close_after = status, b"\r\nconnection: close" in header
        if rest >= length:
            self.worker.bytes += length
            self.complete(status, self.close_after, rest - length)
        else:
            self.worker.bytes += rest
            self.remaining = length - rest

    def complete(self, status: int, close_after: bool, extra: int) -> None:
        worker = self.worker
        if worker.stopping:
            return
        worker.latency[self.is_head].append(time.perf_counter() - self.started)
        worker.statuses[status] += 1
        self.busy = False
        if extra or close_after:
            if extra:
                worker.errors["read"] += 1
            self.abort()
            return
        self.send()

    def fail(self, kind: str) -> None:
        if not self.worker.stopping:
            self.worker.errors[kind] += 1
        self.abort()

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            self.busy = False
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.connections.discard(self)
        if self.busy and not self.worker.stopping:
            self.worker.errors["write" if isinstance(exc, BrokenPipeError) else "read"] += 1
        self.busy = False
        self.worker.reopen(self.index)


def read_requests(url: str, paths_file: Path) -> tuple[str, int, list[tuple[bool, bytes]]]:
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    requests = []
    for line in paths_file.read_text().splitlines():
        if not line.strip():
            continue
        method, path = line.split()
        extra = f"Accept: {ACCEPT}\r\n" if method == "HEAD" or "/manifests/" in path else ""
        text = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: k3rd-httpload\r\n{extra}\r\n"
        requests.append((method == "HEAD", text.encode()))
    if not requests:
        raise SystemExit(f"{paths_file}: no requests")
    return host, port, requests


def worker_main(args: argparse.Namespace) -> None:
    gc.disable()
    host, port, requests = read_requests(args.url, args.paths)
    worker = Worker(host, port, requests, args.timeout)
    result = asyncio.run(worker.run(args.connections, args.offset, args.duration))
    json.dump(result, sys.stdout)


def percentiles_us(values: array.array[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1e6

    return {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered) * 1e6,
        "p50": at(50),
        "p90": at(90),
        "p99": at(99),
        "p999": at(99.9),
        "max": ordered[-1] * 1e6,
    }


def run(
    url: str, paths: Path, connections: int, threads: int, duration: float, timeout: float
) -> dict[str, Any]:
    """Starts the worker processes, waits for them, and merges what they measured."""
    shares = [connections // threads + (1 if i < connections % threads else 0) for i in range(threads)]
    procs = []
    offset = 0
    for share in shares:
        argv = [
            sys.executable, __file__, "--worker", "--offset", str(offset),
            "-c", str(share), "-d", str(duration), "--timeout", str(timeout), url, str(paths),
        ]  # fmt: skip
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        offset += share
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=duration + timeout + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"httpload worker failed ({proc.returncode}):\n{err[-4000:]}")
        results.append(json.loads(out))
    head, get = array.array("d"), array.array("d")
    errors: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[str] = collections.Counter()
    for result in results:
        head.frombytes(base64.b64decode(result.pop("latency_head")))
        get.frombytes(base64.b64decode(result.pop("latency_get")))
        errors.update(result["errors"])
        statuses.update(result["statuses"])
    every = array.array("d", head)
    every.extend(get)
    requests = sum(r["requests"] for r in results)
    return {
        "requests": requests,
        "bytes": sum(r["bytes"] for r in results),
        "requests_per_s": sum(r["requests"] / r["duration_s"] for r in results),
        "duration_s": max(r["duration_s"] for r in results),
        "errors": dict(errors),
        "statuses": dict(sorted(statuses.items())),
        "non_2xx": sum(v for k, v in statuses.items() if not k.startswith("2")),
        "client_cpu_s": sum(r["cpu_s"] for r in results),
        "latency_us": percentiles_us(every),
        "latency_us_head": percentiles_us(head),
        "latency_us_get": percentiles_us(get),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-c", "--connections", type=int, default=100)
    parser.add_argument("-t", "--threads", type=int, default=2, help="worker processes")
    parser.add_argument("-d", "--duration", type=float, default=10, help="seconds")
    parser.add_argument("--timeout", type=float, default=30, help="seconds before a request counts as lost")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("url")
    parser.add_argument("paths", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    threads = max(1, min(args.threads, args.connections))
    result = run(args.url, args.paths, args.connections, threads, args.duration, args.timeout)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
