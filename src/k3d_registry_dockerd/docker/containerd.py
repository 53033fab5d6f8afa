"""A read-only client of containerd's gRPC API: image records, the content store's root, the version.

Docker's containerd image store keeps every image of a Docker daemon in one containerd namespace (`moby`);
this client only ever reads from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from . import containerd_api as api

log = logging.getLogger(__package__)

DEFAULT_NAMESPACE = "moby"
SYSTEM_ADDRESS = "/run/containerd/containerd.sock"
CONTENT_PLUGIN = "io.containerd.content.v1"
# A call that takes longer than this means containerd is stuck: the request falls back to the export.
CALL_TIMEOUT = 10.0


class ContainerdUnavailable(Exception):
    """containerd cannot be reached, or refused a call for a reason other than "not found"."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int


def _reason(exc: grpc.RpcError) -> str:
    details = exc.details() if isinstance(exc, aio.AioRpcError) else str(exc)
    return f"{exc.code().name.lower()}: {details}" if isinstance(exc, aio.AioRpcError) else details


class ContainerdClient:
    """One gRPC channel to containerd's socket, every call in `namespace`."""

    def __init__(self, address: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.address = address
        self.namespace = namespace
        target = address if address.startswith("unix:") else f"unix://{address}"
        self._channel = aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 16 << 20)])
        self._metadata = (("containerd-namespace", namespace),)

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, method: str, request: Any, response: Any) -> Any:
        call = self._channel.unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        try:
            return await call(request, metadata=self._metadata, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            if isinstance(exc, aio.AioRpcError) and exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise ContainerdUnavailable(f"containerd at {self.address}: {_reason(exc)}") from exc

    async def version(self) -> str:
        answer = await self._unary(api.VERSION, api.Empty(), api.VersionResponse)
        return str(answer.version) if answer is not None else "?"

    async def content_root(self) -> str | None:
        """Where the content store keeps its files (on containerd's side of any mount), if it says."""
        answer = await self._unary(
            api.INTROSPECTION_PLUGINS,
            api.PluginsRequest(filters=[f"type=={CONTENT_PLUGIN}"]),
            api.PluginsResponse,
        )
        for plugin in answer.plugins if answer is not None else ():
            if plugin.id == "content" and not plugin.HasField("init_err"):
                return str(plugin.exports.get("root")) or None
        return None

    async def image(self, name: str) -> Descriptor | None:
        """The target of an image record by its full name (`docker.io/library/alpine:3`), if any."""
        answer = await self._unary(api.IMAGES_GET, api.GetImageRequest(name=name), api.GetImageResponse)
        if answer is None:
            return None
        target = answer.image.target
        return Descriptor(target.media_type, target.digest, target.size)

    async def images(self) -> dict[str, Descriptor]:
        """Every image record of the namespace, by name."""
        answer = await self._unary(api.IMAGES_LIST, api.ListImagesRequest(), api.ListImagesResponse)
        return {
            image.name: Descriptor(image.target.media_type, image.target.digest, image.target.size)
            for image in (answer.images if answer is not None else ())
        }
