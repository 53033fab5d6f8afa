"""Platforms as an index lists them (os, architecture, variant), and which a daemon runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def matches(self, platform: dict[str, Any] | None) -> bool:
        if not platform or platform.get("os") != self.os or platform.get("architecture") != self.architecture:
            return False
        # arm64 manifests often omit their variant, which then means v8.
        default = "v8" if self.architecture == "arm64" else None
        want, have = self.variant or default, platform.get("variant") or default
        return want is None or have is None or want == have

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)

    def as_json(self) -> str:
        data = {"os": self.os, "architecture": self.architecture}
        if self.variant:
            data["variant"] = self.variant
        return json.dumps(data)


def foreign_platform(raw_index: bytes | None, digest: str, platform: Platform) -> str | None:
    """The platform an index (its stored bytes) lists `digest` for, when that is not `platform`; None when
    it lists no such child or lists it for `platform`."""
    try:
        children = json.loads(raw_index or b"").get("manifests")
    except (ValueError, AttributeError):
        return None
    if not isinstance(children, list):
        return None
    child = next((c for c in children if isinstance(c, dict) and c.get("digest") == digest), None)
    if child is None or platform.matches(child.get("platform")):
        return None
    return platform_text(child.get("platform"))


def platform_text(platform: dict[str, Any] | None) -> str:
    if not platform:
        return "unknown"
    return "/".join(str(platform[k]) for k in ("os", "architecture", "variant") if platform.get(k))
