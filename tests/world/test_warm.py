"""`warm` against a running registry: a local image, a pull-through image, a missing one, a YAML file of
several documents; the node's pulls afterwards cause no export (Docker's event stream shows no save)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from .daemons import REPO_ROOT, Containerd, Dockerd, RegistryFactory, UpstreamRegistry
from .images import MiB, build_image, push_multiplatform
from .test_mirror import ctr_ok, node_digest


def warm_command(registry_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env["PYTHONPATH"] = str(REPO_ROOT / "src")
    argv = [sys.executable, "-m", "k3d_registry_dockerd", "warm", "--registry", registry_url, *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


def test_warm_then_pull_without_waiting(
    docker: Dockerd,
    upstream: UpstreamRegistry,
    node: Containerd,
    registry_under_test: RegistryFactory,
    tmp_path: Path,
) -> None:
    suffix = f"{docker.name.replace('-', '')}-{node.version.split('.')[0]}{node.version.split('.')[1]}"
    build_image(docker, f"warm-local-{suffix}:1", layers=2, size=3 * MiB, seed=f"warm-local-{suffix}")
    pushed = push_multiplatform(upstream, f"warm/pulled-{suffix}", "1", seed=f"warm-pulled-{suffix}")
    local = f"warm-local-{suffix}:1"
    manifests = tmp_path / "app.yaml"
    manifests.write_text(
        f"""apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  template:
    spec:
      containers: [{{name: web, image: "{local}"}}]
---
apiVersion: batch/v1
kind: Job
metadata: {{name: job}}
spec:
  template:
    spec:
      initContainers: [{{name: init, image: "{pushed.ref}"}}]
      containers: [{{name: job, image: "{local}"}}]
"""
    )
    registry = registry_under_test(docker)
    since = time.time()
    missing_ref = f"{upstream.addr}/warm/never-there-{suffix}:1"
    result = warm_command(registry.url, "-f", str(manifests), missing_ref)

    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"✓ {local}: sha256:") for line in lines), lines
    assert any(line.startswith(f"✓ {pushed.ref}: sha256:") for line in lines), lines
    missing = [line for line in lines if line.startswith(f"✗ {missing_ref}: ")]
    assert missing and "404: " in missing[0] and "not found upstream" in missing[0], lines
    assert lines[-1].startswith("2 of 3 images ready in ") and lines[-1].endswith("; 1 failed")
    # Docker pulled the upstream image for warm, and exported both (none with zero-copy).
    assert docker.image_id(pushed.ref)
    assert len(docker.image_saves(since)) == docker.exports_for(2)

    warmed = {
        line[2:].split(": ")[0]: line.split(": ")[1].split()[0] for line in lines if line.startswith("✓")
    }

    node.set_mirror(registry.addr)
    pulled_at, mark = time.time(), upstream.log_mark()
    ctr_ok(node, f"docker.io/library/{local}")
    ctr_ok(node, pushed.ref)
    # What warm made ready is what the node got, and from the registry: the local image exists only in
    # dockerd, and the node asked the upstream for none of the host platform's content.
    assert node_digest(node, f"docker.io/library/{local}") == warmed[local]
    assert node_digest(node, pushed.ref) == warmed[pushed.ref]
    amd64 = pushed.manifests["linux/amd64"]
    ours = ("/manifests/1 ", pushed.index_digest, amd64.digest, amd64.config_digest, *amd64.layer_digests)
    bypassed = [line for line in upstream.log_text()[mark:].splitlines() if "containerd/" in line]
    assert [line for line in bypassed if any(part in line for part in ours)] == []
    assert docker.image_saves(pulled_at) == []
