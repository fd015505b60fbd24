"""`inference.GRPCInferenceService` (the Open Inference Protocol over gRPC) on the InferenceServer's own
gRPC server and port, beside layerpar.v1, behind the same interceptors (token, garbage bytes) and
metrics. Any OIP client calls it, e.g. tritonclient:

    import tritonclient.grpc as tc
    client = tc.InferenceServerClient("127.0.0.1:50051")
    x = tc.InferInput("input", [2, 1, 8, 8], "FP32"); x.set_data_from_numpy(images)
    client.infer("layerpar", [x], parameters={"num_branches": 2}).as_numpy("logits")

Statuses: a bad request is INVALID_ARGUMENT, an unknown model or version NOT_FOUND, and every other
status is layerpar.v1's for the same request (UNAVAILABLE while draining, RESOURCE_EXHAUSTED on a
full queue, DEADLINE_EXCEEDED, ...).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from layerpar.serve import oip_pb as oip
from layerpar.serve.codec import BadRequest
from layerpar.serve.oip import OUTPUT, VERSION, Code, OipError, OipModel, Tensor

RAW_DTYPE = "<f4"  # the output's bytes: little-endian float32, as the protocol's raw contents are


def param_value(p):
    """An InferParameter -> its Python value (None when unset)."""
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def set_param(p, value) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}  # FP16 travels as raw bytes only


def tensors_of(req) -> list[Tensor]:
    """The request's input tensors; raw_input_contents (one per input, in order) or typed contents."""
    raws = list(req.raw_input_contents)
    if raws and len(raws) != len(req.inputs):
        raise BadRequest(f"raw_input_contents holds {len(raws)} tensors but the request has "
                         f"{len(req.inputs)} inputs")
    out = []
    for i, t in enumerate(req.inputs):
        if raws:
            if t.HasField("contents"):
                raise BadRequest(f"input tensor {t.name!r} has both raw_input_contents and contents; "
                                 "send one of them")
            out.append(Tensor(t.name, t.datatype, list(t.shape), raw=raws[i]))
            continue
        field = CONTENTS.get(t.datatype)
        values = list(getattr(t.contents, field)) if field else None
        out.append(Tensor(t.name, t.datatype, list(t.shape), values=values))
    return out


class OipServicer:
    def __init__(self, server):
        self.server = server
        self.model = OipModel(server)
        self.count = server.metrics.request

    async def server_live(self, request, context):
        self.count("ServerLive", "OK")
        return oip.ServerLiveResponse(live=True)

    async def server_ready(self, request, context):
        self.count("ServerReady", "OK")
        return oip.ServerReadyResponse(ready=self.model.ready())

    async def model_ready(self, request, context):
        # An unknown model is not ready (Triton's answer), rather than an error: probes read a bool.
        self.count("ModelReady", "OK")
        known = request.name == self.model.name and request.version in ("", VERSION)
        return oip.ModelReadyResponse(ready=known and self.model.ready())

    async def server_metadata(self, request, context):
        self.count("ServerMetadata", "OK")
        return oip.ServerMetadataResponse(**self.model.server_metadata([]))

    async def model_metadata(self, request, context):
        try:
            self.model.check(request.name, request.version)
        except OipError as exc:
            self.count("ModelMetadata", exc.code.name)
            await context.abort(exc.code, exc.message)
        self.count("ModelMetadata", "OK")
        meta = self.model.metadata()
        response = oip.ModelMetadataResponse(name=meta["name"], versions=meta["versions"],
                                             platform=meta["platform"])
        for kind in ("inputs", "outputs"):
            for t in meta[kind]:
                getattr(response, kind).add(**t)
        return response

    async def model_infer(self, raw: bytes, context):
        t0 = time.perf_counter()
        try:
            response = await self._infer(raw, context, t0)
        except OipError as exc:
            self.count("ModelInfer", exc.code.name)
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:  # the caller left or its deadline passed mid-call
            remaining = context.time_remaining()
            gone = remaining is not None and remaining <= 0
            self.count("ModelInfer", "DEADLINE_EXCEEDED" if gone else "CANCELLED")
            raise
        self.count("ModelInfer", "OK")
        self.server.metrics.phase.labels(phase="total").observe(time.perf_counter() - t0)
        return response

    async def _infer(self, raw: bytes, context, t0: float):
        try:
            req = oip.ModelInferRequest.FromString(raw)
        except (DecodeError, RuntimeError, ValueError):
            raise OipError(Code.INVALID_ARGUMENT, "request is not a valid inference.ModelInferRequest "
                                                  "message") from None
        self.model.check(req.model_name, req.model_version)
        params = {k: param_value(v) for k, v in req.parameters.items()}
        try:
            for out in req.outputs:
                if out.parameters:
                    raise BadRequest(f"output parameters ({', '.join(sorted(out.parameters))}) are not "
                                     "supported; ask for the output by name only")
            d, timeout = self.model.decode(tensors_of(req), params, [o.name for o in req.outputs])
        except BadRequest as exc:
            raise OipError(Code.INVALID_ARGUMENT, str(exc)) from None
        answer = await self.model.infer(d, context.time_remaining(), timeout, t0)
        logits = np.ascontiguousarray(answer.logits, dtype=RAW_DTYPE)  # (B, num_classes)
        response = oip.ModelInferResponse(model_name=self.model.name, model_version=VERSION, id=req.id)
        response.outputs.add(name=OUTPUT, datatype="FP32", shape=list(logits.shape))
        response.raw_output_contents.append(logits.tobytes())
        for key, value in self.model.parameters(answer).items():
            set_param(response.parameters[key], value)
        return response


def handlers(server) -> grpc.GenericRpcHandler:
    """The service's handlers for server.add_generic_rpc_handlers."""
    s = OipServicer(server)

    def unary(fn, request, response):
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=request.FromString if request else None,
            response_serializer=response.SerializeToString)

    return grpc.method_handlers_generic_handler(oip.SERVICE, {
        "ServerLive": unary(s.server_live, oip.ServerLiveRequest, oip.ServerLiveResponse),
        "ServerReady": unary(s.server_ready, oip.ServerReadyRequest, oip.ServerReadyResponse),
        "ModelReady": unary(s.model_ready, oip.ModelReadyRequest, oip.ModelReadyResponse),
        "ServerMetadata": unary(s.server_metadata, oip.ServerMetadataRequest, oip.ServerMetadataResponse),
        "ModelMetadata": unary(s.model_metadata, oip.ModelMetadataRequest, oip.ModelMetadataResponse),
        # raw bytes in, like layerpar.v1 Predict: garbage is INVALID_ARGUMENT with our own sentence
        "ModelInfer": unary(s.model_infer, None, oip.ModelInferResponse),
    })
