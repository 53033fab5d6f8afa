"""containerd as a node uses it (1.7 and 2.1, no CRI: `ctr` pulls through a hosts dir), and the minimal
private config every containerd of the world starts with."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Self

from k3d_registry_dockerd import configs

from .process import (
    DOCKER26_USR,
    DOCKER28_USR,
    RUNC_PATH,
    Service,
    make_temp_dir,
    require_binary,
    run,
    search_path,
)

NODES = {"1.7": DOCKER26_USR, "2.1": DOCKER28_USR}
"""The containerd of each test node by version: trixie's 1.7 (k3s up to 1.32), sid's 2.1 (k3s 1.33+, kind)."""


def containerd_config(*, root: Path, state: Path, address: Path) -> str:
    """Minimal containerd 1.6/1.7 config: private root/state/socket, no CRI, no /opt/containerd."""
    return (
        "version = 2\n"
        f'root = "{root}"\n'
        f'state = "{state}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "[grpc]\n"
        f'  address = "{address}"\n'
        "[debug]\n"
        '  address = ""\n'
        "[metrics]\n"
        '  address = ""\n'
        '[plugins."io.containerd.internal.v1.opt"]\n'
        f'  path = "{root}/opt"\n'
    )


class Containerd(Service):
    """containerd as a k3s node uses it (no CRI), pulled through ``ctr`` with a hosts dir: 1.7 from
    ``usr`` DOCKER26_USR, 2.1 from DOCKER28_USR.

    ``hosts_dir/_default/hosts.toml`` is exactly what k3s writes for ``mirrors: "*"``; pulls use
    ``ctr images pull --local`` by default, i.e. the client-side resolver and fetcher (the code path
    CRI uses) rather than the transfer service.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        mirror: str | None = None,
        namespace: str = "k8s.io",
        usr: Path = DOCKER26_USR,
    ) -> None:
        self.root = root or make_temp_dir("node")
        self.namespace = namespace
        self.address = self.root / "containerd.sock"
        self.hosts_dir = self.root / "certs.d"
        self.log_path = self.root / "containerd.log"
        self.config_path = self.root / "config.toml"
        self.usr = usr
        self.binary = usr / "bin" / "containerd"
        self.ctr_binary = usr / "bin" / "ctr"
        self.version = ""
        self.mirror: str | None = None
        if mirror:
            self.set_mirror(mirror)

    @classmethod
    def check_available(cls, usr: Path = DOCKER26_USR) -> None:
        require_binary(usr / "bin" / "containerd")
        require_binary(usr / "bin" / "ctr")

    def set_mirror(
        self,
        addr: str,
        *,
        host: str = "_default",
        capabilities: Iterable[str] = ("pull", "resolve"),
        override_path: bool = False,
        path: str = "/v2",
    ) -> Path:
        """(Re)write HOST/hosts.toml with one mirror endpoint, like k3s does; returns the file.

        With the defaults this is the file `k3d-registry-dockerd config kind` writes.
        """
        caps = ", ".join(f'"{c}"' for c in capabilities)
        if (tuple(capabilities), path, override_path) == (("pull", "resolve"), "/v2", False):
            text = configs.hosts_toml(f"http://{addr}")
        else:
            text = f'[host."http://{addr}{path}"]\n  capabilities = [{caps}]\n'
        if override_path:
            text += "  override_path = true\n"
        target = self.hosts_dir / host / "hosts.toml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        if host == "_default":
            self.mirror = addr
        return target

    def clear_mirrors(self) -> None:
        """Remove every hosts.toml (then pulls go to the image's own registry)."""
        shutil.rmtree(self.hosts_dir, ignore_errors=True)
        self.mirror = None

    def config_text(self) -> str:
        """The config.toml this node starts with (no CRI: pulls go through ctr)."""
        return containerd_config(root=self.root / "root", state=self.root / "state", address=self.address)

    def start(self, timeout: float = 30.0) -> Self:
        if self.running:
            return self
        self.check_available(self.usr)
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        self._launch(
            [self.binary, "--config", self.config_path],
            env={**os.environ, "PATH": search_path(self.usr / "bin", *RUNC_PATH)},
            name="node-containerd",
            ready=lambda: self.ctr("version", check=False, timeout=5).returncode == 0,
            timeout=timeout,
            what="node containerd",
        )
        match = re.search(r"Server:\s+Version:\s+(\S+)", self.ctr("version").stdout)
        self.version = match.group(1) if match else ""
        return self

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address … -n NAMESPACE ARGS``."""
        argv = [str(self.ctr_binary), "--address", str(self.address), "-n", self.namespace, *args]
        return run(argv, check=check, timeout=timeout)

    def _registry_args(self, user: str | None, platform: str | None, all_platforms: bool) -> list[str]:
        args = ["--hosts-dir", str(self.hosts_dir)]
        if user:
            args += ["--user", user]
        if platform:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        return args

    def pull(
        self,
        ref: str,
        *,
        user: str | None = None,
        platform: str | None = None,
        all_platforms: bool = False,
        local: bool = True,
        check: bool = False,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr images pull --hosts-dir DIR [--user u:p] [--platform p] REF`` (unpacks, as kubelet would).

        ``user`` is "user:password". Not checked by default: tests assert on returncode/stderr.
        """
        args = ["images", "pull", *self._registry_args(user, platform, all_platforms)]
        if local:
            args.append("--local")
        return self.ctr(*args, ref, check=check, timeout=timeout)

    def content_fetch(
        self,
        ref: str,
        *,
        user: str | None = None,
        platform: str | None = None,
        all_platforms: bool = False,
        check: bool = False,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr content fetch`` (download only, no unpack, no image record)."""
        args = ["content", "fetch", *self._registry_args(user, platform, all_platforms)]
        return self.ctr(*args, ref, check=check, timeout=timeout)

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q").stdout.split()

    def content(self) -> list[str]:
        """Digests of all blobs in the content store."""
        return [line.split()[0] for line in self.ctr("content", "ls").stdout.splitlines()[1:] if line.strip()]

    def remove_image(self, *refs: str) -> None:
        """Remove images and synchronously garbage-collect what only they referenced."""
        if refs:
            self.ctr("images", "rm", "--sync", *refs, check=False)

    def clean(self) -> None:
        """Forget every image, lease, blob and snapshot, so the next pull really fetches again."""
        self.remove_image(*self.images())
        leases = [
            line.split()[0] for line in self.ctr("leases", "ls").stdout.splitlines()[1:] if line.strip()
        ]
        if leases:
            self.ctr("leases", "rm", "--sync", *leases, check=False)
        blobs = self.content()
        if blobs:
            self.ctr("content", "rm", *blobs, check=False)

    def __repr__(self) -> str:
        return f"<Containerd node {self.version or '?'} {self.address} mirror={self.mirror}>"
