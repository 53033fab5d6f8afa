"""An OCI registry mirror that serves images out of the local Docker daemon's image cache.

The layers, each a subpackage that imports only those before it (tests/unit/test_layers.py checks it):
`common` and `oci` (helpers and vocabulary), `docker` and `cache` (the daemon, our store), `sources`
(where bytes come from), `mirror` (decisions), `push` (what clients write), `web` (HTTP). The modules here
are the program on top: cli, server, settings, doctor, configs, image, warm.
"""

PRODUCT = "k3d-registry-dockerd"
# The one place the version is written (pyproject.toml reads it; the release workflow checks its tag).
__version__ = "0.1.0"
# The container image: what `image build` tags, `config` runs and the release workflow pushes.
IMAGE = "ghcr.io/k3d-registry-dockerd/k3d-registry-dockerd"
