"""Every setting of the server, declared once (`OPTIONS`): its flag, its environment variable, its default,
how its text is read, what its help says and how the start log names it. The parser, `resolve` (a flag wins
over the environment, which wins over the default), the help and the start log all read the declarations.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache.directory import CacheDirError
from .common import units
from .push.uploads import BODY_TIMEOUT, MAX_UPLOADS

ENV_ADDR = "REGISTRY_HTTP_ADDR"
ENV_CACHE_DIR = "K3D_REGISTRY_DOCKERD_CACHE_DIR"
ENV_LOG_LEVEL = "K3D_REGISTRY_DOCKERD_LOG_LEVEL"
ENV_LOG_FORMAT = "K3D_REGISTRY_DOCKERD_LOG_FORMAT"
ENV_REFRESH_TAGS = "K3D_REGISTRY_DOCKERD_REFRESH_TAGS"
ENV_CACHE_MAX_SIZE = "K3D_REGISTRY_DOCKERD_CACHE_MAX_SIZE"
ENV_MIN_FREE = "K3D_REGISTRY_DOCKERD_MIN_FREE"
ENV_LOAD_PUSHED = "K3D_REGISTRY_DOCKERD_LOAD_PUSHED"
ENV_ALLOW_DOCKER_DELETE = "K3D_REGISTRY_DOCKERD_ALLOW_DOCKER_DELETE"
ENV_ALLOW_DOCKER_OVERWRITE = "K3D_REGISTRY_DOCKERD_ALLOW_DOCKER_OVERWRITE"
ENV_ZERO_COPY = "K3D_REGISTRY_DOCKERD_ZERO_COPY"
ENV_DOCKER_ROOT = "K3D_REGISTRY_DOCKERD_DOCKER_ROOT"
ENV_PREFETCH = "K3D_REGISTRY_DOCKERD_PREFETCH"
ENV_PREFETCH_MAX_AGE = "K3D_REGISTRY_DOCKERD_PREFETCH_MAX_AGE"
ENV_VERIFY_AHEAD = "K3D_REGISTRY_DOCKERD_VERIFY_AHEAD"
ENV_DOCKER_CREDENTIALS = "K3D_REGISTRY_DOCKERD_DOCKER_CREDENTIALS"
ENV_ANSWER_WITHIN = "K3D_REGISTRY_DOCKERD_ANSWER_WITHIN"
ENV_BODY_TIMEOUT = "K3D_REGISTRY_DOCKERD_BODY_TIMEOUT"
ENV_MAX_UPLOADS = "K3D_REGISTRY_DOCKERD_MAX_UPLOADS"
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
DEFAULT_BODY_TIMEOUT = f"{BODY_TIMEOUT:g}s"
DEFAULT_MAX_UPLOADS = str(MAX_UPLOADS)
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


def format_addr(host: str | None, port: int) -> str:
    host = host or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


def _path(text: str) -> Path:
    return Path(text).expanduser()


def _one_of(what: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.lower()
        if value not in choices:
            raise SettingError(f"{what} {value!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _duration_or_off(text: str) -> float | None:
    return None if text.strip().lower() in ("0", "off") else parse_duration(text) or None


def _positive(text: str) -> int:
    if not re.fullmatch(r"\s*[0-9]{1,9}\s*", text) or int(text) < 1:
        raise SettingError(f"{text!r} is not a whole number of at least 1")
    return int(text)


@dataclass(frozen=True)
class Option:
    """One setting of the server, and everything said about it."""

    name: str
    flag: str
    env: str
    # What it does, for --help; the parser adds the environment variable and the default.
    help: str
    # As a person would write it, read like a given value; None: not set (a switch's is the opposite of it).
    default: str | None = None
    # The default as --help states it, when not `default` itself.
    default_help: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    # For a flag that takes no value: the value it stands for ("false" for --no-prefetch).
    switch: str | None = None
    # Text to value; SettingError when it cannot be used. Booleans are read by `parse_bool`.
    parse: Callable[[str], Any] = str
    # The start log's line for the resolved settings (its source is added), None when not worth a line.
    describe: Callable[[Settings], str | None] = lambda _settings: None

    @property
    def dest(self) -> str:
        """The parser's name for the flag's value: the setting's, with `no_` for a flag turning it off."""
        return f"no_{self.name}" if self.switch == "false" else self.name

    def help_text(self) -> str:
        default = self.default_help or self.default
        if self.switch is not None:
            return f"{self.help} (env {self.env}={self.switch})"
        return f"{self.help} (env {self.env}" + (f"; default {default})" if default else ")")

    def __post_init__(self) -> None:
        if self.switch is not None:
            # Off unless the flag (or its variable) turns it on, and the other way round.
            object.__setattr__(self, "default", "false" if self.switch == "true" else "true")

    def read(self, text: str) -> Any:
        return parse_bool(text, self.env) if self.switch is not None else self.parse(text)

    def pick(self, flags: Mapping[str, Any], env: Mapping[str, str]) -> tuple[str | None, str]:
        """The setting's text, and where it came from: a flag given, else its (non-empty) environment
        variable, else the default."""
        given = flags.get(self.dest)
        if given is not None and given is not False:
            return self.switch or str(given), f"flag {self.flag}"
        if env.get(self.env):
            return env[self.env], f"env {self.env}"
        return self.default, "default"


OPTIONS: tuple[Option, ...] = (
    Option(
        "addr",
        "--addr",
        ENV_ADDR,
        "where to listen, as k3d sets it",
        DEFAULT_ADDR,
        default_help=":5000, all interfaces",
        metavar="HOST:PORT",
        parse=lambda text: format_addr(*parse_addr(text)),
        describe=lambda s: f"listen address {s.addr}",
    ),
    Option(
        "cache_dir",
        "--cache-dir",
        ENV_CACHE_DIR,
        "where blobs and records are kept",
        default_help="$XDG_CACHE_HOME/k3d-registry-dockerd or ~/.cache/k3d-registry-dockerd",
        metavar="DIR",
        parse=_path,
        describe=lambda s: f"cache dir {s.cache_dir}",
    ),
    Option(
        "cache_max_size",
        "--cache-max-size",
        ENV_CACHE_MAX_SIZE,
        "evict least recently used images when the cache grows past this, e.g. 20GiB",
        default_help="no limit",
        metavar="SIZE",
        parse=parse_size,
        describe=lambda s: (
            f"cache limit {units.size(s.cache_max_size)}" if s.cache_max_size is not None else None
        ),
    ),
    Option(
        "min_free",
        "--min-free",
        ENV_MIN_FREE,
        "refuse (507) an export that would leave less than this free in the cache dir, and report not ready "
        "below it, e.g. 2GiB",
        default_help="none: an export needs room for its image, /readyz room for the largest recent one",
        metavar="SIZE",
        parse=parse_size,
        describe=lambda s: (
            f"exports keep {units.size(s.min_free)} free in the cache dir" if s.min_free else None
        ),
    ),
    Option(
        "refresh_tags",
        "--refresh-tags",
        ENV_REFRESH_TAGS,
        "pull a cached remote tag through Docker again when its last pull is older than this, e.g. 10m or 1h",
        default_help="never, serve Docker's copy",
        metavar="DURATION",
        parse=parse_duration,
        describe=lambda s: (
            f"refresh remote tags after {units.duration(s.refresh_tags)}" if s.refresh_tags else None
        ),
    ),
    Option(
        "docker_credentials",
        "--docker-credentials",
        ENV_DOCKER_CREDENTIALS,
        "pull through Docker with the credentials `docker login` stored on this host when a request "
        "brings none: anyone who can reach the registry can then pull what those credentials can",
        switch="true",
        describe=lambda s: (
            f"pulls without credentials use the host's Docker credentials: anyone who reaches {s.addr} "
            "can pull what they can"
            if s.docker_credentials
            else None
        ),
    ),
    Option(
        "prefetch",
        "--no-prefetch",
        ENV_PREFETCH,
        "do not pre-export tags that move in Docker: a rebuilt tag is then exported when a client next "
        "pulls it",
        switch="false",
        describe=lambda s: (
            None if s.prefetch else "pre-exports off: a moved tag is exported when next pulled"
        ),
    ),
    Option(
        "prefetch_max_age",
        "--prefetch-max-age",
        ENV_PREFETCH_MAX_AGE,
        "pre-export a moved tag only if a client pulled it within this, e.g. 1d or 12h",
        DEFAULT_PREFETCH_MAX_AGE,
        metavar="DURATION",
        parse=parse_duration,
        describe=lambda s: (
            f"pre-export of moved tags on: tags pulled in the last {units.duration(s.prefetch_max_age)}, "
            "as they move in Docker"
            if s.prefetch
            else None
        ),
    ),
    Option(
        "verify_ahead",
        "--no-verify-ahead",
        ENV_VERIFY_AHEAD,
        "do not hash layers served in place ahead of their first pull (new images, and at start the ones "
        "the store took in last): each is hashed as it is first sent instead",
        switch="false",
        describe=lambda s: (
            None if s.verify_ahead else "verification ahead off: layers in place are hashed as first sent"
        ),
    ),
    Option(
        "answer_within",
        "--answer-within",
        ENV_ANSWER_WITHIN,
        "answer containerd's manifest requests within this (503 while the pull or export through Docker "
        "goes on), before containerd's CRI gives up on a pull without progress (5m); 0 waits for the work",
        DEFAULT_ANSWER_WITHIN,
        metavar="DURATION",
        parse=_duration_or_off,
        describe=lambda s: (
            f"containerd is answered within {units.duration(s.answer_within)}: 503 while a pull or export "
            "goes on, so a node tries the upstream"
            if s.answer_within
            else "containerd's requests wait for every pull and export"
        ),
    ),
    Option(
        "body_timeout",
        "--body-timeout",
        ENV_BODY_TIMEOUT,
        "give up on a manifest or blob upload whose body sends nothing for this long: the client gets an "
        "error, its upload is dropped with what it wrote; 0 waits for ever",
        DEFAULT_BODY_TIMEOUT,
        metavar="DURATION",
        parse=_duration_or_off,
        describe=lambda s: (
            f"request bodies idle for {units.duration(s.body_timeout)} are given up on"
            if s.body_timeout
            else "request bodies are waited for however long they stall"
        ),
    ),
    Option(
        "max_uploads",
        "--max-uploads",
        ENV_MAX_UPLOADS,
        "blob uploads open at once; more get 429 (TOOMANYREQUESTS) with Retry-After",
        DEFAULT_MAX_UPLOADS,
        metavar="N",
        parse=_positive,
    ),
    Option(
        "log_level",
        "--log-level",
        ENV_LOG_LEVEL,
        "how much to log; debug adds tracebacks to errors",
        "info",
        choices=LOG_LEVELS,
        parse=_one_of("log level", LOG_LEVELS),
        describe=lambda s: f"log level {s.log_level}",
    ),
    Option(
        "log_format",
        "--log-format",
        ENV_LOG_FORMAT,
        "text lines or one JSON object per line",
        "text",
        choices=LOG_FORMATS,
        parse=_one_of("log format", LOG_FORMATS),
    ),
    Option(
        "load_pushed",
        "--no-load-pushed",
        ENV_LOAD_PUSHED,
        "do not load pushed images into Docker",
        switch="false",
        describe=lambda s: f"pushed images {'are' if s.load_pushed else 'are not'} loaded into Docker",
    ),
    Option(
        "allow_docker_overwrite",
        "--allow-docker-overwrite",
        ENV_ALLOW_DOCKER_OVERWRITE,
        "let a pushed image replace a tag Docker already has; by default a push moves only tags this "
        "registry's own loads made",
        switch="true",
        describe=lambda s: "pushes may replace Docker's own tags" if s.allow_docker_overwrite else None,
    ),
    Option(
        "allow_docker_delete",
        "--allow-docker-delete",
        ENV_ALLOW_DOCKER_DELETE,
        "let DELETE requests remove Docker's own images, not only pushed content",
        switch="true",
        describe=lambda s: "DELETE may remove Docker's own images" if s.allow_docker_delete else None,
    ),
    Option(
        "htpasswd_path",
        "--auth-htpasswd-path",
        ENV_HTPASSWD_PATH,
        "pushes and deletes need credentials from this htpasswd file of bcrypt entries, as `htpasswd -B` "
        f"writes them; pulls stay open; the environment variable with {ENV_AUTH}=htpasswd",
        metavar="FILE",
        parse=_path,
    ),
    Option(
        "htpasswd_realm",
        "--auth-htpasswd-realm",
        ENV_HTPASSWD_REALM,
        "the realm named in the push challenge",
        DEFAULT_REALM,
        metavar="REALM",
    ),
    Option(
        "zero_copy",
        "--no-zero-copy",
        ENV_ZERO_COPY,
        "export every image from Docker, also when Docker's own store (its containerd image store, or the "
        "classic store's directories) could be served where it lies",
        switch="false",
        describe=lambda s: (
            None if s.zero_copy else "zero-copy from containerd is off: every image is exported"
        ),
    ),
    Option(
        "docker_root",
        "--docker-root",
        ENV_DOCKER_ROOT,
        "where Docker's data root (its classic image store) is seen from here, when not at the path Docker "
        "reports (a container mounting the host's /var/lib/docker elsewhere)",
        default_help="what Docker reports",
        metavar="DIR",
        describe=lambda s: f"Docker's data root read at {s.docker_root}" if s.docker_root else None,
    ),
    Option(
        "containerd_address",
        "--containerd-address",
        ENV_CONTAINERD_ADDRESS,
        "the socket of the containerd Docker's image store lives in",
        default_help="what Docker reports, else dockerd's own, else /run/containerd/containerd.sock",
        metavar="SOCKET",
    ),
    Option(
        "containerd_namespace",
        "--containerd-namespace",
        ENV_CONTAINERD_NAMESPACE,
        "the containerd namespace of Docker's images",
        default_help="what Docker reports, else moby",
        metavar="NAME",
    ),
    Option(
        "tls_cert",
        "--tls-cert",
        ENV_TLS_CERT,
        "serve HTTPS with this certificate chain",
        metavar="FILE",
        parse=_path,
        describe=lambda s: f"serving HTTPS with {s.tls_cert}" if s.tls_cert else None,
    ),
    Option("tls_key", "--tls-key", ENV_TLS_KEY, "the certificate's private key", metavar="FILE", parse=_path),
)
OPTION = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    addr: str
    cache_dir: Path
    # Evict least recently used images when the cache grows past this many bytes; None: no limit.
    cache_max_size: int | None
    # Exports that would leave less free in the cache dir are refused; /readyz reports it. None: no floor.
    min_free: int | None
    refresh_tags: float | None
    # Pull through Docker with the docker CLI's stored credentials when a request brings none.
    docker_credentials: bool
    # Pre-export tags clients pulled within `prefetch_max_age` seconds when they move in Docker.
    prefetch: bool
    prefetch_max_age: float
    # Hash the blobs of images served in place ahead of their first pull.
    verify_ahead: bool
    # Answer containerd's manifest requests within this many seconds (503 while the pull or export goes
    # on), so a node can try the upstream before its CRI cancels the pull; None: wait for the work.
    answer_within: float | None
    # Give up on a request body that sends nothing for this many seconds (None: wait); upload sessions
    # open at once.
    body_timeout: float | None
    max_uploads: int
    log_level: str
    log_format: str
    # Load pushed images into Docker; let a loaded push move a tag Docker already had (not one this
    # registry's own load made); let DELETE remove Docker's own images.
    load_pushed: bool
    allow_docker_overwrite: bool
    allow_docker_delete: bool
    # Pushes and deletes need credentials from this htpasswd file; None: anyone may write.
    htpasswd_path: Path | None
    htpasswd_realm: str
    # Serve Docker's containerd image store from containerd's content store; where that containerd
    # listens and the namespace of Docker's images (None: as Docker reports, or the usual places).
    zero_copy: bool
    docker_root: str | None
    containerd_address: str | None
    containerd_namespace: str | None
    # Serve HTTPS with this certificate (chain) and key; plain HTTP when None.
    tls_cert: Path | None
    tls_key: Path | None
    # setting name -> "flag --addr", "env REGISTRY_HTTP_ADDR" or "default"
    sources: Mapping[str, str]

    @property
    def host(self) -> str | None:
        return parse_addr(self.addr)[0]

    @property
    def port(self) -> int:
        return parse_addr(self.addr)[1]

    def described(self) -> Iterator[str]:
        """The start log's lines, each with where its value came from."""
        for option in OPTIONS:
            text = option.describe(self)
            if text is not None:
                yield f"{text} ({self.sources[option.name]})"


def resolve(*, env: Mapping[str, str] = os.environ, **flags: Any) -> Settings:
    """The settings from the flags given (by the parser's names, None when not given) and the environment;
    an empty environment variable counts as unset."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        text, sources[option.name] = option.pick(flags, env)
        values[option.name] = option.read(text) if text is not None else None
    values["cache_dir"] = values["cache_dir"] or default_cache_dir(env)
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise SettingError("TLS needs both a certificate (--tls-cert) and a key (--tls-key)")
    scheme = env.get(ENV_AUTH, "").strip().lower()
    if scheme not in ("", "htpasswd"):
        raise SettingError(
            f"{ENV_AUTH}={env[ENV_AUTH]!r} is not supported: pushes are checked against an htpasswd file "
            f"({ENV_AUTH}=htpasswd with {ENV_HTPASSWD_PATH})"
        )
    if scheme and not values["htpasswd_path"]:
        raise SettingError(
            f"{ENV_AUTH}=htpasswd needs the file: set {ENV_HTPASSWD_PATH} or --auth-htpasswd-path"
        )
    return Settings(**values, sources=sources)


def resolve_cache_dir(flag: str | None, env: Mapping[str, str]) -> tuple[Path, str]:
    """The cache dir and where it came from, for the commands that take no other setting."""
    text, source = OPTION["cache_dir"].pick({"cache_dir": flag}, env)
    return (_path(text) if text else default_cache_dir(env)), source
