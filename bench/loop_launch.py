#!/usr/bin/env python3
"""k3d-registry-dockerd on a chosen event loop, for bench/load.py's ``--loop``.

    python bench/loop_launch.py uvloop -- --addr 127.0.0.1:5000 --cache-dir DIR ...

Installs the loop's policy (the server's ``asyncio.run`` makes its loop from it), writes one line to stderr
naming the loop, the package's file and whether that loop implements ``loop.sendfile`` (uvloop does not:
MagicStack/uvloop#228, so aiohttp's FileResponse falls back to reads in a thread pool), then runs the
package's main with the arguments after ``--``, as ``python -m k3d_registry_dockerd`` does.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
import sys
import tempfile

LOOPS = ("asyncio", "uvloop", "zuvloop")
LINE = "loop_launch:"
"""The start of the line bench/load.py reads back from the registry's log."""


async def _sendfile() -> str:
    """Whether ``loop.sendfile`` sends a file on a socket transport without a fallback."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    try:
        with tempfile.TemporaryFile() as file:
            file.write(b"sendfile?")
            file.flush()
            file.seek(0)
            try:
                sent = await loop.sendfile(transport, file, fallback=False)
            except (NotImplementedError, asyncio.SendfileNotAvailableError) as exc:
                return f"not implemented ({type(exc).__name__})"
            return "implemented" if sent == 9 and theirs.recv(16) == b"sendfile?" else f"sent {sent} bytes"
    finally:
        transport.close()
        theirs.close()


def install(name: str) -> str:
    """Makes ``name`` the loop asyncio.run uses; returns its description (module version, sendfile)."""
    version = ""
    if name != "asyncio":
        module = importlib.import_module(name)
        asyncio.set_event_loop_policy(module.EventLoopPolicy())
        version = f" {getattr(module, '__version__', '?')}"
    with asyncio.Runner() as runner:
        kind = type(runner.get_loop())
        sendfile = runner.run(_sendfile())
    return f"{name}{version} ({kind.__module__}.{kind.__qualname__}), loop.sendfile {sendfile}"


def main() -> int:
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[0] not in LOOPS or argv[1] != "--":
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(LOOPS)}}} -- REGISTRY-ARGUMENTS...")
    described = install(argv[0])
    from k3d_registry_dockerd import cli

    print(f"{LINE} {described}; code {cli.__file__}", file=sys.stderr, flush=True)
    return cli.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main())
