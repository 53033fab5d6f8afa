"""The OCI vocabulary: the reference grammar and how a request names a Docker image, media types,
platforms, the validation of pushed manifests, and the spec's errors.

Pure: decided from bytes and strings alone. Imports nothing else from the package.
"""
