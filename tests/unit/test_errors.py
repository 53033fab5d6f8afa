from __future__ import annotations

import json

import pytest

from k3d_registry_dockerd.oci.errors import STATUS_BY_CODE, RegistryError


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("BLOB_UNKNOWN", 404),
        ("MANIFEST_UNKNOWN", 404),
        ("NAME_UNKNOWN", 404),
        ("NAME_INVALID", 400),
        ("TAG_INVALID", 400),
        ("DIGEST_INVALID", 400),
        ("MANIFEST_INVALID", 400),
        ("UNAUTHORIZED", 401),
        ("DENIED", 403),
        ("UNSUPPORTED", 405),
        ("TOOMANYREQUESTS", 429),
        ("UNAVAILABLE", 503),
    ],
)
def test_status_by_code(code: str, status: int) -> None:
    assert STATUS_BY_CODE[code] == status
    assert RegistryError(code, "x").status == status


def test_body_without_detail() -> None:
    error = RegistryError("MANIFEST_UNKNOWN", "manifest unknown: alpine:latest")
    assert error.body() == {
        "errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown: alpine:latest"}]
    }
    assert str(error) == "manifest unknown: alpine:latest"
    assert error.headers == {}


def test_body_with_detail_and_explicit_status() -> None:
    error = RegistryError("UNAVAILABLE", "pull failed", status=502, detail={"why": "upstream"})
    assert error.status == 502
    body = error.body()
    assert body == {
        "errors": [{"code": "UNAVAILABLE", "message": "pull failed", "detail": {"why": "upstream"}}]
    }
    assert json.loads(json.dumps(body)) == body


def test_falsy_detail_is_kept() -> None:
    assert RegistryError("DENIED", "no", detail="").body()["errors"][0]["detail"] == ""


def test_headers_are_copied() -> None:
    headers = {"WWW-Authenticate": 'Basic realm="docker.io"'}
    error = RegistryError("UNAUTHORIZED", "login", headers=headers)
    headers.clear()
    assert error.headers == {"WWW-Authenticate": 'Basic realm="docker.io"'}


def test_unknown_code_without_status_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        RegistryError("NO_SUCH_CODE", "x")
