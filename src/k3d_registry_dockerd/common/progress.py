"""How far a pull through Docker or an export from it has got: a log line every few seconds (bytes of the
expected size, rate, time left) and the figures the status page draws as a progress bar, so a multi-GB
image never looks stuck."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import units

log = logging.getLogger(__package__)

INTERVAL = 5.0


@dataclass
class Transfer:
    """One pull or export running now; `expected` is 0 while unknown."""

    kind: str  # "pull", "export", or "pre-export" (an export no request waits for yet)
    ref: str
    expected: int = 0
    received: int = 0
    # Reads the count where it is kept (an export's stream reader); `received` when None.
    counter: Callable[[], int] | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.counter() if self.counter is not None else self.received

    def line(self) -> str:
        elapsed, done = time.monotonic() - self.started, self.done
        # Not "exporting X": log readers (and tests) count those lines as exports started.
        what = f"pull of {self.ref} through Docker" if self.kind == "pull" else f"{self.kind} of {self.ref}"
        if done == 0:
            waiting = "for the upstream" if self.kind == "pull" else "for Docker's first byte"
            return f"{what}: waiting {waiting}, {units.duration(elapsed)} so far"
        of = f" of {'' if self.kind == 'pull' else '~'}{units.size(self.expected)}" if self.expected else ""
        text = f"{what}: {units.size(done)}{of}, {units.rate(done, elapsed)}"
        if self.expected > done and elapsed > 0:
            text += f", about {units.duration((self.expected - done) * elapsed / done)} left"
        return f"{text} ({units.duration(elapsed)} so far)"

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ref": self.ref,
            "seconds": time.monotonic() - self.started,
            "bytes": self.done,
            "expected_bytes": self.expected,
        }


class Transfers:
    """The pulls and exports running now, each registered while it runs (`track`): what the status page
    draws and the stop log counts."""

    def __init__(self) -> None:
        self._running: dict[int, Transfer] = {}

    @contextlib.asynccontextmanager
    async def track(self, transfer: Transfer, interval: float | None = None) -> AsyncIterator[Transfer]:
        """Registers `transfer` and logs `transfer.line()` every `interval` seconds (INTERVAL by default)
        while the block runs."""

        async def report() -> None:
            while True:
                await asyncio.sleep(INTERVAL if interval is None else interval)
                log.info("%s", transfer.line())

        self._running[id(transfer)] = transfer
        task = asyncio.ensure_future(report())
        try:
            yield transfer
        finally:
            del self._running[id(transfer)]
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def running(self, *kinds: str) -> list[Transfer]:
        """Those running now (of these kinds: "pull", "export", "pre-export"), oldest first."""
        return [t for t in self._running.values() if not kinds or t.kind in kinds]


class Activity:
    """Work of one kind going on now (blobs being sent), for background work that gives way to it."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        self._count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._count -= 1
            if not self._count:
                self._idle.set()

    async def idle(self) -> None:
        """Returns once none of this work is going on."""
        await self._idle.wait()
