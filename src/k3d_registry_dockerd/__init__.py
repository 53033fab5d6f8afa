"""An OCI registry mirror that serves images out of the local Docker daemon's image cache."""

PRODUCT = "k3d-registry-dockerd"
__version__ = "0.1.0"
