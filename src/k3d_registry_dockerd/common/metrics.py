"""Prometheus metrics of one registry instance (its own CollectorRegistry, so instances never share)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .bounded import BoundedDict

# Pulls and exports range from milliseconds (cached layers) to minutes (GB images).
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _CacheCollector(Collector):
    """Blobs and bytes in the cache, as the store keeps them (a scrape costs no walk of the cache)."""

    def __init__(self, totals: Callable[[], tuple[int, int]]) -> None:
        self._totals = totals

    def collect(self) -> Iterator[GaugeMetricFamily]:
        count, size = self._totals()
        yield GaugeMetricFamily("k3d_registry_cache_blobs", "Blobs in the cache", value=count)
        yield GaugeMetricFamily("k3d_registry_cache_bytes", "Bytes of blobs in the cache", value=size)


class Metrics:
    """`cache_totals` gives the cache's blob count and bytes for its gauges (none: no such gauges)."""

    def __init__(self, cache_totals: Callable[[], tuple[int, int]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "k3d_registry_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.served_bytes = Counter(
            "k3d_registry_served_bytes", "Body bytes sent, by route", ["route"], registry=self.registry
        )
        self.manifest_cache = Counter(
            "k3d_registry_manifest_cache",
            "Manifest requests answered from the cache (hit), by an export (miss), from containerd's content "
            "store (containerd), from Docker's classic store in place (in_place) or from the cache while "
            "Docker is unreachable (stale)",
            ["result"],
            registry=self.registry,
        )
        self.pulls = Histogram(
            "k3d_registry_docker_pull_seconds",
            "Pulls through dockerd, by outcome",
            ["outcome"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.exports = Histogram(
            "k3d_registry_docker_export_seconds",
            "Exports (docker save) into the cache, by outcome",
            ["outcome"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.evictions = Counter(
            "k3d_registry_evicted_images",
            "Images evicted to keep the cache under its limit",
            registry=self.registry,
        )
        self.uploads = Gauge(
            "k3d_registry_uploads_in_progress", "Blob upload sessions open now", registry=self.registry
        )
        self.stalled_bodies = Counter(
            "k3d_registry_stalled_bodies",
            "Request bodies given up on as nothing arrived for --body-timeout, by kind (upload, manifest)",
            ["kind"],
            registry=self.registry,
        )
        self.exports_in_flight = Gauge(
            "k3d_registry_exports_in_flight", "Exports running now", registry=self.registry
        )
        self.digest_mismatches = Counter(
            "k3d_registry_digest_mismatches",
            "Blobs in the daemon's store (containerd's content store, the classic store's layers) whose "
            "bytes did not match their digest (not served)",
            registry=self.registry,
        )
        self.prefetches = Counter(
            "k3d_registry_prefetches",
            "Pre-exports of tags that moved in Docker, by outcome: exported, failed, superseded (the tag "
            "moved again, or a request's export took its place), over_limit (it would push the cache past "
            "--cache-max-size)",
            ["outcome"],
            registry=self.registry,
        )
        self.prefetch_hits = Counter(
            "k3d_registry_prefetch_hits",
            "Tag requests that found their image pre-exported (ready) or being pre-exported (running)",
            ["state"],
            registry=self.registry,
        )
        self.verified_ahead = Counter(
            "k3d_registry_blobs_verified_ahead",
            "Blobs of images the daemon reported new (or its store took in last, when the registry started), "
            "hashed where its store keeps them before a client asked for them",
            registry=self.registry,
        )
        self.blobs_hashed = Counter(
            "k3d_registry_blobs_hashed",
            "Blobs hashed where the daemon's store keeps them, for clients or ahead of them (each blob once "
            "for all who want it at the same time, and once until its files change, across restarts)",
            registry=self.registry,
        )
        self.verified_before = Counter(
            "k3d_registry_blobs_verified_before",
            "Blobs of the daemon's store an earlier run of the registry verified, taken as verified without "
            "hashing them again (their files are as they were then)",
            registry=self.registry,
        )
        self.private_checks = Counter(
            "k3d_registry_private_checks",
            "Requests for content pulled with a request's credentials, by how their credentials were "
            "checked: allowed or refused by the upstream, remembered (allowed within the last minutes), "
            "missing (none sent), failed (the upstream could not be asked)",
            ["outcome"],
            registry=self.registry,
        )
        if cache_totals is not None:
            self.registry.register(_CacheCollector(cache_totals))
        # Children by labels, looked up once: `labels()` validates and locks on every call.
        self._answers: BoundedDict[tuple[str, str, int], Any] = BoundedDict(1024)
        self._bytes: BoundedDict[str, Any] = BoundedDict(256)

    def answered(self, route: str, method: str, status: int, sent: int) -> None:
        """An HTTP answer: counted by route, method and status, its body bytes by route."""
        key = (route, method, status)
        requests = self._answers.get(key)
        if requests is None:
            requests = self._answers[key] = self.requests.labels(route, method, str(status))
        requests.inc()
        if sent:
            served = self._bytes.get(route)
            if served is None:
                served = self._bytes[route] = self.served_bytes.labels(route)
            served.inc(sent)
