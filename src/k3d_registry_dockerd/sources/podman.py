"""Podman's storage (containers/storage, drivers overlay and vfs) served where it lies: no `podman save`,
nothing copied into our cache.

An image (`<driver>-images/images.json`: its ID, the config's digest, and its top layer) keeps its config as
a big-data file under `<driver>-images/<id>/`; its layers (`<driver>-layers/layers.json`: each layer's
parent, uncompressed digest and length) keep the tar-split record of their original tar beside, and their
files in the driver's directory. A layer is sent as that tar, put together as it goes out; the manifest is
the one the export path builds for Podman's legacy save, so the digests are the export path's. Verification
is kept as for Docker's classic store (`classic`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ..cache.verified import VerifiedBlobs
from ..common.metrics import Metrics
from ..docker.engine import DaemonInfo
from ..oci.reference import Digest
from . import tarsplit
from .classic import StoreImage, StoreImages, StoreLayer, manifest_for
from .pieces import identity
from .storetags import TagRecord, podman_tags

# Where each driver keeps a layer's files: layer ID -> path under the graph root.
LAYER_DIRS = {"overlay": ("overlay", "{}", "diff"), "vfs": ("vfs", "dir", "{}")}
_PLAIN_KEY = re.compile(r"[.0-9a-z]*")


def big_data_name(key: str) -> str:
    """The file name containers/storage keeps a big-data item under: the key when it is made of lowercase
    letters, digits and dots, else `=` and the key in base64."""
    return key if _PLAIN_KEY.fullmatch(key) else "=" + base64.b64encode(key.encode()).decode()


class PodmanContent(StoreImages):
    """Podman's storage under `root` (its graph root as seen from here), storage driver `driver`."""

    name = "Podman's storage"

    def __init__(
        self, root: Path, driver: str, metrics: Metrics, verified: VerifiedBlobs | None = None
    ) -> None:
        super().__init__(root, metrics, verified)
        self.driver = driver
        self._layer_dir = LAYER_DIRS[driver]
        self._images_dir = root / f"{driver}-images"
        self.tag_record = TagRecord(self._images_dir / "images.json", podman_tags)

    def _config_path(self, image_id: str) -> Path:
        return self._images_dir / Digest.parse(image_id).hex / big_data_name(image_id)

    def _json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_bytes())
        except OSError as exc:
            raise tarsplit.LayerUnservable(f"{path} cannot be read ({exc.strerror})") from exc
        except ValueError as exc:
            raise tarsplit.LayerUnservable(f"{path} is not JSON: {exc}") from exc

    def _read(self, image_id: str, info: DaemonInfo) -> StoreImage:
        hex_id = Digest.parse(image_id).hex
        image = next((i for i in self._json(self._images_dir / "images.json") if i.get("id") == hex_id), None)
        if image is None or not image.get("layer"):
            raise tarsplit.LayerUnservable(f"Podman's storage lists no image {hex_id} with layers")
        config_path = self._config_path(image_id)
        config, stat, diff_ids = self._read_config(config_path, image_id)
        layers = self._layers(str(image["layer"]))
        if [layer.diff_id for layer in layers] != diff_ids:
            raise tarsplit.LayerUnservable("its layers' digests are not those its config lists")
        manifest = manifest_for(image_id, len(config), layers, legacy=True)
        return StoreImage(
            image_id,
            config_path,
            identity(stat),
            manifest,
            f"sha256:{hashlib.sha256(manifest).hexdigest()}",
            {layer.diff_id: layer for layer in layers},
        )

    def _layers(self, top: str) -> list[StoreLayer]:
        """The image's layers, bottom first, from its top layer's parents."""
        records = self.root / f"{self.driver}-layers"
        known = {str(layer.get("id")): layer for layer in self._json(records / "layers.json")}
        chain: list[StoreLayer] = []
        current: str | None = top
        while current:
            layer = known.get(current)
            if layer is None or "/" in current or len(chain) > len(known):
                raise tarsplit.LayerUnservable(f"Podman's storage lists no layer {current}")
            diff_id = str(layer.get("diff-digest") or "")
            if not diff_id:
                raise tarsplit.LayerUnservable(
                    f"layer {current} has no uncompressed digest (a partial pull?)"
                )
            files = self.root.joinpath(*(part.format(current) for part in self._layer_dir))
            tar = self._records.read(records / f"{current}.tar-split.gz", files)
            if layer.get("diff-size") not in (None, tar.size):
                raise tarsplit.LayerUnservable(f"layer {current}'s tar-split record is not the whole layer")
            chain.append(StoreLayer(diff_id, tar, tar.check()))
            current = layer.get("parent") or None
        return chain[::-1]
