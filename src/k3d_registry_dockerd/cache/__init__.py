"""Our own store on disk: content-addressed, verified, crash-safe blobs and the per-repository records of
what is served; the cache dir held by one process; listing, verifying, pruning and eviction; room for
exports in the cache dir's filesystem.

Never touches the daemon's store. May import `oci` and `common`.
"""
