"""The container images Kubernetes manifests name (`helm template`, `kustomize build` output): every
`image:` of the pod templates of pods, deployments, replica sets, stateful sets, daemon sets, jobs and
cron jobs (containers, init containers, ephemeral containers), and of `List` items."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import yaml

_CONTAINER_KEYS = ("initContainers", "containers", "ephemeralContainers")
_TEMPLATED = frozenset(
    {"Deployment", "ReplicaSet", "StatefulSet", "DaemonSet", "Job", "ReplicationController"}
)


class WorkloadError(ValueError):
    """The text is not YAML."""


def _pod_spec(document: dict[str, Any]) -> dict[str, Any] | None:
    kind, spec = document.get("kind"), document.get("spec")
    if not isinstance(spec, dict):
        return None
    if kind in ("Pod", "PodTemplate"):
        found = spec if kind == "Pod" else (document.get("template") or {}).get("spec")
    elif kind in _TEMPLATED:
        found = (spec.get("template") or {}).get("spec")
    elif kind == "CronJob":
        found = (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec")
    else:
        return None
    return found if isinstance(found, dict) else None


def _images_of(document: Any) -> Iterator[str]:
    if not isinstance(document, dict):
        return
    if document.get("kind") == "List":
        for item in document.get("items") or []:
            yield from _images_of(item)
        return
    spec = _pod_spec(document)
    for key in _CONTAINER_KEYS if spec else ():
        for container in spec.get(key) or []:
            image = container.get("image") if isinstance(container, dict) else None
            if isinstance(image, str) and image.strip():
                yield image.strip()


def images(texts: Iterable[str]) -> list[str]:
    """The images the YAML documents name, each once, in the order they first appear."""
    found: dict[str, None] = {}
    for text in texts:
        try:
            documents = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise WorkloadError(f"not YAML: {exc}".replace("\n", " ")) from exc
        for document in documents:
            found.update(dict.fromkeys(_images_of(document)))
    return list(found)
