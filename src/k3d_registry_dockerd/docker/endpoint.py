"""Where Docker's Engine API is, found the way the docker CLI finds it.

Order: ``DOCKER_HOST`` (the ``default`` context with that host), else ``DOCKER_CONTEXT``, else the
``currentContext`` of ``$DOCKER_CONFIG/config.json`` (``~/.docker``), else the default socket. A context's
host and TLS material come from its store under ``$DOCKER_CONFIG/contexts``; the ``default`` context takes
TLS from ``DOCKER_TLS_VERIFY`` / ``DOCKER_TLS`` / ``DOCKER_CERT_PATH``. Pure: reads only the environment
mapping and files under the config dir.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST = "unix:///var/run/docker.sock"
DEFAULT_CONTEXT = "default"
_PLAIN_PORT, _TLS_PORT = 2375, 2376
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]*)(?::(?P<port>[0-9]{1,5}))?")


class EndpointError(ValueError):
    """The Docker endpoint settings cannot be used; the message names the setting and what to do."""


@dataclass(frozen=True)
class TLSFiles:
    verify: bool
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class DockerEndpoint:
    # unix:///path or tcp://host:port, as the docker CLI would print it.
    host: str
    context: str
    # What chose it: "DOCKER_HOST", "DOCKER_CONTEXT", "currentContext in …/config.json" or "default".
    source: str
    tls: TLSFiles | None = None

    @property
    def socket_path(self) -> str | None:
        return self.host.removeprefix("unix://") if self.host.startswith("unix://") else None

    @property
    def base_url(self) -> str:
        """The URL aiohttp requests go to (a unix socket's host part is a placeholder)."""
        if self.socket_path is not None:
            return "unix://localhost"
        return ("https://" if self.tls else "http://") + self.host.removeprefix("tcp://")

    def describe(self) -> str:
        if self.context == DEFAULT_CONTEXT:
            return f"{self.host} ({self.source})"
        return f"{self.host} (context {self.context}, from {self.source})"

    def ssl_context(self) -> ssl.SSLContext | None:
        """Client TLS for a tcp endpoint; raises EndpointError when its files cannot be loaded."""
        if self.tls is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls.ca) if self.tls.ca else None)
        if not self.tls.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            if self.tls.cert and self.tls.key:
                context.load_cert_chain(self.tls.cert, self.tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise EndpointError(
                f"cannot load the TLS client certificate {self.tls.cert} for {self.describe()}: {exc}"
            ) from exc
        return context


def config_dir(env: Mapping[str, str]) -> Path:
    if env.get("DOCKER_CONFIG"):
        return Path(env["DOCKER_CONFIG"]).expanduser()
    return Path(env.get("HOME") or Path.home()) / ".docker"


def parse_host(text: str, setting: str) -> tuple[str, bool]:
    """A Docker host address in the CLI's forms (``unix:///path``, ``tcp://host[:port]``, ``host:port``)
    → (normalized address, whether it asks for TLS by itself, as ``https://`` does)."""
    value = text.strip()
    scheme, separator, rest = value.partition("://")
    if not separator:
        scheme, rest = ("tcp", value) if re.fullmatch(r"[^/:]+:[0-9]{1,5}", value) else ("", value)
    scheme = scheme.lower()
    if scheme == "unix":
        return f"unix://{rest or DEFAULT_HOST.removeprefix('unix://')}", False
    if scheme in ("tcp", "http", "https"):
        match = _HOST_PORT.fullmatch(rest.rstrip("/"))
        if match and (match["port"] is None or 0 < int(match["port"]) < 65536):
            tls = scheme == "https"
            port = match["port"] or str(_TLS_PORT if tls else _PLAIN_PORT)
            return f"tcp://{match['host'] or 'localhost'}:{port}", tls
    elif scheme in ("ssh", "npipe", "fd"):
        raise EndpointError(
            f"{setting}={text!r}: {scheme}:// Docker hosts are not supported; use a unix socket (forward a "
            "remote one with `ssh -NL /tmp/docker.sock:/var/run/docker.sock HOST`) or tcp://HOST:PORT"
        )
    raise EndpointError(
        f"{setting}={text!r} is not a Docker address: use unix:///path/to/docker.sock or tcp://HOST:PORT"
    )


def _env_tls(env: Mapping[str, str], docker_config: Path) -> TLSFiles | None:
    """TLS of the default context, from the variables the docker CLI reads."""
    verify = bool(env.get("DOCKER_TLS_VERIFY"))
    if not verify and not env.get("DOCKER_TLS"):
        return None
    cert_dir = Path(env["DOCKER_CERT_PATH"]).expanduser() if env.get("DOCKER_CERT_PATH") else docker_config
    return _tls_files(cert_dir, verify)


def _tls_files(directory: Path, verify: bool) -> TLSFiles:
    def present(name: str) -> Path | None:
        path = directory / name
        return path if path.is_file() else None

    cert, key = present("cert.pem"), present("key.pem")
    return TLSFiles(verify, present("ca.pem"), cert if key else None, key if cert else None)


def _current_context(docker_config: Path) -> str | None:
    path = docker_config / "config.json"
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EndpointError(f"cannot read the docker CLI config {path}: {exc}") from exc
    name = data.get("currentContext") if isinstance(data, dict) else None
    return str(name) if name else None


def _context_endpoint(name: str, source: str, docker_config: Path) -> DockerEndpoint:
    """A named context from the CLI's context store (``contexts/meta/<sha256 of the name>/meta.json``)."""
    context_id = hashlib.sha256(name.encode()).hexdigest()
    meta_path = docker_config / "contexts" / "meta" / context_id / "meta.json"
    try:
        meta = json.loads(meta_path.read_bytes())
        docker = meta["Endpoints"]["docker"]
        host_text = str(docker["Host"])
    except FileNotFoundError:
        raise EndpointError(
            f"Docker context {name!r} (from {source}) does not exist in {docker_config / 'contexts'}: "
            "`docker context ls` lists the contexts there"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EndpointError(f"Docker context {name!r}: cannot read {meta_path}: {exc}") from exc
    host, https = parse_host(host_text, f"the Host of Docker context {name!r}")
    tls_dir = docker_config / "contexts" / "tls" / context_id / "docker"
    tls = None
    if host.startswith("tcp://") and (https or tls_dir.is_dir()):
        tls = _tls_files(tls_dir, not docker.get("SkipTLSVerify", False))
    return DockerEndpoint(host, name, source, tls)


def resolve_endpoint(env: Mapping[str, str]) -> DockerEndpoint:
    docker_config = config_dir(env)
    if env.get("DOCKER_HOST"):
        host, https = parse_host(env["DOCKER_HOST"], "DOCKER_HOST")
        tls = _env_tls(env, docker_config) if host.startswith("tcp://") else None
        if https and tls is None:
            tls = TLSFiles(verify=True)
        return DockerEndpoint(host, DEFAULT_CONTEXT, "DOCKER_HOST", tls)
    name, source = env.get("DOCKER_CONTEXT"), "DOCKER_CONTEXT"
    if not name:
        name, source = _current_context(docker_config), f"currentContext in {docker_config / 'config.json'}"
    if name and name != DEFAULT_CONTEXT:
        return _context_endpoint(name, source, docker_config)
    return DockerEndpoint(DEFAULT_HOST, DEFAULT_CONTEXT, "default", None)
