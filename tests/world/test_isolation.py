"""Repository isolation and credential hygiene around an image pulled with credentials.

A private image in the htpasswd upstream is pulled through the registry with the pull secret (as
containerd does after the 401 challenge). Its blobs must then be served under that repository only: not
under the own-namespace forms of the name, another `ns`, a name differing by case or by a component, and
a cross-repository mount must not copy them into a repository of the registry's own namespace. The
password must appear nowhere the registry writes or serves: its log (at debug level), its cache, the
status page and the metrics.

Under its own repository and `ns` it is served only to credentials the upstream accepts (README, "Private
images"; tests/world/test_private_content.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.parse
from collections.abc import Iterator

import pytest

from . import oci_client
from .daemons import Dockerd, RegistryFactory, RegistryProcess, UpstreamRegistry, free_port
from .images import MiB, PushedImage, build_image, push_image

ACCEPT = oci_client.MANIFEST_ACCEPT
PRIVATE = "private/iso"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def get(
    registry: RegistryProcess,
    name: str,
    kind: str,
    ref: str,
    *,
    ns: str | None = None,
    auth: str | None = None,
    method: str = "GET",
) -> oci_client.Response:
    url = f"{registry.url}/v2/{name}/{kind}/{ref}"
    if ns is not None:
        url += "?" + urllib.parse.urlencode({"ns": ns})
    headers = {"Accept": ACCEPT, **({"Authorization": auth} if auth else {})}
    return oci_client.request(url, method=method, headers=headers, timeout=120)


def error_code(response: oci_client.Response) -> str:
    assert response.headers.get("content-type", "").startswith("application/json"), response
    (error,) = response.json()["errors"]
    return str(error["code"])


@pytest.fixture
def private_pull(
    docker20: Dockerd,
    docker: Dockerd,
    upstream_auth: UpstreamRegistry,
    registry_under_test: RegistryFactory,
) -> Iterator[tuple[RegistryProcess, PushedImage, dict[str, object]]]:
    """The private image pulled through the registry with credentials: (registry, image, manifest)."""
    built = build_image(docker20, "iso-src:1", layers=2, size=1 * MiB, seed="isolation")
    pushed = push_image(docker20, built, upstream_auth, PRIVATE, "v1")
    # docker outlives the test: an earlier test's pull must not make this one's credentials unnecessary.
    docker.docker("rmi", "--force", pushed.ref, check=False)
    registry = registry_under_test(docker)
    user, password = upstream_auth.credentials or ("", "")
    auth = basic(user, password)

    anonymous = get(registry, PRIVATE, "manifests", "v1", ns=upstream_auth.addr)
    assert anonymous.status == 401, anonymous
    answer = get(registry, PRIVATE, "manifests", "v1", ns=upstream_auth.addr, auth=auth)
    assert answer.status == 200, answer
    manifest = answer.json()
    for descriptor in [manifest["config"], *manifest["layers"]]:
        blob = get(registry, PRIVATE, "blobs", descriptor["digest"], ns=upstream_auth.addr, auth=auth)
        assert blob.status == 200, blob.status
        assert f"sha256:{hashlib.sha256(blob.body).hexdigest()}" == descriptor["digest"]
    yield registry, pushed, manifest
    docker.docker("rmi", "--force", pushed.ref, check=False)


def private_digests(manifest: dict[str, object]) -> list[str]:
    config = manifest["config"]
    layers = manifest["layers"]
    assert isinstance(config, dict) and isinstance(layers, list)
    return [config["digest"], *(layer["digest"] for layer in layers)]


def test_private_blobs_are_not_served_under_other_names(
    private_pull: tuple[RegistryProcess, PushedImage, dict[str, object]], upstream_auth: UpstreamRegistry
) -> None:
    registry, _pushed, manifest = private_pull
    addr = upstream_auth.addr
    port = addr.rpartition(":")[2]
    elsewhere: list[tuple[str, str | None]] = [
        # The registry's own namespace: docker.io/private/iso and friends.
        (PRIVATE, None),
        (f"library/{PRIVATE}", None),
        ("iso", None),
        # The upstream's host without its port, as a name (a name cannot hold a port).
        (f"127.0.0.1/{PRIVATE}", None),
        (f"localhost/{PRIVATE}", None),
        # Another registry.
        (PRIVATE, "docker.io"),
        (PRIVATE, f"127.0.0.1:{free_port()}"),
        (PRIVATE, f"localhost:{port}"),
        (PRIVATE, "127.0.0.1"),
        # The same registry, a neighbouring repository.
        (f"{PRIVATE}/extra", addr),
        ("private", addr),
        (f"{PRIVATE}-x", addr),
        (f"{PRIVATE}o", addr),
        ("other/iso", addr),
        (f"x/{PRIVATE}", addr),
    ]
    # A name differing by case is no repository name at all (the grammar is lower case).
    by_case = [("Private/iso", addr), ("private/ISO", addr)]
    served = []
    for digest in private_digests(manifest):
        for name, ns in elsewhere:
            for method in ("GET", "HEAD"):
                answer = get(registry, name, "blobs", digest, ns=ns, method=method)
                if answer.status != 404 or (method == "GET" and error_code(answer) != "BLOB_UNKNOWN"):
                    served.append((method, name, ns, digest, answer.status, answer.body[:200]))
        for name, ns in by_case:
            answer = get(registry, name, "blobs", digest, ns=ns)
            if answer.status != 400 or error_code(answer) != "NAME_INVALID":
                served.append(("GET", name, ns, digest, answer.status, answer.body[:200]))
    assert served == [], "private blobs answered elsewhere:\n" + "\n".join(map(str, served))
    # Still served where they belong, to credentials the upstream accepts (the check above did not just
    # break the registry); without them not even there (the image is private, see test_private_content).
    user, password = upstream_auth.credentials or ("", "")
    for digest in private_digests(manifest):
        assert get(registry, PRIVATE, "blobs", digest, ns=addr, method="HEAD").status == 401
        owner = get(registry, PRIVATE, "blobs", digest, ns=addr, method="HEAD", auth=basic(user, password))
        assert owner.status == 200


def test_private_blobs_cannot_be_mounted_into_the_own_namespace(
    private_pull: tuple[RegistryProcess, PushedImage, dict[str, object]], upstream_auth: UpstreamRegistry
) -> None:
    registry, _pushed, manifest = private_pull
    addr = upstream_auth.addr
    sources = [
        PRIVATE,
        f"{addr}/{PRIVATE}",
        f"127.0.0.1/{PRIVATE}",
        f"localhost/{PRIVATE}",
        f"library/{PRIVATE}",
        f"docker.io/{PRIVATE}",
    ]
    mounted = []
    for digest in private_digests(manifest):
        for source in sources:
            query = urllib.parse.urlencode({"mount": digest, "from": source})
            url = f"{registry.url}/v2/public/iso/blobs/uploads/?{query}"
            answer = oci_client.request(url, method="POST")
            if answer.status == 202:
                # An upload was started instead: the client would push the bytes itself. Tidy up.
                oci_client.request(f"{registry.url}{answer.headers['location']}", method="DELETE")
            else:
                mounted.append((source, digest, answer.status, answer.headers.get("location")))
            blob = get(registry, "public/iso", "blobs", digest)
            if blob.status != 404:
                mounted.append((source, digest, "readable in public/iso", blob.status))
    assert mounted == [], "private blobs were mounted into the own namespace:\n" + "\n".join(
        map(str, mounted)
    )
    assert "mounted " not in registry.log_text()


def secret_forms(user: str, password: str, addr: str) -> dict[str, str]:
    """The password as it could leak: plain, in Basic credentials, in Docker's X-Registry-Auth."""
    auth_json = json.dumps({"username": user, "password": password, "serveraddress": addr})
    return {
        "password": password,
        "url-encoded password": urllib.parse.quote(password, safe=""),
        "base64(password)": base64.b64encode(password.encode()).decode(),
        "base64(user:password)": base64.b64encode(f"{user}:{password}".encode()).decode(),
        "X-Registry-Auth": base64.urlsafe_b64encode(auth_json.encode()).decode(),
        "X-Registry-Auth (no serveraddress)": base64.urlsafe_b64encode(
            json.dumps({"username": user, "password": password}).encode()
        ).decode(),
    }


def test_the_password_appears_nowhere(
    private_pull: tuple[RegistryProcess, PushedImage, dict[str, object]], upstream_auth: UpstreamRegistry
) -> None:
    registry, _pushed, _manifest = private_pull
    user, password = upstream_auth.credentials or ("", "")
    # A refused password and one more pull with the right one, so every code path logged something.
    refused = get(registry, PRIVATE, "manifests", "v1", ns=upstream_auth.addr, auth=basic(user, "wrong-pw"))
    assert refused.status == 401, refused
    again = get(registry, PRIVATE, "manifests", "v1", ns=upstream_auth.addr, auth=basic(user, password))
    assert again.status == 200
    surfaces = {
        "registry log": registry.log_text(),
        "/status.json": oci_client.request(f"{registry.url}/status.json").body.decode(errors="replace"),
        "/metrics": oci_client.request(f"{registry.url}/metrics").body.decode(errors="replace"),
    }
    for path in registry.cache_dir.rglob("*"):
        if path.is_file() and "blobs" not in path.parts:
            surfaces[f"cache file {path.relative_to(registry.cache_dir)}"] = path.read_text(errors="replace")
    assert "debug" in registry.argv(), "the log is checked at its most verbose"
    leaks = [
        (form, where)
        for form, secret in secret_forms(user, password, upstream_auth.addr).items()
        for where, text in surfaces.items()
        if secret in text
    ]
    leaks += [("wrong password", where) for where, text in surfaces.items() if "wrong-pw" in text]
    assert leaks == [], f"credentials leak: {leaks}"
