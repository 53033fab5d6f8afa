"""htpasswd write access: bcrypt entries, reloading, remembered verifications."""

from __future__ import annotations

from pathlib import Path

import bcrypt
import pytest
from aiohttp import encode_basic_auth

from k3d_registry_dockerd.web.auth import Htpasswd, HtpasswdError, parse_htpasswd


def _entry(user: str, password: str, prefix: bytes = b"$2y$") -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4))
    return f"{user}:{(prefix + hashed[4:]).decode()}"


def _basic(user: str, password: str) -> str:
    return encode_basic_auth(user, password)


def test_parse_accepts_bcrypt_and_skips_comments(tmp_path: Path) -> None:
    text = f"# pushers\n{_entry('alice', 'a')}\n\n{_entry('bob', 'b', b'$2b$')}\n"
    assert sorted(parse_htpasswd(text, tmp_path / "h")) == ["alice", "bob"]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("alice:$apr1$abc$def", r"line 1 \(alice\) is not a bcrypt entry: create entries with `htpasswd -B`"),
        ("alice:{SHA}abc=", "not a bcrypt entry"),
        ("no-colon-here", "line 1 is not USER:HASH"),
    ],
)
def test_parse_refuses_what_distribution_refuses(tmp_path: Path, line: str, why: str) -> None:
    with pytest.raises(HtpasswdError, match=why):
        parse_htpasswd(line, tmp_path / "h")


async def test_allows_only_valid_credentials(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(_entry("alice", "s3cret") + "\n")
    auth = Htpasswd(path, "pushes")
    assert auth.challenge == {"WWW-Authenticate": 'Basic realm="pushes"'}
    assert await auth.allows(_basic("alice", "s3cret")) == "alice"
    assert await auth.allows(_basic("alice", "s3cret")) == "alice"  # remembered
    assert await auth.allows(_basic("alice", "wrong")) is None
    assert await auth.allows(_basic("mallory", "s3cret")) is None
    assert await auth.allows(_basic("alice", "x" * 100)) is None
    assert await auth.allows(None) is None
    assert await auth.allows("Bearer abc") is None
    assert await auth.allows("Basic not-base64!") is None


async def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(_entry("alice", "one") + "\n")
    auth = Htpasswd(path, "r")
    assert await auth.allows(_basic("alice", "one")) == "alice"
    path.write_text(_entry("alice", "two") + "\n" + _entry("carol", "three") + "\n")
    assert await auth.allows(_basic("alice", "one")) is None
    assert await auth.allows(_basic("alice", "two")) == "alice"
    assert await auth.allows(_basic("carol", "three")) == "carol"


async def test_an_unreadable_file_refuses_everyone(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(_entry("alice", "one") + "\n")
    auth = Htpasswd(path, "r")
    assert await auth.allows(_basic("alice", "one")) == "alice"
    path.unlink()
    assert await auth.allows(_basic("alice", "one")) is None
    with pytest.raises(HtpasswdError, match="cannot read the htpasswd file"):
        auth.load()
