from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from k3d_registry_dockerd.settings import (
    ENV_ADDR,
    ENV_CACHE_DIR,
    ENV_LOG_LEVEL,
    ENV_REFRESH_TAGS,
    OPTIONS,
    SettingError,
    Settings,
    default_cache_dir,
    format_addr,
    parse_addr,
    parse_duration,
    parse_size,
    resolve,
)

NO_FLAGS = {"addr": None, "cache_dir": None, "log_level": None, "refresh_tags": None}


def test_defaults() -> None:
    settings = resolve(**NO_FLAGS, env={"HOME": "/home/u"})
    assert (settings.host, settings.port) == (None, 5000)
    assert settings.addr == ":5000"
    assert settings.cache_dir == Path("/home/u/.cache/k3d-registry-dockerd")
    assert settings.log_level == "info"
    assert settings.refresh_tags is None
    assert dict(settings.sources) == {
        "addr": "default",
        "cache_dir": "default",
        "log_level": "default",
        "log_format": "default",
        "refresh_tags": "default",
        "cache_max_size": "default",
        "min_free": "default",
        "tls_cert": "default",
        "tls_key": "default",
        "load_pushed": "default",
        "allow_docker_delete": "default",
        "allow_docker_overwrite": "default",
        "htpasswd_path": "default",
        "htpasswd_realm": "default",
        "zero_copy": "default",
        "docker_root": "default",
        "containerd_address": "default",
        "containerd_namespace": "default",
        "prefetch": "default",
        "prefetch_max_age": "default",
        "verify_ahead": "default",
        "docker_credentials": "default",
        "answer_within": "default",
        "body_timeout": "default",
        "max_uploads": "default",
    }
    assert (settings.body_timeout, settings.max_uploads) == (60.0, 64)
    assert settings.zero_copy is True
    assert (settings.containerd_address, settings.containerd_namespace) == (None, None)


def test_containerd_settings_read_ctr_s_variables() -> None:
    env = {"CONTAINERD_ADDRESS": "/run/k/containerd.sock", "CONTAINERD_NAMESPACE": "docker", "HOME": "/h"}
    settings = resolve(**NO_FLAGS, env=env)
    assert (settings.containerd_address, settings.containerd_namespace) == (
        "/run/k/containerd.sock",
        "docker",
    )
    assert settings.sources["containerd_address"] == "env CONTAINERD_ADDRESS"
    off = resolve(**{**NO_FLAGS, "no_zero_copy": True}, env={"HOME": "/h"})
    assert off.zero_copy is False and off.sources["zero_copy"] == "flag --no-zero-copy"
    assert resolve(**NO_FLAGS, env={"K3D_REGISTRY_DOCKERD_ZERO_COPY": "false"}).zero_copy is False


def test_prefetch_is_on_for_a_week_by_default_and_can_be_turned_off() -> None:
    settings = resolve(**NO_FLAGS, env={"HOME": "/h"})
    assert (settings.prefetch, settings.prefetch_max_age) == (True, 7 * 86400)
    off = resolve(**{**NO_FLAGS, "no_prefetch": True}, env={"HOME": "/h"})
    assert off.prefetch is False and off.sources["prefetch"] == "flag --no-prefetch"
    env = {"K3D_REGISTRY_DOCKERD_PREFETCH": "false", "K3D_REGISTRY_DOCKERD_PREFETCH_MAX_AGE": "12h"}
    from_env = resolve(**NO_FLAGS, env=env)
    assert (from_env.prefetch, from_env.prefetch_max_age) == (False, 12 * 3600)
    assert resolve(**{**NO_FLAGS, "prefetch_max_age": "30m"}, env=env).prefetch_max_age == 1800
    with pytest.raises(SettingError, match="needs a unit"):
        resolve(**{**NO_FLAGS, "prefetch_max_age": "7"}, env={})


def test_verification_ahead_is_on_by_default_and_can_be_turned_off() -> None:
    assert resolve(**NO_FLAGS, env={"HOME": "/h"}).verify_ahead is True
    off = resolve(**{**NO_FLAGS, "no_verify_ahead": True}, env={"HOME": "/h"})
    assert off.verify_ahead is False and off.sources["verify_ahead"] == "flag --no-verify-ahead"
    assert "verification ahead off" in "\n".join(off.described())
    assert resolve(**NO_FLAGS, env={"K3D_REGISTRY_DOCKERD_VERIFY_AHEAD": "false"}).verify_ahead is False


def test_containerd_is_answered_within_four_minutes_by_default() -> None:
    assert resolve(**NO_FLAGS, env={"HOME": "/h"}).answer_within == 240
    assert resolve(**{**NO_FLAGS, "answer_within": "90s"}, env={}).answer_within == 90
    for off in ("0", "off"):
        assert resolve(**NO_FLAGS, env={"K3D_REGISTRY_DOCKERD_ANSWER_WITHIN": off}).answer_within is None
    with pytest.raises(SettingError, match="needs a unit"):
        resolve(**{**NO_FLAGS, "answer_within": "30"}, env={})


def test_env_beats_default() -> None:
    env = {
        ENV_ADDR: "127.0.0.1:5001",
        ENV_CACHE_DIR: "/var/cache/r",
        ENV_LOG_LEVEL: "DEBUG",
        ENV_REFRESH_TAGS: "10m",
    }
    settings = resolve(**NO_FLAGS, env=env)
    assert (settings.host, settings.port) == ("127.0.0.1", 5001)
    assert settings.cache_dir == Path("/var/cache/r")
    assert settings.log_level == "debug"
    assert settings.refresh_tags == 600
    assert dict(settings.sources) == {
        "addr": f"env {ENV_ADDR}",
        "cache_dir": f"env {ENV_CACHE_DIR}",
        "log_level": f"env {ENV_LOG_LEVEL}",
        "log_format": "default",
        "refresh_tags": f"env {ENV_REFRESH_TAGS}",
        "cache_max_size": "default",
        "min_free": "default",
        "tls_cert": "default",
        "tls_key": "default",
        "load_pushed": "default",
        "allow_docker_delete": "default",
        "allow_docker_overwrite": "default",
        "htpasswd_path": "default",
        "htpasswd_realm": "default",
        "zero_copy": "default",
        "docker_root": "default",
        "containerd_address": "default",
        "containerd_namespace": "default",
        "prefetch": "default",
        "prefetch_max_age": "default",
        "verify_ahead": "default",
        "docker_credentials": "default",
        "answer_within": "default",
        "body_timeout": "default",
        "max_uploads": "default",
    }


def test_flag_beats_env() -> None:
    env = {ENV_ADDR: "127.0.0.1:5001", ENV_CACHE_DIR: "/env", ENV_LOG_LEVEL: "debug", ENV_REFRESH_TAGS: "1h"}
    settings = resolve(addr="[::1]:6000", cache_dir="/flag", log_level="error", refresh_tags="30s", env=env)
    assert (settings.host, settings.port) == ("::1", 6000)
    assert settings.addr == "[::1]:6000"
    assert settings.cache_dir == Path("/flag")
    assert settings.log_level == "error"
    assert settings.refresh_tags == 30
    assert dict(settings.sources) == {
        "addr": "flag --addr",
        "cache_dir": "flag --cache-dir",
        "log_level": "flag --log-level",
        "log_format": "default",
        "refresh_tags": "flag --refresh-tags",
        "cache_max_size": "default",
        "min_free": "default",
        "tls_cert": "default",
        "tls_key": "default",
        "load_pushed": "default",
        "allow_docker_delete": "default",
        "allow_docker_overwrite": "default",
        "htpasswd_path": "default",
        "htpasswd_realm": "default",
        "zero_copy": "default",
        "docker_root": "default",
        "containerd_address": "default",
        "containerd_namespace": "default",
        "prefetch": "default",
        "prefetch_max_age": "default",
        "verify_ahead": "default",
        "docker_credentials": "default",
        "answer_within": "default",
        "body_timeout": "default",
        "max_uploads": "default",
    }


def test_empty_env_values_count_as_unset() -> None:
    settings = resolve(**NO_FLAGS, env={ENV_ADDR: "", ENV_LOG_LEVEL: "", "HOME": "/h"})
    assert settings.port == 5000
    assert settings.sources["addr"] == "default"
    assert settings.sources["log_level"] == "default"


def test_cache_dir_expands_user() -> None:
    settings = resolve(**{**NO_FLAGS, "cache_dir": "~/registry-cache"}, env={})
    assert settings.cache_dir == Path("~/registry-cache").expanduser()


@pytest.mark.parametrize("level", ["verbose", "trace", "critical"])
def test_invalid_log_level(level: str) -> None:
    with pytest.raises(SettingError, match="log level"):
        resolve(**{**NO_FLAGS, "log_level": level}, env={})
    with pytest.raises(SettingError, match="log level"):
        resolve(**NO_FLAGS, env={ENV_LOG_LEVEL: level})


def test_invalid_values_from_env_are_errors() -> None:
    with pytest.raises(SettingError):
        resolve(**NO_FLAGS, env={ENV_ADDR: "nonsense"})
    with pytest.raises(SettingError):
        resolve(**NO_FLAGS, env={ENV_REFRESH_TAGS: "5x"})


def test_default_cache_dir() -> None:
    assert default_cache_dir({"XDG_CACHE_HOME": "/xdg", "HOME": "/home/u"}) == Path(
        "/xdg/k3d-registry-dockerd"
    )
    assert default_cache_dir({"HOME": "/home/u"}) == Path("/home/u/.cache/k3d-registry-dockerd")
    assert default_cache_dir({"XDG_CACHE_HOME": "", "HOME": "/home/u"}) == Path(
        "/home/u/.cache/k3d-registry-dockerd"
    )
    assert default_cache_dir({}) == Path.home() / ".cache" / "k3d-registry-dockerd"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":5000", (None, 5000)),
        ("0.0.0.0:5000", ("0.0.0.0", 5000)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:5000", ("::1", 5000)),
        ("[::]:5000", ("::", 5000)),
    ],
)
def test_parse_addr(text: str, expected: tuple[str | None, int]) -> None:
    assert parse_addr(text) == expected


@pytest.mark.parametrize(
    "text", ["", "5000", "localhost", "host:", ":0", ":65536", ":-1", ":http", "host:50 00", "[::1]", ":"]
)
def test_parse_addr_rejects(text: str) -> None:
    with pytest.raises(SettingError):
        parse_addr(text)


def test_parse_addr_rejects_bare_ipv6() -> None:
    with pytest.raises(SettingError):
        parse_addr("::1")


@pytest.mark.parametrize(
    ("host", "port", "addr"), [(None, 5000, ":5000"), ("::1", 1, "[::1]:1"), ("h", 2, "h:2")]
)
def test_settings_addr(host: str | None, port: int, addr: str) -> None:
    assert format_addr(host, port) == addr
    settings = resolve(**{**NO_FLAGS, "addr": addr}, env={})
    assert (settings.addr, settings.host, settings.port) == (addr, host, port)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0s", 0.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1h30m15s", 5415.0),
        ("1d", 86400.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        (" 10m ", 600.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5x", "", "  ", "s", "1h 30m", "-5s", "1hh", "30s5", "m5", "1.s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(SettingError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["7", "0", "1.5"])
def test_a_bare_number_is_no_duration(text: str) -> None:
    with pytest.raises(
        SettingError, match=f"duration '{text}' needs a unit: {text}s, {text}m, {text}h or {text}d"
    ):
        parse_duration(text)


def test_tls_from_distributions_environment_and_flags() -> None:
    env = {"REGISTRY_HTTP_TLS_CERTIFICATE": "/env/cert.pem", "REGISTRY_HTTP_TLS_KEY": "/env/key.pem"}
    settings = resolve(**NO_FLAGS, env=env)
    assert (settings.tls_cert, settings.tls_key) == (Path("/env/cert.pem"), Path("/env/key.pem"))
    assert settings.sources["tls_cert"] == "env REGISTRY_HTTP_TLS_CERTIFICATE"
    flagged = resolve(**NO_FLAGS, tls_cert="/f/c.pem", tls_key="/f/k.pem", env=env)
    assert (flagged.tls_cert, flagged.tls_key) == (Path("/f/c.pem"), Path("/f/k.pem"))
    assert flagged.sources["tls_key"] == "flag --tls-key"


def test_tls_needs_certificate_and_key() -> None:
    with pytest.raises(SettingError, match="both"):
        resolve(**NO_FLAGS, tls_cert="/c.pem", env={})
    with pytest.raises(SettingError, match="both"):
        resolve(**NO_FLAGS, env={"REGISTRY_HTTP_TLS_KEY": "/k.pem"})


def test_log_format() -> None:
    assert resolve(**NO_FLAGS, env={}).log_format == "text"
    assert resolve(**NO_FLAGS, env={"K3D_REGISTRY_DOCKERD_LOG_FORMAT": "JSON"}).log_format == "json"
    assert (
        resolve(**NO_FLAGS, log_format="text", env={"K3D_REGISTRY_DOCKERD_LOG_FORMAT": "json"}).log_format
        == "text"
    )
    with pytest.raises(SettingError, match="log format"):
        resolve(**NO_FLAGS, log_format="xml", env={})


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("20GiB", 20 << 30),
        ("500MB", 500_000_000),
        ("1.5G", 1_500_000_000),
        ("1024", 1024),
        ("10mib", 10 << 20),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "5XB", "-1GB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(SettingError):
        parse_size(text)


def test_cache_max_size_from_env() -> None:
    settings = resolve(**NO_FLAGS, env={"K3D_REGISTRY_DOCKERD_CACHE_MAX_SIZE": "2GiB"})
    assert settings.cache_max_size == 2 << 30
    assert settings.sources["cache_max_size"] == "env K3D_REGISTRY_DOCKERD_CACHE_MAX_SIZE"


def test_push_switches() -> None:
    defaults = resolve(addr=None, cache_dir=None, log_level=None, refresh_tags=None, env={})
    assert defaults.load_pushed and not defaults.allow_docker_delete
    from_env = resolve(
        addr=None,
        cache_dir=None,
        log_level=None,
        refresh_tags=None,
        env={"K3D_REGISTRY_DOCKERD_LOAD_PUSHED": "false", "K3D_REGISTRY_DOCKERD_ALLOW_DOCKER_DELETE": "yes"},
    )
    assert not from_env.load_pushed and from_env.allow_docker_delete
    assert from_env.sources["load_pushed"] == "env K3D_REGISTRY_DOCKERD_LOAD_PUSHED"
    flags = resolve(
        addr=None,
        cache_dir=None,
        log_level=None,
        refresh_tags=None,
        no_load_pushed=True,
        allow_docker_delete=True,
        env={"K3D_REGISTRY_DOCKERD_LOAD_PUSHED": "true"},
    )
    assert not flags.load_pushed and flags.allow_docker_delete
    assert flags.sources["load_pushed"] == "flag --no-load-pushed"
    with pytest.raises(SettingError, match="not a boolean"):
        resolve(
            addr=None,
            cache_dir=None,
            log_level=None,
            refresh_tags=None,
            env={"K3D_REGISTRY_DOCKERD_LOAD_PUSHED": "maybe"},
        )


def test_docker_overwrite_switch() -> None:
    assert not resolve(**NO_FLAGS, env={}).allow_docker_overwrite
    from_env = resolve(**NO_FLAGS, env={"K3D_REGISTRY_DOCKERD_ALLOW_DOCKER_OVERWRITE": "true"})
    assert from_env.allow_docker_overwrite
    assert from_env.sources["allow_docker_overwrite"] == "env K3D_REGISTRY_DOCKERD_ALLOW_DOCKER_OVERWRITE"
    flag = resolve(**NO_FLAGS, allow_docker_overwrite=True, env={})
    assert (
        flag.allow_docker_overwrite
        and flag.sources["allow_docker_overwrite"] == "flag --allow-docker-overwrite"
    )


def test_htpasswd_from_distributions_environment_and_flags() -> None:
    assert resolve(**NO_FLAGS, env={}).htpasswd_path is None
    env = {
        "REGISTRY_AUTH": "htpasswd",
        "REGISTRY_AUTH_HTPASSWD_REALM": "dev pushes",
        "REGISTRY_AUTH_HTPASSWD_PATH": "/etc/registry/htpasswd",
    }
    from_env = resolve(**NO_FLAGS, env=env)
    assert (from_env.htpasswd_path, from_env.htpasswd_realm) == (Path("/etc/registry/htpasswd"), "dev pushes")
    flags = resolve(**NO_FLAGS, htpasswd_path="/a", htpasswd_realm="r", env=env)
    assert (flags.htpasswd_path, flags.htpasswd_realm) == (Path("/a"), "r")
    assert flags.sources["htpasswd_path"] == "flag --auth-htpasswd-path"
    path_only = resolve(**NO_FLAGS, env={"REGISTRY_AUTH_HTPASSWD_PATH": "/p"})
    assert (path_only.htpasswd_path, path_only.htpasswd_realm) == (Path("/p"), "k3d-registry-dockerd")


def test_htpasswd_misconfigurations() -> None:
    with pytest.raises(SettingError, match="REGISTRY_AUTH='token' is not supported"):
        resolve(**NO_FLAGS, env={"REGISTRY_AUTH": "token"})
    with pytest.raises(SettingError, match="REGISTRY_AUTH=htpasswd needs the file"):
        resolve(**NO_FLAGS, env={"REGISTRY_AUTH": "htpasswd"})


def test_every_setting_is_declared_once_with_its_environment_in_its_help() -> None:
    names = [option.name for option in OPTIONS]
    assert len(names) == len(set(names))
    assert set(names) == {field.name for field in fields(Settings)} - {"sources"}
    for option in OPTIONS:
        assert option.env in option.help_text() and option.flag.startswith("--")
        if option.default is not None:
            option.read(option.default)


def test_the_start_log_names_each_value_and_where_it_came_from() -> None:
    settings = resolve(
        **{**NO_FLAGS, "no_load_pushed": True, "cache_max_size": "1GiB"},
        env={"HOME": "/h", "K3D_REGISTRY_DOCKERD_ALLOW_DOCKER_OVERWRITE": "yes"},
    )
    lines = list(settings.described())
    assert "listen address :5000 (default)" in lines
    assert "cache limit 1 GiB (flag --cache-max-size)" in lines
    assert "pushed images are not loaded into Docker (flag --no-load-pushed)" in lines
    assert "pushes may replace Docker's own tags (env K3D_REGISTRY_DOCKERD_ALLOW_DOCKER_OVERWRITE)" in lines
    assert (
        "pre-export of moved tags on: tags pulled in the last 7d, as they move in Docker (default)" in lines
    )
    assert not any("DELETE" in line or "HTTPS" in line for line in lines)


def test_body_timeout_and_max_uploads() -> None:
    env = {"HOME": "/home/u", "K3D_REGISTRY_DOCKERD_BODY_TIMEOUT": "off"}
    settings = resolve(**NO_FLAGS, body_timeout=None, max_uploads="3", env=env)
    assert (settings.body_timeout, settings.max_uploads) == (None, 3)
    assert settings.sources["max_uploads"] == "flag --max-uploads"
    assert resolve(**NO_FLAGS, body_timeout="5s", env={"HOME": "/h"}).body_timeout == 5.0
    for wrong in ("0", "-1", "many"):
        with pytest.raises(SettingError, match="at least 1"):
            resolve(**NO_FLAGS, max_uploads=wrong, env={"HOME": "/h"})
