"""Where an image's bytes come from: one content interface (`content.ImageContent`) and its
implementations, each a module: `exported` (`docker save` into our cache) and `containerd` (Docker's
containerd image store, read where it lies), with what they share: reading save streams and planning which
manifests are complete enough to serve.

Sources answer for an image Docker already resolved; they never pull or decide freshness. May import
`oci`, `common`, `docker` and `cache`.
"""
