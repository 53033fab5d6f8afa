"""Small helpers with no knowledge of registries or Docker: sizes and durations as printed, sharing one
call among concurrent callers, bounded maps, progress of long transfers, the Prometheus metrics.

Imports nothing else from the package: every layer above may use it.
"""
