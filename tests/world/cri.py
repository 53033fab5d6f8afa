"""kubelet's path to the mirror: containerd's CRI plugin, called over gRPC as kubelet calls it.

kubelet never runs ``ctr``: it asks containerd's CRI image service to ``PullImage``, with the pod's
imagePullSecret as an ``AuthConfig`` (username and password, ``server_address`` empty), and containerd's
CRI plugin resolves the image through ``config_path`` — the hosts dir whose ``_default/hosts.toml`` k3s
and kind write for a ``"*"`` mirror. This module is that path in the test world:

- ``cri_api()`` compiles the CRI ``api.proto`` that Debian's ``golang-k8s-cri-api-dev`` ships (unpacked by
  scripts/install-test-world) with grpcio-tools' protoc into a temp dir, once per process, and imports it.
  Nothing generated is kept in the repository; an older proto that still imports gogo.proto (trixie's
  ``golang-github-kubernetes-cri-api-dev``) is compiled from a copy without the gogo import and options,
  which only steer Go code generation.
- ``CriImageClient``: ``PullImage``, ``ListImages``, ``ImageStatus``, ``RemoveImage`` on a containerd socket.
- ``CriNode``: a containerd 1.7 (config version 2) or 2.x (version 3) node with the CRI plugin and
  ``config_path``; everything else it would touch (CNI dirs, NRI socket, CDI dirs, stream server) is kept
  private or off, so it never touches /etc/cni, /opt/cni, /run/containerd or the machine's containerd.

Like daemons.py, no pytest dependency.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, Self

import grpc

from .daemons import DOCKER26_USR, WORLD_DIR, Containerd, WorldUnavailable, make_temp_dir, run

CRI_API_PROTO = (
    (WORLD_DIR / "cri-api" / "usr" / "share" / "gocode" / "src" / "k8s.io" / "cri-api" / "pkg" / "apis")
    / "runtime"
    / "v1"
    / "api.proto"
)
"""Debian's CRI API definition (package runtime.v1), unpacked by scripts/install-test-world."""
_MODULE = "k3rd_cri_api"
"""Name of the compiled copy: ``k3rd_cri_api_pb2`` and ``k3rd_cri_api_pb2_grpc``, unlikely to clash."""

_GOGO_IMPORT = re.compile(r'^\s*import\s+"github\.com/gogo/protobuf/gogoproto/gogo\.proto"\s*;\s*$', re.M)
_GOGO_FILE_OPTION = re.compile(r"^\s*option\s+\(gogoproto\.\w+\)\s*=\s*[^;]*;\s*$", re.M)
_FIELD_OPTIONS = re.compile(r"\s*\[(?P<options>[^\[\]]*\(gogoproto\.[^\[\]]*)\]")
_OPTION = re.compile(r'(?:[^,"]|"(?:\\.|[^"\\])*")+')
"""One option of a field's ``[a = 1, (b) = "x, y"]`` list (commas inside strings do not split)."""


def _field_options_without_gogo(match: re.Match[str]) -> str:
    kept = [o.strip() for o in _OPTION.findall(match["options"]) if not o.strip().startswith("(gogoproto.")]
    return f" [{', '.join(kept)}]" if kept else ""


def without_gogo(proto: str) -> str:
    """``proto`` without gogo.proto's import and its options (Go code generation hints, nothing on the
    wire), so that protoc compiles it without the gogo sources."""
    if not _GOGO_IMPORT.search(proto):
        return proto
    proto = _GOGO_FILE_OPTION.sub("", _GOGO_IMPORT.sub("", proto))
    return _FIELD_OPTIONS.sub(_field_options_without_gogo, proto)


@dataclass(frozen=True)
class CriApi:
    """The compiled CRI API: messages (``pb2.PullImageRequest``…) and the ImageService stub."""

    pb2: Any
    grpc: Any
    directory: Path


_compiled: CriApi | None = None
_compile_lock = threading.Lock()


def cri_api(proto: Path = CRI_API_PROTO) -> CriApi:
    """Compile Debian's api.proto (once per process) into a temp dir and import it.

    Raises WorldUnavailable when the proto or grpcio-tools is missing.
    """
    global _compiled
    with _compile_lock:
        if _compiled is None:
            _compiled = _compile(proto)
        return _compiled


def _compile(proto: Path) -> CriApi:
    if not proto.is_file():
        raise WorldUnavailable(f"{proto} is missing (run scripts/install-test-world)")
    if importlib.util.find_spec("grpc_tools") is None:
        raise WorldUnavailable("grpcio-tools is not installed (pip install -e '.[test]')")
    import grpc_tools

    out = make_temp_dir("cri-api")
    source = out / f"{_MODULE}.proto"
    source.write_text(without_gogo(proto.read_text()))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protoc = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{out}", f"-I{well_known}",
        f"--python_out={out}", f"--grpc_python_out={out}",
        source.name,
    ]  # fmt: skip
    run(protoc, cwd=out, timeout=120)
    # The generated stub imports the messages as a top-level module: register them under that name.
    pb2 = _load(f"{_MODULE}_pb2", out)
    stubs = _load(f"{_MODULE}_pb2_grpc", out)
    return CriApi(pb2, stubs, out)


def _load(name: str, directory: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, directory / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {name} from {directory}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- client


class CriError(RuntimeError):
    """A CRI call that containerd answered with an error (e.g. a failed pull)."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


@dataclass(frozen=True)
class CriImage:
    """An image as the CRI image service lists it."""

    id: str
    """The image ID: the config digest, what PullImage returns."""
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int


class CriImageClient:
    """The calls kubelet makes on containerd's CRI ImageService, over ``unix://SOCKET``."""

    def __init__(self, socket: Path, api: CriApi | None = None) -> None:
        self.api = api or cri_api()
        self.channel = grpc.insecure_channel(f"unix://{socket}", options=[("grpc.enable_http_proxy", 0)])
        self.stub = self.api.grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request: Any, timeout: float) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise CriError(method, code, details or "") from None

    def pull_image(
        self, ref: str, username: str | None = None, password: str | None = None, *, timeout: float = 900
    ) -> str:
        """``PullImage`` as kubelet sends it; returns the image ref (ID) containerd answers.

        With ``username``, the pull secret goes as kubelet passes an imagePullSecret: an AuthConfig with
        username and password and an empty ``server_address`` (so containerd offers it to every host).
        """
        pb2 = self.api.pb2
        request = pb2.PullImageRequest(image=pb2.ImageSpec(image=ref))
        if username is not None:
            request.auth.CopyFrom(
                pb2.AuthConfig(username=username, password=password or "", server_address="")
            )
        return str(self._call("PullImage", request, timeout).image_ref)

    def list_images(self, *, timeout: float = 30) -> list[CriImage]:
        response = self._call("ListImages", self.api.pb2.ListImagesRequest(), timeout)
        return [_image(image) for image in response.images]

    def image_status(self, ref: str, *, timeout: float = 30) -> CriImage | None:
        """The image ``ref`` (tag, digest reference or ID) names on the node, None if it has none."""
        pb2 = self.api.pb2
        response = self._call("ImageStatus", pb2.ImageStatusRequest(image=pb2.ImageSpec(image=ref)), timeout)
        return _image(response.image) if response.HasField("image") else None

    def remove_image(self, ref: str, *, timeout: float = 60) -> None:
        """``RemoveImage`` (every tag and digest of the image goes; a missing image is no error)."""
        pb2 = self.api.pb2
        self._call("RemoveImage", pb2.RemoveImageRequest(image=pb2.ImageSpec(image=ref)), timeout)


def _image(message: Any) -> CriImage:
    return CriImage(message.id, tuple(message.repo_tags), tuple(message.repo_digests), int(message.size))


# --------------------------------------------------------------------------- node


def cri_containerd_config(
    *,
    major: int,
    root: Path,
    state: Path,
    address: Path,
    hosts_dir: Path,
    private: Path,
    image_pull_progress_timeout: str = "5m0s",
    use_local_image_pull: bool = False,
) -> str:
    """containerd config with the CRI plugin and ``config_path = hosts_dir``: version 2 for 1.x, 3 for 2.x.

    Keys as ``containerd config default`` of 1.7 and 2.1 prints them (and docs/cri/config.md): 1.7 keeps
    the whole CRI config under ``io.containerd.grpc.v1.cri``; 2.x splits it into
    ``io.containerd.cri.v1.images`` (registry, pull settings) and ``io.containerd.cri.v1.runtime`` (CNI,
    CDI). Paths the CRI plugin would create or listen on outside its root (the CNI conf dir, NRI's socket)
    are under ``private``; CDI, the TCP stream service and NRI are off. No pod runs here, only the image
    service is used.

    ``use_local_image_pull`` (2.x only): pull in the CRI plugin with the client-side resolver (1.x's way)
    instead of containerd 2.1's default, the transfer service; the two watch
    ``image_pull_progress_timeout`` differently.
    """
    cni_conf, cni_bin = private / "cni" / "net.d", private / "cni" / "bin"
    common = (
        f'root = "{root}"\n'
        f'state = "{state}"\n'
        "[grpc]\n"
        f'  address = "{address}"\n'
        "[ttrpc]\n"
        '  address = ""\n'
        "[debug]\n"
        '  address = ""\n'
        "[metrics]\n"
        '  address = ""\n'
    )
    if major < 2:
        if use_local_image_pull:
            raise ValueError("containerd 1.x always pulls in the CRI plugin itself")
        cri = '[plugins."io.containerd.grpc.v1.cri"]'
        return (
            "version = 2\n"
            f"{common}"
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{root}/opt"\n'
            '[plugins."io.containerd.nri.v1.nri"]\n'
            "  disable = true\n"
            f'  socket_path = "{private}/nri.sock"\n'
            f"{cri}\n"
            "  disable_tcp_service = true\n"
            '  stream_server_address = "127.0.0.1"\n'
            '  stream_server_port = "0"\n'
            "  enable_cdi = false\n"
            f'  image_pull_progress_timeout = "{image_pull_progress_timeout}"\n'
            f"{cri[:-1]}.cni]\n"
            f'  bin_dir = "{cni_bin}"\n'
            f'  conf_dir = "{cni_conf}"\n'
            f"{cri[:-1]}.registry]\n"
            f'  config_path = "{hosts_dir}"\n'
        )
    return (
        "version = 3\n"
        f"{common}"
        "[plugins.'io.containerd.internal.v1.opt']\n"
        f"  path = '{root}/opt'\n"
        "[plugins.'io.containerd.nri.v1.nri']\n"
        "  disable = true\n"
        f"  socket_path = '{private}/nri.sock'\n"
        "[plugins.'io.containerd.grpc.v1.cri']\n"
        "  disable_tcp_service = true\n"
        "  stream_server_address = '127.0.0.1'\n"
        "  stream_server_port = '0'\n"
        "[plugins.'io.containerd.cri.v1.images']\n"
        f"  image_pull_progress_timeout = '{image_pull_progress_timeout}'\n"
        f"  use_local_image_pull = {'true' if use_local_image_pull else 'false'}\n"
        "[plugins.'io.containerd.cri.v1.images'.registry]\n"
        f"  config_path = '{hosts_dir}'\n"
        "[plugins.'io.containerd.cri.v1.runtime']\n"
        "  enable_cdi = false\n"
        f"  cdi_spec_dirs = ['{private}/cdi']\n"
        "[plugins.'io.containerd.cri.v1.runtime'.cni]\n"
        f"  bin_dirs = ['{cni_bin}']\n"
        f"  conf_dir = '{cni_conf}'\n"
    )


class CriNode(Containerd):
    """A node as kubelet uses it: containerd with the CRI plugin, its hosts dir as ``config_path``.

    ``set_mirror`` / ``clear_mirrors`` write ``hosts_dir/_default/hosts.toml`` as for ``Containerd`` (k3s's
    ``mirrors: "*"``); pulls go through ``PullImage``. ``ctr`` still works on the same socket (namespace
    k8s.io, where the CRI plugin keeps its images).
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        usr: Path = DOCKER26_USR,
        image_pull_progress_timeout: str = "5m0s",
        use_local_image_pull: bool = False,
    ) -> None:
        super().__init__(root or make_temp_dir("cri"), usr=usr)
        self.image_pull_progress_timeout = image_pull_progress_timeout
        self.use_local_image_pull = use_local_image_pull
        self._client: CriImageClient | None = None

    @classmethod
    def check_available(cls, usr: Path = DOCKER26_USR) -> None:
        super().check_available(usr)
        cri_api()

    def binary_major(self) -> int:
        """containerd's major version, from ``containerd --version`` (it picks the config version)."""
        out = run([str(self.binary), "--version"], timeout=30).stdout
        match = re.search(r"\sv?(\d+)\.(\d+)\.", out)
        if not match:
            raise RuntimeError(f"no version in {out!r}")
        return int(match.group(1))

    def config_text(self) -> str:
        return cri_containerd_config(
            major=self.binary_major(),
            root=self.root / "root",
            state=self.root / "state",
            address=self.address,
            hosts_dir=self.hosts_dir,
            private=self.root / "private",
            image_pull_progress_timeout=self.image_pull_progress_timeout,
            use_local_image_pull=self.use_local_image_pull,
        )

    def start(self, timeout: float = 30.0) -> Self:
        super().start(timeout)
        began = time.monotonic()
        while True:  # the CRI plugin serves a moment after containerd's own API
            try:
                self.client.list_images(timeout=5)
                break
            except CriError as exc:
                if time.monotonic() - began > timeout:
                    self.stop()
                    log = self.log_text()[-3000:]
                    raise RuntimeError(f"CRI image service did not answer: {exc}\n{log}") from exc
                time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        super().stop()

    @property
    def client(self) -> CriImageClient:
        if self._client is None:
            self._client = CriImageClient(self.address)
        return self._client

    def pull_image(
        self, ref: str, username: str | None = None, password: str | None = None, *, timeout: float = 900
    ) -> str:
        """``PullImage`` (what kubelet does for a pod's image); returns the image ref containerd answers."""
        return self.client.pull_image(ref, username, password, timeout=timeout)

    def list_images(self) -> list[CriImage]:
        return self.client.list_images()

    def image_status(self, ref: str) -> CriImage | None:
        return self.client.image_status(ref)

    def remove_image(self, *refs: str) -> None:
        """Remove images through CRI (by tag, digest reference or ID)."""
        for ref in refs:
            self.client.remove_image(ref)

    def clean(self) -> None:
        """Forget every image through CRI, then every lease, blob and snapshot left (as ``Containerd``)."""
        for image in self.list_images():
            self.client.remove_image(image.id)
        leftover = self.images()  # names the CRI plugin does not manage (a ctr pull)
        if leftover:
            self.ctr("images", "rm", "--sync", *leftover, check=False)
        super().clean()

    def __repr__(self) -> str:
        return f"<CriNode containerd {self.version or '?'} {self.address} mirror={self.mirror}>"


class CriNodeFactory(Protocol):
    """Type of the ``cri_node_factory`` fixture: a CRI node of a test's own, with its own settings."""

    def __call__(
        self, version: str, *, image_pull_progress_timeout: str = ..., use_local_image_pull: bool = ...
    ) -> CriNode: ...


def pull_seconds(node: CriNode, ref: str, **kwargs: Any) -> tuple[str, float]:
    """``node.pull_image(ref, …)`` and how long it took."""
    began = time.monotonic()
    image_ref = node.pull_image(ref, **kwargs)
    return image_ref, time.monotonic() - began
