"""The command line: options per command, one-line errors, and the process set-up the server does."""

from __future__ import annotations

import argparse
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from k3d_registry_dockerd import cli, server
from k3d_registry_dockerd.cache.directory import CacheDirLock


@pytest.fixture
def open_files_limit() -> Iterator[tuple[int, int]]:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield before
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_open_files_limit_is_raised_to_the_hard_limit(open_files_limit: tuple[int, int]) -> None:
    _, hard = open_files_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    wanted = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    assert server.raise_open_files_limit() == wanted
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (wanted, hard)


def test_a_soft_limit_already_at_the_hard_one_is_kept(open_files_limit: tuple[int, int]) -> None:
    _, hard = open_files_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert server.raise_open_files_limit() == hard
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)


def test_port_is_answered_with_the_addr_option(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--port", "5001"], ["serve", "--port=5001"], ["doctor", "--port", "1"]):
        assert cli.main(argv) == 2
        error = capsys.readouterr().err
        assert error == (
            "k3d-registry-dockerd: --port is not a server option: it listens on --addr HOST:PORT "
            "(e.g. --addr :5001, or env REGISTRY_HTTP_ADDR)\n"
        )


def _options(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    return {action.option_strings[-1]: action.help for action in parser._actions if action.option_strings}


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = subparsers.choices[name]
    return parser


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (("cache", "ls"), {"--help", "--cache-dir"}),
        (("cache", "verify"), {"--help", "--cache-dir"}),
        (("cache", "prune"), {"--help", "--cache-dir", "--all", "--older-than", "--include-pushed"}),
        (("config", "k3d"), {"--help", "--name", "--port", "--image", "--shared", "--containerd"}),
        (("config", "kind"), {"--help", "--name", "--port", "--image", "--hosts-dir"}),
        (("config", "registries"), {"--help", "--name", "--port"}),
        (("config", "local-registry-hosting"), {"--help", "--name", "--port", "--shared"}),
        (("config", "ctlptl"), {"--help", "--name", "--port", "--image", "--containerd"}),
        (("warm",), {"--help", "--file", "--registry", "--parallel"}),
    ],
)
def test_each_command_lists_only_its_own_options_each_described(
    path: tuple[str, ...], expected: set[str]
) -> None:
    options = _options(_subparser(cli.build_parser(), *path))
    assert set(options) == expected
    assert all(options.values())


def test_server_options_are_described() -> None:
    parser = cli.build_parser()
    for which in ((), ("serve",), ("doctor",)):
        options = _options(_subparser(parser, *which))
        assert {"--addr", "--cache-dir", "--auth-htpasswd-path", "--allow-docker-overwrite"} <= set(options)
        assert all(options.values()), which


def test_prune_needs_a_duration_with_a_unit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["cache", "prune", "--older-than", "7", "--cache-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "k3d-registry-dockerd: duration '7' needs a unit: 7s, 7m, 7h or 7d\n"


@pytest.mark.parametrize("action", ["ls", "verify", "prune --all"])
def test_cache_commands_on_a_missing_dir_create_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, action: str
) -> None:
    missing = tmp_path / "none"
    assert cli.main(["cache", *action.split(), "--cache-dir", str(missing)]) == 1
    assert capsys.readouterr().err.startswith(f"k3d-registry-dockerd: no cache at {missing}, nothing to ")
    assert not missing.exists()


def test_cache_commands_refuse_a_dir_a_registry_holds(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with CacheDirLock(tmp_path):
        assert cli.main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert f"cache dir {tmp_path} is in use by a running k3d-registry-dockerd (PID {os.getpid()})" in error
    assert cli.main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 0


def test_invalid_docker_host_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "bogus")
    assert cli.main(["doctor"]) == 2
    assert capsys.readouterr().err == (
        "k3d-registry-dockerd: DOCKER_HOST='bogus' is not a Docker address: "
        "use unix:///path/to/docker.sock or tcp://HOST:PORT\n"
    )


def test_an_unexpected_error_is_one_line_with_its_traceback_only_for_debug(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_args: argparse.Namespace) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_run", broken)
    assert cli.main(["doctor"]) == 1
    assert capsys.readouterr().err == (
        "k3d-registry-dockerd: unexpected error: RuntimeError('boom') (run with --log-level debug for the "
        "traceback)\n"
    )
    assert cli.main(["--log-level", "debug", "doctor"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("Traceback (most recent call last):") and "RuntimeError: boom" in error
