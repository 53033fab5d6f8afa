"""An OCI registry mirror that serves images out of the local Docker daemon's image cache.

The layers, each a subpackage that imports only those before it (tests/unit/test_layers.py checks it):
`common` and `oci` (helpers and vocabulary), `docker` and `cache` (the daemon, our store), `sources`
(where bytes come from), `mirror` (decisions), `push` (what clients write), `web` (HTTP). The modules here
are the program on top: cli, server, settings, doctor, configs, warm.
"""

PRODUCT = "k3d-registry-dockerd"
__version__ = "0.1.0"
