"""The few messages of containerd's gRPC API this registry uses, declared here by their names and field
numbers (facts of the API; containerd's .proto files are not vendored) and built into protobuf classes.

Only the fields read or sent are declared: protobuf skips the others when parsing.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "k3d_registry_dockerd.containerd"
_STRING, _INT64, _INT32, _MESSAGE = _F.TYPE_STRING, _F.TYPE_INT64, _F.TYPE_INT32, _F.TYPE_MESSAGE

# name -> fields as (field name, number, type, repeated, message type name or None)
_MESSAGES: dict[str, list[tuple[str, int, int, bool, str | None]]] = {
    "Empty": [],
    # containerd.types.Descriptor
    "Descriptor": [("media_type", 1, _STRING, False, None), ("digest", 2, _STRING, False, None),
                   ("size", 3, _INT64, False, None)],
    # containerd.services.images.v1
    "Image": [("name", 1, _STRING, False, None), ("target", 3, _MESSAGE, False, "Descriptor")],
    "GetImageRequest": [("name", 1, _STRING, False, None)],
    "GetImageResponse": [("image", 1, _MESSAGE, False, "Image")],
    "ListImagesRequest": [],
    "ListImagesResponse": [("images", 1, _MESSAGE, True, "Image")],
    # containerd.services.introspection.v1 (init_err is a google.rpc.Status)
    "Status": [("code", 1, _INT32, False, None), ("message", 2, _STRING, False, None)],
    "Plugin": [("type", 1, _STRING, False, None), ("id", 2, _STRING, False, None),
               ("exports", 5, _MESSAGE, True, "Plugin.ExportsEntry"),
               ("init_err", 7, _MESSAGE, False, "Status")],
    "PluginsRequest": [("filters", 1, _STRING, True, None)],
    "PluginsResponse": [("plugins", 1, _MESSAGE, True, "Plugin")],
    # containerd.services.version.v1
    "VersionResponse": [("version", 1, _STRING, False, None), ("revision", 2, _STRING, False, None)],
}  # fmt: skip

# Full method names: the service names are containerd's, the messages ours (the wire format is the same).
IMAGES_GET = "/containerd.services.images.v1.Images/Get"
IMAGES_LIST = "/containerd.services.images.v1.Images/List"
INTROSPECTION_PLUGINS = "/containerd.services.introspection.v1.Introspection/Plugins"
VERSION = "/containerd.services.version.v1.Version/Version"


def _add_fields(message: descriptor_pb2.DescriptorProto, name: str) -> None:
    for field_name, number, kind, repeated, type_name in _MESSAGES[name]:
        field = message.field.add(name=field_name, number=number, type=kind)
        field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
        if type_name is not None:
            field.type_name = f".{_PACKAGE}.{type_name}"


def _build() -> dict[str, Any]:
    file = descriptor_pb2.FileDescriptorProto(name="k3d_registry_dockerd/containerd.proto", package=_PACKAGE)
    file.syntax = "proto3"
    for name in _MESSAGES:
        message = file.message_type.add(name=name)
        _add_fields(message, name)
        if name == "Plugin":
            # map<string, string> exports: protobuf's map encoding is a repeated key/value entry message.
            entry = message.nested_type.add(name="ExportsEntry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=_STRING, label=_F.LABEL_OPTIONAL)
            entry.field.add(name="value", number=2, type=_STRING, label=_F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        for name in _MESSAGES
    }


_CLASSES = _build()
Empty = _CLASSES["Empty"]
GetImageRequest = _CLASSES["GetImageRequest"]
GetImageResponse = _CLASSES["GetImageResponse"]
ListImagesRequest = _CLASSES["ListImagesRequest"]
ListImagesResponse = _CLASSES["ListImagesResponse"]
PluginsRequest = _CLASSES["PluginsRequest"]
PluginsResponse = _CLASSES["PluginsResponse"]
VersionResponse = _CLASSES["VersionResponse"]
