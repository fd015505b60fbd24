"""Python client of the layerpar.v1 service.

    from layerpar.serve.client import Client
    with Client("127.0.0.1:50051", token=None) as client:
        client.wait_ready()
        p = client.predict(x)                      # x: (B, C, H, W) float32 numpy array or tensor
        p.predicted, p.scores, p.num_branches, p.degraded, p.timings_ms
        client.predict(x, num_branches=2, top_k=3, probabilities=True)
        client.model_info()["classes"]

Errors are grpc.RpcError with the server's status code and message (INVALID_ARGUMENT says what was
expected; RESOURCE_EXHAUSTED means the queue is full; UNAVAILABLE means draining or engine down).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from layerpar.serve import layerpar_v1_pb2 as pb
from layerpar.serve import layerpar_v1_pb2_grpc as pb_grpc
from layerpar.serve.auth import channel_credentials
from layerpar.serve.codec import decode_response, encode_array

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class Prediction:
    scores: np.ndarray  # (B, classes) float32: logits, or probabilities when asked for
    predicted: np.ndarray  # (B,) int64 argmax
    num_branches: int
    degraded: bool = False
    branches_used: list[int] = field(default_factory=list)
    top_k: list[tuple[list[int], list[float]]] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_rows: int = 0


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def make_request(x, *, num_branches: int | None = None, top_k: int = 0, probabilities: bool = False,
                 min_branches: int | None = None) -> pb.PredictRequest:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    data, shape, dtype = encode_array(np.asarray(x))
    req = pb.PredictRequest(data=data, shape=shape, dtype=dtype, top_k=top_k, probabilities=probabilities)
    if num_branches is not None:
        req.num_branches = num_branches
    if min_branches is not None:
        req.min_branches = min_branches
    return req


def to_prediction(resp: pb.PredictResponse) -> Prediction:
    return Prediction(
        scores=decode_response(resp), predicted=np.asarray(resp.predicted, dtype=np.int64),
        num_branches=resp.num_branches, degraded=resp.degraded, branches_used=list(resp.branches_used),
        top_k=[(list(t.classes), list(t.scores)) for t in resp.top_k], timings_ms=dict(resp.timings_ms),
        batch_rows=resp.batch_rows)


class Client:
    def __init__(self, address: str, *, token: str | None = None, tls_ca: str | None = None,
                 tls: bool = False, timeout_s: float | None = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        """tls_ca: PEM of the CA that signed the server's certificate (implies TLS); tls=True with no
        tls_ca uses the system's roots."""
        options = channel_options(max_message_bytes)
        if tls_ca or tls:
            self.channel = grpc.secure_channel(address, channel_credentials(tls_ca), options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.address = address
        self.timeout_s = timeout_s
        self.metadata = auth_metadata(token)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def predict(self, x, *, num_branches: int | None = None, top_k: int = 0, probabilities: bool = False,
                min_branches: int | None = None, timeout_s: float | None = None) -> Prediction:
        """min_branches: under a latency target (serve.latency_slo_ms) the fewest branches the answer
        may come from (the model's num_branches: always the full model)."""
        req = make_request(x, num_branches=num_branches, top_k=top_k, probabilities=probabilities,
                           min_branches=min_branches)
        resp = self.stub.Predict(req, timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        return to_prediction(resp)

    def model_info(self, timeout_s: float | None = None) -> dict:
        r = self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout_s or self.timeout_s,
                                metadata=self.metadata)
        return {"model_kind": r.model_kind, "classes": list(r.classes), "input_shape": tuple(r.input_shape),
                "input_dtype": r.input_dtype, "num_classes": r.num_classes, "num_branches": r.num_branches,
                "workers": r.workers, "transport": r.transport, "params": r.params,
                "checkpoint_id": r.checkpoint_id, "config": json.loads(r.config_json or "{}"),
                "max_request_rows": r.max_request_rows, "max_batch": r.max_batch,
                "degraded_policy": r.degraded_policy, "replicas": r.replicas,
                "workers_per_replica": r.workers_per_replica,
                "prefix_accuracy": [round(a, 6) for a in r.prefix_accuracy], "min_branches": r.min_branches}

    def health(self, service: str = "", timeout_s: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... (raises grpc.RpcError when the server is unreachable)."""
        r = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                   timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_ready(self, timeout_s: float = 60.0, poll_s: float = 0.1) -> None:
        """Block until health says SERVING; TimeoutError after timeout_s."""
        end = time.monotonic() + timeout_s
        last = "unreachable"
        while time.monotonic() < end:
            try:
                last = self.health(timeout_s=max(0.1, min(2.0, end - time.monotonic())))
                if last == "SERVING":
                    return
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise
                last = exc.code().name
            time.sleep(poll_s)
        raise TimeoutError(f"{self.address} is not SERVING after {timeout_s:g}s (last status: {last})")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
