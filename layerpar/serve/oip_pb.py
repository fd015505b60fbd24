"""The Open Inference Protocol's messages (oip_v2.proto, package `inference`) in a descriptor pool of
their own.

Why not a checked-in oip_v2_pb2.py like layerpar_v1_pb2.py: generated stubs register their names in
protobuf's default pool, and tritonclient, KServe and MLServer all register `inference.*` there from
their own files; two files defining one name cannot share a pool, so a process holding both a client
and this server (tests, benchmarks, notebooks) would fail to import. The wire format depends only on
field numbers, not on the pool. grpc_tools.protoc (a dependency, the compiler that makes
layerpar_v1_pb2.py) compiles the .proto once per process, in memory.

    from layerpar.serve import oip_pb as oip
    oip.ModelInferRequest.FromString(raw)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO = Path(__file__).with_name("oip_v2.proto")
SERVICE = "inference.GRPCInferenceService"
METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")


def compile_proto(proto: Path = PROTO) -> descriptor_pb2.FileDescriptorProto:
    """The .proto's FileDescriptorProto, as protoc makes it."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "oip.desc"
        rc = protoc.main(["protoc", f"-I{proto.parent}", f"--descriptor_set_out={out}", proto.name])
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc could not compile {proto} (exit {rc})")
        (fd,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return fd


POOL = descriptor_pool.DescriptorPool()
DESCRIPTOR = POOL.Add(compile_proto())


def _message(name: str):
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"inference.{name}"))


ServerLiveRequest = _message("ServerLiveRequest")
ServerLiveResponse = _message("ServerLiveResponse")
ServerReadyRequest = _message("ServerReadyRequest")
ServerReadyResponse = _message("ServerReadyResponse")
ModelReadyRequest = _message("ModelReadyRequest")
ModelReadyResponse = _message("ModelReadyResponse")
ServerMetadataRequest = _message("ServerMetadataRequest")
ServerMetadataResponse = _message("ServerMetadataResponse")
ModelMetadataRequest = _message("ModelMetadataRequest")
ModelMetadataResponse = _message("ModelMetadataResponse")
ModelInferRequest = _message("ModelInferRequest")
ModelInferResponse = _message("ModelInferResponse")
InferParameter = _message("InferParameter")


class ReflectionPool:
    """What server reflection reads descriptors from: protobuf's default pool (layerpar.v1, health,
    reflection itself), then this module's POOL (inference.*), so that a reflection client lists and
    describes the Open Inference Protocol's service beside layerpar.v1."""

    def __init__(self, *pools):
        self.pools = pools or (descriptor_pool.Default(), POOL)

    def _first(self, method: str, *args):
        error: Exception | None = None
        for pool in self.pools:
            try:
                return getattr(pool, method)(*args)
            except KeyError as exc:
                error = exc
        raise error

    def FindFileByName(self, name):  # noqa: N802 - the DescriptorPool method names reflection calls
        return self._first("FindFileByName", name)

    def FindFileContainingSymbol(self, symbol):  # noqa: N802
        return self._first("FindFileContainingSymbol", symbol)

    def FindMessageTypeByName(self, name):  # noqa: N802
        return self._first("FindMessageTypeByName", name)

    def FindExtensionByNumber(self, message, number):  # noqa: N802
        return self._first("FindExtensionByNumber", message, number)

    def FindAllExtensions(self, message):  # noqa: N802
        return self._first("FindAllExtensions", message)
