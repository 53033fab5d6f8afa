"""`--docker-credentials`: a private upstream image pulled for a node that sends no credentials, with what
`docker login` stored on the host (an `auths` entry, or a credential helper). The node has no credentials
for the upstream, so a pull that works came through the registry."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

from . import oci_client
from .daemons import Containerd, Dockerd, RegistryFactory, UpstreamRegistry
from .images import MiB, build_image, push_image
from .test_mirror import ACCEPT, ctr_ok, node_name


def test_a_private_image_is_pulled_with_the_host_s_docker_credentials(
    docker26: Dockerd,
    docker20: Dockerd,
    upstream_auth: UpstreamRegistry,
    node: Containerd,
    registry_under_test: RegistryFactory,
    tmp_path: Path,
) -> None:
    user, password = upstream_auth.credentials or ("", "")
    built = build_image(docker20, "hostcred-src:1", layers=1, size=1 * MiB, seed="hostcred")
    by_auths = push_image(docker20, built, upstream_auth, f"hostcred/auths-{node_name(node)}", "v1")
    by_helper = push_image(docker20, built, upstream_auth, f"hostcred/helper-{node_name(node)}", "v1")

    # `docker login` without a helper: an auths entry.
    plain = tmp_path / "plain"
    plain.mkdir()
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (plain / "config.json").write_text(json.dumps({"auths": {upstream_auth.addr: {"auth": auth}}}))
    off = registry_under_test(docker26, env={"DOCKER_CONFIG": str(plain)})
    url = f"{off.url}/v2/{by_auths.repository}/manifests/v1?ns={upstream_auth.addr}"
    assert oci_client.request(url, headers=ACCEPT).status == 401  # off by default
    off.stop()

    registry = registry_under_test(
        docker26, extra_args=["--docker-credentials"], env={"DOCKER_CONFIG": str(plain)}
    )
    node.set_mirror(registry.addr)
    ctr_ok(node, by_auths.ref)
    assert docker26.image_id(by_auths.ref)
    log = registry.log_text()
    assert f"with the host's Docker credentials for {upstream_auth.addr}" in log
    assert password not in log and auth not in log

    # A credential helper, asked as the docker CLI asks it.
    helped = tmp_path / "helped"
    helped.mkdir()
    (helped / "config.json").write_text(
        json.dumps({"credsStore": "world", "auths": {upstream_auth.addr: {}}})
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-world"
    answer = json.dumps({"ServerURL": upstream_auth.addr, "Username": user, "Secret": password})
    helper.write_text(
        f'#!/bin/sh\nread url\n[ "$1 $url" = "get {upstream_auth.addr}" ] || exit 1\necho \'{answer}\'\n'
    )
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    env = {"DOCKER_CONFIG": str(helped), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    registry = registry_under_test(docker26, extra_args=["--docker-credentials"], env=env)
    node.set_mirror(registry.addr)
    ctr_ok(node, by_helper.ref)
    assert docker26.image_id(by_helper.ref)
    assert password not in registry.log_text()
