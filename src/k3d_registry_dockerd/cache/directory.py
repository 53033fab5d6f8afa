"""The cache directory as a resource: usable (a writable directory), and held by one process at a time.

A running registry keeps its records in memory, so a second server, or a `cache` command, working on the
same directory would act on a stale view and undo each other's writes. The holder takes an exclusive
`flock` on ``<cache dir>/lock`` (released by the kernel whenever the process ends, crashes included) and
writes its PID there for the message the next one gets.

The errors say what is wrong; the program adds what to do, in the terms of its settings.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from pathlib import Path

LOCK_FILE = "lock"


class CacheDirError(Exception):
    """The cache dir cannot be used; the message says why. `held` when another process holds it."""

    def __init__(self, message: str, *, held: bool = False) -> None:
        super().__init__(message)
        self.held = held


def _describe(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{exc.strerror} for user {os.getuid()}"
    return exc.strerror or str(exc)


def prepare(path: Path) -> None:
    """Creates the cache dir if needed and checks that files can be written in it."""
    if path.exists() and not path.is_dir():
        raise CacheDirError(f"cache dir {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheDirError(f"cannot create the cache dir {path}: {_describe(exc)}") from exc
    try:
        fd, name = tempfile.mkstemp(dir=path, prefix=".writable-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise CacheDirError(f"cache dir {path} is not writable: {_describe(exc)}") from exc


class CacheDirLock:
    """Exclusive use of a cache dir by this process; `release` (or the process ending) gives it up."""

    def __init__(self, path: Path) -> None:
        self.path = path / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise CacheDirError(f"cannot open {self.path}: {_describe(exc)}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CacheDirError(
                f"cache dir {self.path.parent} is in use by a running k3d-registry-dockerd (PID {holder})",
                held=True,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CacheDirLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()
