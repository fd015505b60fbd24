"""The Open Inference Protocol v2 (KServe v2) in front of the InferenceServer, protocol-neutral: what
the gRPC servicer (oip_grpc.py) and the REST front end (http_oip.py) share.

One model, named serve.model_name ("layerpar"), version "1": input tensor `input` (FP32, FP64 or FP16,
shape [B, C, H, W]), output tensor `logits` (FP32, [B, num_classes]). An OIP request becomes the
layerpar.v1 PredictRequest it means and passes the same checks (codec.decode_request), the same
batcher, engine, latency target and metrics (InferenceServer.answer); only the encoding differs.

Request parameters: num_branches and min_branches (integers, as in layerpar.v1), timeout (microseconds,
Triton's: a deadline tighter than the transport's). Response parameters: num_branches (branches that
answered), branches_used ("0,1,2"), degraded (bool), batch_rows (rows of the merged engine call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
import numpy as np

from layerpar import __version__
from layerpar.serve import layerpar_v1_pb2 as pb
from layerpar.serve.codec import BadRequest, Decoded, decode_request

Code = grpc.StatusCode
INPUT, OUTPUT, VERSION = "input", "logits", "1"
# OIP datatype -> the layerpar.v1 dtype name (codec.DTYPES); all run in float32.
DATATYPES = {"FP32": "float32", "FP64": "float64", "FP16": "float16"}
READS = ("num_branches", "min_branches", "timeout")  # request parameters this server reads
# Request parameters standard clients send that change nothing here (binary_data_output: REST only).
IGNORED = ("binary_data_output", "priority", "content_type")
HTTP_STATUS = {Code.INVALID_ARGUMENT: 400, Code.NOT_FOUND: 404, Code.UNAUTHENTICATED: 401,
               Code.RESOURCE_EXHAUSTED: 429, Code.UNAVAILABLE: 503, Code.DEADLINE_EXCEEDED: 504,
               Code.CANCELLED: 499, Code.INTERNAL: 500, Code.UNIMPLEMENTED: 501}


class OipError(Exception):
    """A request refused with a status (gRPC code; REST maps it through HTTP_STATUS) and one sentence."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Tensor:
    """One input tensor off the wire: its declared name, datatype and shape, and either its
    little-endian bytes (raw) or its values (typed contents / JSON `data`)."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | None = None
    values: object = None


class OipModel:
    """The served model as the protocol describes it; turns requests into Decoded ones and back."""

    def __init__(self, server):
        self.server = server
        self.name = server.cfg.serve.model_name
        self.spec = server.spec

    def check(self, name: str, version: str = "") -> None:
        if name != self.name:
            raise OipError(Code.NOT_FOUND, f"model {name!r} is not served here; this server serves "
                                           f"{self.name!r}")
        if version not in ("", VERSION):
            raise OipError(Code.NOT_FOUND, f"model {name!r} has no version {version!r}; it has {VERSION!r}")

    def ready(self) -> bool:
        return self.server.serving

    def server_metadata(self, extensions: list[str]) -> dict:
        return {"name": "layerpar", "version": __version__, "extensions": extensions}

    def metadata(self) -> dict:
        c, h, w = self.spec.input_shape
        return {"name": self.name, "versions": [VERSION], "platform": "layerpar_pytorch",
                "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, c, h, w]}],
                "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, self.spec.num_classes]}]}

    def decode(self, tensors: list[Tensor], params: dict, outputs: list[str]) -> tuple[Decoded, float | None]:
        """(the request as layerpar.v1 decodes it, its timeout in seconds or None); BadRequest if wrong."""
        if len(tensors) != 1:
            raise BadRequest(f"expected 1 input tensor named {INPUT!r}, got {len(tensors)}")
        (t,) = tensors
        if t.name != INPUT:
            raise BadRequest(f"input tensor {t.name!r} is unknown; the model's input is {INPUT!r}")
        for out in outputs:
            if out != OUTPUT:
                raise BadRequest(f"output tensor {out!r} is unknown; the model's output is {OUTPUT!r}")
        dtype = DATATYPES.get(t.datatype)
        if dtype is None:
            raise BadRequest(f"datatype {t.datatype!r} is not supported; expected one of "
                             f"{', '.join(DATATYPES)}")
        shape = [int(n) for n in t.shape]
        data = t.raw if t.raw is not None else self._pack(t.values, dtype, shape)
        unknown = sorted(set(params) - set(READS) - set(IGNORED))
        if unknown:
            raise BadRequest(f"request parameter {unknown[0]!r} is unknown; this server reads "
                             f"{', '.join(READS)}")
        req = pb.PredictRequest(data=data, shape=shape, dtype=dtype)
        for key in ("num_branches", "min_branches"):
            if key in params:
                value = _integer(key, params[key])
                if not 0 < value < 2**32:
                    raise BadRequest(f"parameter {key} ({value}) must be in 1..{self.spec.num_branches}")
                setattr(req, key, value)
        timeout = None
        if "timeout" in params:
            timeout = _integer("timeout", params["timeout"]) / 1e6  # microseconds, as Triton's
            if timeout <= 0:
                raise BadRequest(f"parameter timeout ({params['timeout']}) must be > 0 microseconds")
        return decode_request(req, self.spec), timeout

    @staticmethod
    def _pack(values, dtype: str, shape: list[int]) -> bytes:
        """Typed contents / JSON data -> the little-endian bytes layerpar.v1 would have received."""
        if values is None:
            raise BadRequest(f"input tensor {INPUT!r} has no data")
        try:
            with np.errstate(over="ignore"):  # too large for the dtype -> inf, refused as non-finite
                array = np.asarray(values, dtype=np.dtype(dtype).newbyteorder("<")).ravel()
        except (TypeError, ValueError):
            raise BadRequest(f"input tensor {INPUT!r} data must be numbers (a flat or nested list)") from None
        want = math.prod(shape)
        if all(n >= 0 for n in shape) and array.size != want:  # a negative size: the shape check says so
            raise BadRequest(f"input tensor {INPUT!r} holds {array.size} values but shape {shape} "
                             f"needs {want}")
        return array.tobytes()

    @staticmethod
    def parameters(answer) -> dict:
        return {"num_branches": answer.num_branches, "degraded": answer.degraded,
                "branches_used": ",".join(str(b) for b in answer.branches_used),
                "batch_rows": answer.batch_rows}

    async def infer(self, d: Decoded, remaining_s: float | None, timeout_s: float | None, t0: float):
        """The Answer, or OipError with the status layerpar.v1 would give."""
        if timeout_s is not None:
            remaining_s = timeout_s if remaining_s is None else min(remaining_s, timeout_s)
        out = await self.server.answer(d, remaining_s, t0)
        if isinstance(out, tuple):
            raise OipError(*out)
        return out


def _integer(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"parameter {key} must be an integer, got {value!r}")
    return value
