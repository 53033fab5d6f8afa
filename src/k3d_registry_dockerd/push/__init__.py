"""What clients write: blob uploads, pushed manifests and tags, deletes, referrers, and loading pushed images
into the daemon.

May import everything below it: `oci`, `common`, `docker`, `cache`, `sources` and `mirror`.
"""
