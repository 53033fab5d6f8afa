"""The decisions: which image a tag names now (freshness, pulls through the daemon, one per image), who may
see content pulled with a client's credentials, which source serves it, and pre-exports of tags that move.

May import `oci`, `common`, `docker`, `cache` and `sources`.
"""
