"""Every setting, resolved from flags and the environment (a flag wins), with where each value came from."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .cache.directory import CacheDirError

ENV_ADDR = "REGISTRY_HTTP_ADDR"
ENV_CACHE_DIR = "K3D_REGISTRY_DOCKERD_CACHE_DIR"
ENV_LOG_LEVEL = "K3D_REGISTRY_DOCKERD_LOG_LEVEL"
ENV_LOG_FORMAT = "K3D_REGISTRY_DOCKERD_LOG_FORMAT"
ENV_REFRESH_TAGS = "K3D_REGISTRY_DOCKERD_REFRESH_TAGS"
ENV_CACHE_MAX_SIZE = "K3D_REGISTRY_DOCKERD_CACHE_MAX_SIZE"
ENV_LOAD_PUSHED = "K3D_REGISTRY_DOCKERD_LOAD_PUSHED"
ENV_ALLOW_DOCKER_DELETE = "K3D_REGISTRY_DOCKERD_ALLOW_DOCKER_DELETE"
ENV_ALLOW_DOCKER_OVERWRITE = "K3D_REGISTRY_DOCKERD_ALLOW_DOCKER_OVERWRITE"
ENV_ZERO_COPY = "K3D_REGISTRY_DOCKERD_ZERO_COPY"
ENV_PREFETCH = "K3D_REGISTRY_DOCKERD_PREFETCH"
ENV_PREFETCH_MAX_AGE = "K3D_REGISTRY_DOCKERD_PREFETCH_MAX_AGE"
ENV_DOCKER_CREDENTIALS = "K3D_REGISTRY_DOCKERD_DOCKER_CREDENTIALS"
ENV_ANSWER_WITHIN = "K3D_REGISTRY_DOCKERD_ANSWER_WITHIN"
# As ctr reads them.
ENV_CONTAINERD_ADDRESS = "CONTAINERD_ADDRESS"
ENV_CONTAINERD_NAMESPACE = "CONTAINERD_NAMESPACE"
# As distribution's registry reads them.
ENV_TLS_CERT = "REGISTRY_HTTP_TLS_CERTIFICATE"
ENV_TLS_KEY = "REGISTRY_HTTP_TLS_KEY"
ENV_AUTH = "REGISTRY_AUTH"
ENV_HTPASSWD_REALM = "REGISTRY_AUTH_HTPASSWD_REALM"
ENV_HTPASSWD_PATH = "REGISTRY_AUTH_HTPASSWD_PATH"
DEFAULT_ADDR = ":5000"
DEFAULT_REALM = "k3d-registry-dockerd"
DEFAULT_PREFETCH_MAX_AGE = "7d"
# Below the 5 minutes containerd's CRI waits for a pull's progress (image_pull_progress_timeout).
DEFAULT_ANSWER_WITHIN = "4m"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_BOOLEANS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?", re.IGNORECASE)


class SettingError(ValueError):
    """A flag or environment variable has a value that cannot be used."""


def cache_dir_problem(exc: CacheDirError) -> str:
    """Why the cache dir cannot be used, and what to do about it in terms of the setting."""
    if exc.held:
        return f"{exc}: stop it first, or give this one another --cache-dir"
    return f"{exc}; point --cache-dir (or {ENV_CACHE_DIR}) at a directory this user can write"


def default_cache_dir(env: Mapping[str, str]) -> Path:
    """``$XDG_CACHE_HOME/k3d-registry-dockerd``, else ``~/.cache/k3d-registry-dockerd``."""
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "k3d-registry-dockerd"


def resolve_cache_dir(flag: str | None, env: Mapping[str, str]) -> tuple[Path, str]:
    """The cache dir and where it came from (flag, environment or default)."""
    if flag is not None:
        return Path(flag).expanduser(), "flag --cache-dir"
    if env.get(ENV_CACHE_DIR):
        return Path(env[ENV_CACHE_DIR]).expanduser(), f"env {ENV_CACHE_DIR}"
    return default_cache_dir(env), "default"


def parse_addr(text: str) -> tuple[str | None, int]:
    """``HOST:PORT``, ``:PORT`` (all interfaces) or ``[IPv6]:PORT``, as distribution's registry reads it."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingError(f"address {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        raise SettingError(f"address {text!r}: an IPv6 host needs brackets, as in [::1]:5000")
    return host or None, int(port)


def parse_duration(text: str) -> float:
    """Go-style durations (``90s``, ``5m``, ``1h30m``) and days (``7d``); a bare number is refused, as
    `--older-than 7` meaning seven seconds surprised the people who typed it."""
    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        raise SettingError(f"duration {text!r} needs a unit: {text}s, {text}m, {text}h or {text}d")
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise SettingError(f"duration {text!r} is not like 30s, 5m, 1h30m or 1d")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def parse_bool(text: str, name: str) -> bool:
    try:
        return _BOOLEANS[text.strip().lower()]
    except KeyError:
        raise SettingError(f"{name}={text!r} is not a boolean (true/false, 1/0, yes/no, on/off)") from None


def parse_size(text: str) -> int:
    """Bytes from ``20GiB``, ``500MB``, ``1.5G`` (decimal units, or binary with ``i``) or a plain number."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match:
        raise SettingError(f"size {text!r} is not like 500MB, 20GiB or 1.5G")
    number, unit, binary = match.groups()
    power = " kmgt".index(unit.lower() or " ")
    return int(float(number) * (1024 if binary else 1000) ** power)


@dataclass(frozen=True)
class Settings:
    host: str | None
    port: int
    cache_dir: Path
    log_level: str
    log_format: str
    refresh_tags: float | None
    # Evict least recently used images when the cache grows past this many bytes; None: no limit.
    cache_max_size: int | None
    # Serve HTTPS with this certificate (chain) and key; plain HTTP when None.
    tls_cert: Path | None
    tls_key: Path | None
    # Load pushed images into Docker; let DELETE remove Docker's own images; let a loaded push move a
    # tag Docker already had (not one this registry's own load made).
    load_pushed: bool
    allow_docker_delete: bool
    allow_docker_overwrite: bool
    # Pushes and deletes need credentials from this htpasswd file; None: anyone may write.
    htpasswd_path: Path | None
    htpasswd_realm: str
    # setting name -> "flag --addr", "env REGISTRY_HTTP_ADDR" or "default"
    sources: Mapping[str, str]
    # Serve Docker's containerd image store from containerd's content store; where that containerd
    # listens and the namespace of Docker's images (None: as Docker reports, or the usual places).
    zero_copy: bool = True
    containerd_address: str | None = None
    containerd_namespace: str | None = None
    # Pre-export tags clients pulled within `prefetch_max_age` seconds when they move in Docker.
    prefetch: bool = True
    prefetch_max_age: float = 7 * 86400.0
    # Pull through Docker with the docker CLI's stored credentials when a request brings none.
    docker_credentials: bool = False
    # Answer containerd's manifest requests within this many seconds (503 while the pull or export goes
    # on), so a node can try the upstream before its CRI cancels the pull; None: wait for the work.
    answer_within: float | None = 240.0

    @property
    def addr(self) -> str:
        host = self.host or ""
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def resolve(
    *,
    addr: str | None,
    cache_dir: str | None,
    log_level: str | None,
    refresh_tags: str | None,
    log_format: str | None = None,
    cache_max_size: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    no_load_pushed: bool | None = None,
    allow_docker_delete: bool | None = None,
    allow_docker_overwrite: bool | None = None,
    htpasswd_path: str | None = None,
    htpasswd_realm: str | None = None,
    no_zero_copy: bool | None = None,
    containerd_address: str | None = None,
    containerd_namespace: str | None = None,
    no_prefetch: bool | None = None,
    prefetch_max_age: str | None = None,
    docker_credentials: bool | None = None,
    answer_within: str | None = None,
    env: Mapping[str, str] = os.environ,
) -> Settings:
    sources: dict[str, str] = {}

    def pick(name: str, flag: str, value: str | None, env_name: str, default: str | None) -> str | None:
        if value is not None:
            sources[name] = f"flag {flag}"
            return value
        if env.get(env_name):
            sources[name] = f"env {env_name}"
            return env[env_name]
        sources[name] = "default"
        return default

    host, port = parse_addr(pick("addr", "--addr", addr, ENV_ADDR, DEFAULT_ADDR) or DEFAULT_ADDR)
    cache, sources["cache_dir"] = resolve_cache_dir(cache_dir, env)
    level = (pick("log_level", "--log-level", log_level, ENV_LOG_LEVEL, "info") or "info").lower()
    if level not in LOG_LEVELS:
        raise SettingError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    log_format_ = (pick("log_format", "--log-format", log_format, ENV_LOG_FORMAT, "text") or "text").lower()
    if log_format_ not in LOG_FORMATS:
        raise SettingError(f"log format {log_format_!r} is not one of {', '.join(LOG_FORMATS)}")
    refresh = pick("refresh_tags", "--refresh-tags", refresh_tags, ENV_REFRESH_TAGS, None)
    max_size = pick("cache_max_size", "--cache-max-size", cache_max_size, ENV_CACHE_MAX_SIZE, None)
    cert = pick("tls_cert", "--tls-cert", tls_cert, ENV_TLS_CERT, None)
    key = pick("tls_key", "--tls-key", tls_key, ENV_TLS_KEY, None)
    if bool(cert) != bool(key):
        raise SettingError("TLS needs both a certificate (--tls-cert) and a key (--tls-key)")
    load = pick(
        "load_pushed", "--no-load-pushed", "false" if no_load_pushed else None, ENV_LOAD_PUSHED, "true"
    )
    delete = pick(
        "allow_docker_delete",
        "--allow-docker-delete",
        "true" if allow_docker_delete else None,
        ENV_ALLOW_DOCKER_DELETE,
        "false",
    )
    overwrite = pick(
        "allow_docker_overwrite",
        "--allow-docker-overwrite",
        "true" if allow_docker_overwrite else None,
        ENV_ALLOW_DOCKER_OVERWRITE,
        "false",
    )
    htpasswd = pick("htpasswd_path", "--auth-htpasswd-path", htpasswd_path, ENV_HTPASSWD_PATH, None)
    realm = pick("htpasswd_realm", "--auth-htpasswd-realm", htpasswd_realm, ENV_HTPASSWD_REALM, DEFAULT_REALM)
    zero_copy = pick("zero_copy", "--no-zero-copy", "false" if no_zero_copy else None, ENV_ZERO_COPY, "true")
    ctd_address = pick(
        "containerd_address", "--containerd-address", containerd_address, ENV_CONTAINERD_ADDRESS, None
    )
    ctd_namespace = pick(
        "containerd_namespace", "--containerd-namespace", containerd_namespace, ENV_CONTAINERD_NAMESPACE, None
    )
    prefetch = pick("prefetch", "--no-prefetch", "false" if no_prefetch else None, ENV_PREFETCH, "true")
    max_age = pick(
        "prefetch_max_age",
        "--prefetch-max-age",
        prefetch_max_age,
        ENV_PREFETCH_MAX_AGE,
        DEFAULT_PREFETCH_MAX_AGE,
    )
    host_credentials = pick(
        "docker_credentials",
        "--docker-credentials",
        "true" if docker_credentials else None,
        ENV_DOCKER_CREDENTIALS,
        "false",
    )
    within = pick("answer_within", "--answer-within", answer_within, ENV_ANSWER_WITHIN, DEFAULT_ANSWER_WITHIN)
    within = within or DEFAULT_ANSWER_WITHIN
    within_seconds = None if within.strip().lower() in ("0", "off") else parse_duration(within)
    scheme = env.get(ENV_AUTH, "").strip().lower()
    if scheme not in ("", "htpasswd"):
        raise SettingError(
            f"{ENV_AUTH}={env[ENV_AUTH]!r} is not supported: pushes are checked against an htpasswd file "
            f"({ENV_AUTH}=htpasswd with {ENV_HTPASSWD_PATH})"
        )
    if scheme and not htpasswd:
        raise SettingError(
            f"{ENV_AUTH}=htpasswd needs the file: set {ENV_HTPASSWD_PATH} or --auth-htpasswd-path"
        )
    return Settings(
        host=host,
        port=port,
        cache_dir=cache,
        log_level=level,
        log_format=log_format_,
        refresh_tags=parse_duration(refresh) if refresh else None,
        cache_max_size=parse_size(max_size) if max_size else None,
        tls_cert=Path(cert).expanduser() if cert else None,
        tls_key=Path(key).expanduser() if key else None,
        load_pushed=parse_bool(load or "true", ENV_LOAD_PUSHED),
        allow_docker_delete=parse_bool(delete or "false", ENV_ALLOW_DOCKER_DELETE),
        allow_docker_overwrite=parse_bool(overwrite or "false", ENV_ALLOW_DOCKER_OVERWRITE),
        htpasswd_path=Path(htpasswd).expanduser() if htpasswd else None,
        htpasswd_realm=realm or DEFAULT_REALM,
        zero_copy=parse_bool(zero_copy or "true", ENV_ZERO_COPY),
        containerd_address=ctd_address,
        containerd_namespace=ctd_namespace,
        prefetch=parse_bool(prefetch or "true", ENV_PREFETCH),
        prefetch_max_age=parse_duration(max_age or DEFAULT_PREFETCH_MAX_AGE),
        docker_credentials=parse_bool(host_credentials or "false", ENV_DOCKER_CREDENTIALS),
        answer_within=within_seconds or None,
        sources=sources,
    )
