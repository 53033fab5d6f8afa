"""The manifests made for stores that keep none, byte for byte as the export path serves them."""

from __future__ import annotations

import json

from k3d_registry_dockerd.sources.generated import docker_save_manifest, legacy_manifest

# What `docker save` of Docker 26.1 (classic store, overlay2) wrote for a two-layer FROM scratch image.
DOCKER_26_SAVE = (
    b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":'
    b'"application/vnd.oci.image.config.v1+json","digest":"sha256:1685dde889487f79746527b2ba6b29074cd85446e7'
    b'3774bd3673f280be466484","size":1569},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","d'
    b'igest":"sha256:c168fcc7bc2bf9fe9cc64202a6b9f3d613c0d0afc7243cfd689833812b804c49","size":2560},{"mediaT'
    b'ype":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:9cdb2c6cdb6f9534b1421338b03204abfbf4da3'
    b'000ea2ce62a3c72d0225f0506","size":7168}]}'
)
CONFIG = ("sha256:1685dde889487f79746527b2ba6b29074cd85446e73774bd3673f280be466484", 1569)
LAYERS = [
    ("sha256:c168fcc7bc2bf9fe9cc64202a6b9f3d613c0d0afc7243cfd689833812b804c49", 2560),
    ("sha256:9cdb2c6cdb6f9534b1421338b03204abfbf4da3000ea2ce62a3c72d0225f0506", 7168),
]


def test_docker_s_own_manifest_is_made_byte_for_byte() -> None:
    assert docker_save_manifest(CONFIG, LAYERS) == DOCKER_26_SAVE


def test_a_repeated_layer_is_listed_again_in_either_format() -> None:
    for made in (docker_save_manifest, legacy_manifest):
        layers = json.loads(made(CONFIG, [LAYERS[0], LAYERS[1], LAYERS[0]]))["layers"]
        assert [layer["digest"] for layer in layers] == [LAYERS[0][0], LAYERS[1][0], LAYERS[0][0]]


def test_the_legacy_manifest_is_the_one_this_registry_always_built() -> None:
    made = legacy_manifest(CONFIG, LAYERS)
    assert made.startswith(
        b'{\n   "schemaVersion": 2,\n   "mediaType": "application/vnd.oci.image.manifest.v1+json"'
    )
    assert json.loads(made) == json.loads(DOCKER_26_SAVE)
