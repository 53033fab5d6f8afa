"""Debian's distribution registry (2.8) as the upstream a mirror request names: open, or with htpasswd;
its access log shows what it served, and to whom."""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from .process import BOOKWORM_USR, Service, free_port, http_status, make_temp_dir, require_binary, run

# distribution's access log (combined): HOST - - [DATE] "METHOD PATH HTTP/1.1" STATUS SIZE "REFERER" "UA".
_ACCESS_LOG = re.compile(
    r"(?:\[(?P<date>[^\]]+)\] )?"
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?:\S+ "[^"]*" "(?P<agent>[^"]*)")?'
)


@dataclass(frozen=True)
class AccessLogEntry:
    """One request the upstream registry served (from its combined-format access log)."""

    method: str
    path: str
    status: int
    # The client's user agent: `docker/…` is dockerd pulling for us, `containerd/…` a node going around us.
    agent: str = ""
    # When it was logged (UNIX time, whole seconds: the log's resolution).
    at: float | None = None


def _logged_at(date: str | None) -> float | None:
    """The access log's `07/Dec/2026:22:26:36 +0000` as UNIX time."""
    if date is None:
        return None
    return datetime.datetime.strptime(date, "%d/%b/%Y:%H:%M:%S %z").timestamp()


class UpstreamRegistry(Service):
    """distribution/registry 2.8 on 127.0.0.1:<free port>, filesystem storage, optional htpasswd.

    Its access log (stdout, combined format, one line per request with method, path and status)
    goes to ``log_path`` together with the app log, so a test can prove whether our registry fetched
    a manifest or blob from here.
    """

    binary = str(BOOKWORM_USR / "bin" / "docker-registry")

    def __init__(
        self,
        root: Path | None = None,
        *,
        user: str | None = None,
        password: str | None = None,
        port: int | None = None,
    ) -> None:
        if (user is None) != (password is None):
            raise ValueError("give both user and password, or neither")
        self.root = root or make_temp_dir("upstream")
        self.user = user
        self.password = password
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.addr}"
        self.storage = self.root / "storage"
        self.log_path = self.root / "registry.log"
        self.config_path = self.root / "config.yml"

    @property
    def credentials(self) -> tuple[str, str] | None:
        return (self.user, self.password) if self.user is not None and self.password is not None else None

    @classmethod
    def check_available(cls, *, auth: bool = False) -> None:
        require_binary(cls.binary)
        if auth:
            require_binary("htpasswd")

    def _write_config(self) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.credentials:
            htpasswd = self.root / "htpasswd"
            line = run([require_binary("htpasswd"), "-nbB", self.user or "", self.password or ""]).stdout
            htpasswd.write_text(line.strip() + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: k3rd-upstream\n    path: {htpasswd}\n"
        self.config_path.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n  cache:\n    blobdescriptor: inmemory\n"
            f"http:\n  addr: {self.addr}\n  secret: k3rd-test-secret\n"
            "  headers:\n    X-Content-Type-Options: [nosniff]\n"
            f"{auth}"
            "health:\n  storagedriver:\n    enabled: false\n"
        )

    def start(self, timeout: float = 30.0) -> Self:
        """Start (or restart, same port and storage) and wait until /v2/ answers."""
        if self.running:
            return self
        self.check_available(auth=self.credentials is not None)
        self._write_config()
        expected = 401 if self.credentials else 200
        self._launch(
            [self.binary, "serve", self.config_path],
            env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
            name="docker-registry",
            ready=lambda: http_status(f"{self.url}/v2/") == expected,
            timeout=timeout,
            what=f"upstream registry on {self.addr}",
        )
        return self

    def log_mark(self) -> int:
        """Current log size: pass to requests(since=…) to see only what happened afterwards."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def requests(self, since: int = 0) -> list[AccessLogEntry]:
        """Requests served so far (or since a log_mark()), oldest first."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [
            AccessLogEntry(m["method"], m["path"], int(m["status"]), m["agent"] or "", _logged_at(m["date"]))
            for m in (_ACCESS_LOG.search(line) for line in text.splitlines())
            if m
        ]

    def __repr__(self) -> str:
        return f"<UpstreamRegistry {self.addr}{' auth' if self.credentials else ''}>"
