"""An OCI registry mirror that serves images out of the local Docker daemon's image cache."""

__version__ = "0.1.0"
