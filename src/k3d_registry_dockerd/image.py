"""`k3d-registry-dockerd image build`: the registry's container image, built by the Docker it talks to from
what is installed (a wheel of the running code) and the repository's Dockerfile, shipped in the package,
so no clone is needed; and whether an image a config names is there to run."""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import io
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from importlib import metadata, resources
from pathlib import Path

from . import PRODUCT, __version__
from .configs import ASK_WITHIN, DEFAULT_IMAGE
from .docker.endpoint import DockerEndpoint
from .docker.engine import DockerClient, DockerFailed, DockerUnavailable

PACKAGE = __package__
# Where the build context's wheels are in the builder stage (the Dockerfile copies the context to /src).
WHEELS = "wheels"
WHEEL_METADATA = "Wheel-Version: 1.0\nGenerator: k3d-registry-dockerd image build\nRoot-Is-Purelib: true\n"
# Output lines kept to show with a failed step: pip's or the shell's explanation is among the last ones.
FAILED_STEP_LINES = 12


class ImageError(Exception):
    """The image cannot be built; the message is one sentence saying why."""


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def running_wheel(directory: Path) -> Path:
    """A wheel of the running code in `directory`: the package's files as they are imported (an editable
    install's source tree, or the installed copy), with the installed distribution's metadata."""
    try:
        distribution = metadata.distribution(PRODUCT)
    except metadata.PackageNotFoundError:
        raise ImageError(f"{PRODUCT} runs without being installed: install it (pip install .)") from None
    if distribution.version != __version__:
        raise ImageError(
            f"the installed metadata says version {distribution.version} but the code is {__version__}: "
            "install it again (pip install -e .)"
        )
    name = f"{PACKAGE}-{__version__}"
    info = f"{name}.dist-info"
    package = Path(__file__).parent
    files = [
        (f"{PACKAGE}/{path.relative_to(package).as_posix()}", path.read_bytes())
        for path in sorted(package.rglob("*"))
        if path.is_file() and "__pycache__" not in path.relative_to(package).parts
    ]
    # An .egg-info (a source tree on sys.path, as under pytest) keeps the same metadata as PKG-INFO.
    found = {"METADATA": distribution.read_text("METADATA") or distribution.read_text("PKG-INFO")}
    found.update((meta, distribution.read_text(meta)) for meta in ("entry_points.txt", "top_level.txt"))
    files += [(f"{info}/{meta}", text.encode()) for meta, text in found.items() if text is not None]
    files.append((f"{info}/WHEEL", f"{WHEEL_METADATA}Tag: py3-none-any\n".encode()))
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files)
    files.append((f"{info}/RECORD", f"{record}{info}/RECORD,,\n".encode()))
    wheel = directory / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files:
            archive.writestr(path, data)
    return wheel


def _dependency_wheels(wheels: Path | None) -> list[Path]:
    if wheels is None:
        return []
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        raise ImageError(f"--wheels {wheels}: no .whl files there")
    return found


def build_context(tar: io.BufferedIOBase, work: Path, wheels: Path | None) -> dict[str, str]:
    """Writes the build context (the Dockerfile, and in wheels/ the package's wheel and the given ones)
    into `tar`; returns the build arguments that install from it."""
    given = _dependency_wheels(wheels)
    ours = running_wheel(work)
    with tarfile.open(fileobj=tar, mode="w") as context:
        dockerfile = resources.files(PACKAGE).joinpath("Dockerfile").read_bytes()
        entry = tarfile.TarInfo("Dockerfile")
        entry.size = len(dockerfile)
        context.addfile(entry, io.BytesIO(dockerfile))
        # Ours last and by the same name as one given: the running code wins.
        for wheel in (*(w for w in given if w.name != ours.name), ours):
            context.add(wheel, f"{WHEELS}/{wheel.name}")
    if given:
        return {"PIP_INSTALL": f"--no-index --find-links /src/{WHEELS} {PRODUCT}=={__version__}"}
    return {"PIP_INSTALL": f"/src/{WHEELS}/{ours.name}"}


async def build(
    endpoint: DockerEndpoint, tag: str, base: str | None, wheels: Path | None, say: Callable[[str], None]
) -> None:
    """Builds the image with the Docker at `endpoint`, saying each step as it starts."""
    with (
        tempfile.TemporaryDirectory(prefix="k3d-registry-dockerd-image-") as work,
        tempfile.TemporaryFile() as tar,
    ):
        buildargs = build_context(tar, Path(work), wheels)
        if base:
            buildargs["BASE"] = base
        tar.seek(0)
        say(f"building {tag} with Docker at {endpoint.describe()}")
        docker = DockerClient(endpoint)
        output: collections.deque[str] = collections.deque(maxlen=FAILED_STEP_LINES)
        try:
            async for line in docker.build(tar, tag, buildargs):
                if line.startswith("Step "):
                    say(line)
                    output.clear()
                elif line.strip():
                    output.append(line)
        except (DockerFailed, DockerUnavailable) as exc:
            for line in output:
                say(f"    {line}")
            raise ImageError(f"{exc}") from exc
        finally:
            await docker.close()
    say(f"built {tag}")


def build_command(image: str) -> str:
    """The one command that builds `image`."""
    return f"{PRODUCT} image build" + ("" if image == DEFAULT_IMAGE else f" --tag {image}")


async def present(endpoint: DockerEndpoint, image: str) -> bool | None:
    """Whether Docker has `image`; None when Docker cannot be asked."""
    docker = DockerClient(endpoint)
    try:
        return await asyncio.wait_for(docker.inspect(image), ASK_WITHIN) is not None
    except (DockerUnavailable, DockerFailed, TimeoutError):
        return None
    finally:
        await docker.close()
