"""`image build`'s build context (the package's Dockerfile and a wheel of the running code) and what
`config k3d|kind` say when their image is missing."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

import k3d_registry_dockerd
from k3d_registry_dockerd import cli, image
from k3d_registry_dockerd.configs import DEFAULT_IMAGE

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_the_running_code_and_a_valid_record(tmp_path: Path) -> None:
    wheel = image.running_wheel(tmp_path)
    version = k3d_registry_dockerd.__version__
    assert wheel.name == f"k3d_registry_dockerd-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        package = Path(k3d_registry_dockerd.__file__).parent
        assert archive.read("k3d_registry_dockerd/cli.py") == (package / "cli.py").read_bytes()
        assert archive.read("k3d_registry_dockerd/Dockerfile") == (REPO / "Dockerfile").read_bytes()
        assert "k3d_registry_dockerd/web/status.html" in names
        assert not any("__pycache__" in name for name in names)
        info = f"k3d_registry_dockerd-{version}.dist-info"
        assert f"Version: {version}" in archive.read(f"{info}/METADATA").decode()
        assert (
            "k3d-registry-dockerd = k3d_registry_dockerd.cli:main"
            in archive.read(f"{info}/entry_points.txt").decode()
        )
        record = list(csv.reader(io.StringIO(archive.read(f"{info}/RECORD").decode())))
        assert {row[0] for row in record} == names
        for path, digest, size in record:
            if path.endswith("RECORD"):
                continue
            data = archive.read(path)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expected}", len(data))


def test_the_context_installs_from_pypi_or_only_from_given_wheels(tmp_path: Path) -> None:
    tar = io.BytesIO()
    args = image.build_context(tar, tmp_path, None)
    version = k3d_registry_dockerd.__version__
    ours = f"wheels/k3d_registry_dockerd-{version}-py3-none-any.whl"
    assert args == {"PIP_INSTALL": f"/src/{ours}"}
    tar.seek(0)
    with tarfile.open(fileobj=tar) as context:
        assert context.getnames() == ["Dockerfile", ours]
        dockerfile = context.extractfile("Dockerfile")
        assert dockerfile is not None and dockerfile.read() == (REPO / "Dockerfile").read_bytes()
    given = tmp_path / "given"
    given.mkdir()
    (given / "aiohttp-3.12.0-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"wheel")
    (given / ours.removeprefix("wheels/")).write_bytes(b"an older build of this version")
    tar = io.BytesIO()
    args = image.build_context(tar, tmp_path, given)
    assert args == {"PIP_INSTALL": f"--no-index --find-links /src/wheels k3d-registry-dockerd=={version}"}
    tar.seek(0)
    with tarfile.open(fileobj=tar) as context:
        names = context.getnames()
        assert names == ["Dockerfile", "wheels/aiohttp-3.12.0-cp311-cp311-manylinux_2_17_x86_64.whl", ours]
        member = context.extractfile(ours)
        assert member is not None and member.read() != b"an older build of this version"
    with pytest.raises(image.ImageError, match=r"no \.whl files"):
        image.build_context(io.BytesIO(), tmp_path, tmp_path / "empty")


def test_the_command_names_the_tag_unless_it_is_the_default() -> None:
    assert image.build_command(DEFAULT_IMAGE) == "k3d-registry-dockerd image build"
    assert image.build_command("me/registry:dev") == "k3d-registry-dockerd image build --tag me/registry:dev"


@pytest.mark.parametrize("present", [True, False, None])
def test_config_says_how_to_build_a_missing_image(
    present: bool | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")

    async def answer(endpoint: object, name: str) -> bool | None:
        return present

    monkeypatch.setattr(image, "present", answer)
    assert cli.main(["config", "k3d", "--image", "me/registry:dev"]) == 0
    out, err = capsys.readouterr()
    note = "# me/registry:dev is not in Docker: build it first with "
    if present is False:
        assert out.startswith(note + "`k3d-registry-dockerd image build --tag me/registry:dev`\n")
        assert err == (
            f"k3d-registry-dockerd: me/registry:dev is not in Docker at unix://{tmp_path}/docker.sock; "
            "build it with: k3d-registry-dockerd image build --tag me/registry:dev\n"
        )
    else:
        # There, or Docker cannot be asked (the config says so already): nothing about building.
        assert note not in out and err == ""
    assert cli.main(["config", "kind", "--hosts-dir", str(tmp_path / "certs.d")]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith(f"# {DEFAULT_IMAGE} is not in Docker") == (present is False)


def test_build_without_docker_is_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")
    assert cli.main(["image", "build"]) == 1
    out, err = capsys.readouterr()
    assert out == f"building {DEFAULT_IMAGE} with Docker at unix://{tmp_path}/docker.sock (DOCKER_HOST)\n"
    assert err.startswith("k3d-registry-dockerd: Docker is unreachable at") and err.count("\n") == 1


def test_the_readme_names_the_image_config_runs() -> None:
    """Every example, `image build`'s default tag, `config`'s default --image and what a release pushes
    are one image."""
    named = set(
        re.findall(rf"{re.escape(k3d_registry_dockerd.IMAGE)}:[\w.<>-]+", (REPO / "README.md").read_text())
    )
    assert named == {DEFAULT_IMAGE, f"{k3d_registry_dockerd.IMAGE}:<version>"}
    assert f"{k3d_registry_dockerd.IMAGE}:{k3d_registry_dockerd.__version__}" == DEFAULT_IMAGE
