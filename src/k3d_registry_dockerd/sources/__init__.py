"""Where an image's bytes come from: one content interface (`content.ImageContent`) and its
implementations, each a module: `exported` (`docker save` into our cache), `containerd` (Docker's
containerd image store, read where it lies), `classic` and `podman` (Docker's classic store and Podman's
storage, read where they lie), with what they share: reading save streams and planning which manifests are
complete enough to serve. `known` keeps what the registry knew of the daemon's images and `storetags` reads
the daemon's own records of its tags, so its store is served while it is down.

Sources answer for an image Docker already resolved; they never pull or decide freshness. May import
`oci`, `common`, `docker` and `cache`.
"""
