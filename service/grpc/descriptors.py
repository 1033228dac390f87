"""The proto's descriptors as reflection serves them, with their comments.

`make proto` also writes `stubs/dense_descriptor_set.py`: protoc's FileDescriptorSet of dense.proto built with
`--include_source_info`, so it keeps the proto's comments. The runtime's descriptor pool (upb) drops source info
when it copies a file back to a FileDescriptorProto, so grpcio-reflection answering from it alone would serve
no comments to grpcurl, Postman or an IDE. `CommentedPool` answers those files from the descriptor set instead,
after checking that they describe exactly what the loaded stubs do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor

log = logging.getLogger(__name__)


def _default_json_name(name: str) -> str:
    """protoc's lowerCamelCase of a field name (what a runtime derives when json_name is not set)."""
    out, upper = [], False
    for ch in name:
        if ch == "_":
            upper = True
        else:
            out.append(ch.upper() if upper else ch)
            upper = False
    return "".join(out)


def _strip_default_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in [*message.field, *message.extension]:
            if field.json_name == _default_json_name(field.name):
                field.ClearField("json_name")
        _strip_default_json_names(message.nested_type)


def comparable(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """The file's meaning: no source info (comments, spans) and no json_name a runtime would derive anyway.
    protoc's descriptor set writes every json_name and the Python generator writes none, for the same proto."""
    out = descriptor_pb2.FileDescriptorProto()
    out.CopyFrom(file)
    out.ClearField("source_code_info")
    _strip_default_json_names(out.message_type)
    for field in out.extension:
        if field.json_name == _default_json_name(field.name):
            field.ClearField("json_name")
    return out


def file_proto(descriptor: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.CopyToProto(proto)
    return proto


class _File:
    """A FileDescriptor whose CopyToProto writes the commented proto where there is one."""

    def __init__(self, descriptor: FileDescriptor, commented: Mapping[str, descriptor_pb2.FileDescriptorProto]):
        self._descriptor = descriptor
        self._commented = commented
        self.name: str = descriptor.name

    @property
    def dependencies(self) -> list[_File]:
        return [_File(d, self._commented) for d in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        if self.name in self._commented:
            proto.CopyFrom(self._commented[self.name])
        else:
            self._descriptor.CopyToProto(proto)


class CommentedPool:
    """What grpcio-reflection asks of a DescriptorPool: lookups go to `pool`; the files found are serialized
    from `commented` (FileDescriptorProtos with source info) where it has them."""

    def __init__(
        self, pool: descriptor_pool.DescriptorPool, commented: Mapping[str, descriptor_pb2.FileDescriptorProto]
    ) -> None:
        self._pool = pool
        self._commented = dict(commented)

    def FindFileByName(self, name: str) -> _File:
        return _File(self._pool.FindFileByName(name), self._commented)

    def FindFileContainingSymbol(self, symbol: str) -> _File:
        return _File(self._pool.FindFileContainingSymbol(symbol), self._commented)

    def __getattr__(self, name: str) -> Any:
        """FindMessageTypeByName, FindExtensionByNumber, FindAllExtensions: the pool's own."""
        return getattr(self._pool, name)


def reflection_pool(
    serialized_set: bytes | None = None, pool: descriptor_pool.DescriptorPool | None = None
) -> CommentedPool:
    """A pool for `reflection.enable_server_reflection(..., pool=...)`: the committed commented set (default)
    over the default pool, where the stubs registered dense.proto. A file of the set that does not match the
    loaded one (a stale set beside regenerated stubs) is left out with a warning: reflection then serves the
    loaded file without comments rather than a description the server does not implement."""
    if serialized_set is None:
        from service.grpc.stubs import dense_descriptor_set, dense_pb2  # noqa: F401 (dense_pb2 registers the file)

        serialized_set = dense_descriptor_set.SERIALIZED
    pool = pool or descriptor_pool.Default()
    commented = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(serialized_set).file:
        try:
            loaded = file_proto(pool.FindFileByName(file.name))
        except KeyError:
            continue
        if comparable(loaded) == comparable(file):
            commented[file.name] = file
        else:
            log.warning("%s: the commented descriptor set differs from the loaded stubs; run make proto", file.name)
    return CommentedPool(pool, commented)
