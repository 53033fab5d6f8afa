"""Talking to the daemon: Docker's Engine API (also Podman's compatible one), where it is (DOCKER_HOST and
contexts, as the docker CLI finds it), its image events, the credentials `docker login` stored on the host,
and the read-only gRPC API of the containerd behind Docker's containerd image store.

Turns failures into a few exceptions carrying the daemon's own words. May import `oci` and `common`.
"""
