"""The HTTP side: routes that only translate HTTP to calls below and answers back (OCI errors as the spec's
JSON), sending blobs from files, write access (htpasswd), the status page, health and metrics.

May import every layer below; only the program (cli, server) imports it.
"""
