"""Decode -> validate -> encode: the wire format of layerpar.v1 and the checks every request passes.

Every way a request can be wrong raises ``BadRequest`` with one sentence that says what was expected;
the server turns it into INVALID_ARGUMENT and keeps serving. Nothing here touches the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from layerpar.serve import layerpar_v1_pb2 as pb

# Input dtypes a client may send; all are converted to float32, the dtype the model runs in.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
}


class BadRequest(ValueError):
    """A request the server cannot run; the message says what was expected (-> INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class InputSpec:
    """What a valid request looks like for the model being served."""

    input_shape: tuple[int, int, int]  # (C, H, W)
    num_branches: int
    num_classes: int
    max_rows: int
    prefix_models: bool = True  # a Para-Former has prefix models; a serial ViT does not

    @classmethod
    def from_config(cls, cfg) -> InputSpec:
        m = cfg.model
        return cls(input_shape=(m.in_channels, m.image_size, m.image_size), num_branches=m.num_branches,
                   num_classes=m.num_classes, max_rows=cfg.serve.max_request_rows,
                   prefix_models=m.kind == "paraformer")


@dataclass(frozen=True)
class Decoded:
    x: np.ndarray  # (B, C, H, W) float32, finite
    num_branches: int | None  # None = all branches, or the latency target's choice (see min_branches)
    top_k: int
    probabilities: bool
    min_branches: int = 0  # the fewest branches a latency target may answer with (0: no demand; N:
    # the full model, also what an explicit num_branches = N becomes)

    @property
    def rows(self) -> int:
        return self.x.shape[0]


def parse_request(raw: bytes) -> pb.PredictRequest:
    """Raw bytes off the wire -> PredictRequest; garbage is a BadRequest, not an INTERNAL error."""
    try:
        return pb.PredictRequest.FromString(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise BadRequest(f"request is not a valid layerpar.v1.PredictRequest message ({exc})") from None


def decode_request(req: pb.PredictRequest, spec: InputSpec) -> Decoded:
    """Check a request against the served model and return its input as float32 (B, C, H, W)."""
    c, h, w = spec.input_shape
    expected = f"(B, {c}, {h}, {w}) with 1 <= B <= {spec.max_rows}"
    dtype = DTYPES.get(req.dtype)
    if dtype is None:
        raise BadRequest(f"dtype {req.dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    shape = tuple(req.shape)
    if len(shape) != 4 or shape[1:] != spec.input_shape or shape[0] < 0:
        raise BadRequest(f"shape {list(shape)} does not fit the model; expected {expected}")
    rows = shape[0]
    if rows == 0:
        raise BadRequest(f"empty batch (0 rows); expected {expected}")
    if rows > spec.max_rows:
        raise BadRequest(
            f"batch of {rows} rows exceeds serve.max_request_rows ({spec.max_rows}); "
            "split it into smaller requests"
        )
    want = math.prod(shape) * dtype.itemsize
    if len(req.data) != want:
        raise BadRequest(
            f"data holds {len(req.data)} bytes but shape {list(shape)} in {req.dtype} needs {want}"
        )
    with np.errstate(over="ignore", invalid="ignore"):  # too large for float32 -> inf, refused below
        x = np.frombuffer(req.data, dtype=dtype).reshape(shape).astype(np.float32)  # (B, C, H, W), a copy
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise BadRequest(f"input holds {bad} NaN or Inf values (or values too large for float32); "
                         "expected finite numbers")
    k = req.num_branches if req.HasField("num_branches") else None
    if k is not None:
        if not 1 <= k <= spec.num_branches:
            raise BadRequest(f"num_branches ({k}) must be in 1..{spec.num_branches}")
        if k < spec.num_branches and not spec.prefix_models:
            raise BadRequest(f"num_branches ({k}): the served model is a serial ViT and has no prefix "
                             f"models; leave it unset or use {spec.num_branches}")
    least = req.min_branches if req.HasField("min_branches") else 0
    if req.HasField("min_branches") and not 1 <= least <= spec.num_branches:
        raise BadRequest(f"min_branches ({least}) must be in 1..{spec.num_branches}")
    if least and k is not None and k < least:
        raise BadRequest(f"num_branches ({k}) is below min_branches ({least}); leave one of them unset")
    if k == spec.num_branches:
        # The full model, exactly: batched with requests that left num_branches unset, with a floor
        # of all N branches so that a latency target cannot answer it (or its batch) with a prefix.
        k, least = None, spec.num_branches
    if req.top_k > spec.num_classes:
        raise BadRequest(f"top_k ({req.top_k}) must be in 0..{spec.num_classes} (the number of classes)")
    return Decoded(x=x, num_branches=k, top_k=req.top_k, probabilities=req.probabilities,
                   min_branches=least)


def encode_array(x: np.ndarray) -> tuple[bytes, list[int], str]:
    """A client-side array -> (data, shape, dtype) fields of a PredictRequest."""
    x = np.asarray(x)
    if x.dtype.name not in DTYPES:
        x = x.astype(np.float32)
    x = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<"))
    return x.tobytes(), list(x.shape), x.dtype.name


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def encode_response(logits: np.ndarray, d: Decoded, *, num_branches: int, degraded: bool = False,
                    branches_used: list[int] | None = None, timings_ms: dict[str, float] | None = None,
                    batch_rows: int = 0) -> pb.PredictResponse:
    """This caller's logits (B, classes) -> PredictResponse (scores, argmax, optional top-k)."""
    scores = softmax(logits) if d.probabilities else logits
    resp = pb.PredictResponse(
        scores=scores.ravel().tolist(), shape=list(scores.shape), probabilities=d.probabilities,
        predicted=logits.argmax(axis=-1).tolist(), num_branches=num_branches, degraded=degraded,
        branches_used=branches_used or [], timings_ms=timings_ms or {}, batch_rows=batch_rows,
    )
    if d.top_k:
        best = np.argsort(-scores, axis=-1, kind="stable")[:, : d.top_k]  # (B, k)
        for row, cls in zip(scores, best, strict=True):
            resp.top_k.add(classes=cls.tolist(), scores=row[cls].tolist())
    return resp


def decode_response(resp: pb.PredictResponse) -> np.ndarray:
    """PredictResponse -> float32 scores (B, classes)."""
    return np.asarray(resp.scores, dtype=np.float32).reshape(tuple(resp.shape))
