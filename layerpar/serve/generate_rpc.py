"""The Generate RPC: a gRPC server for a causal language model, and Generate's answer on an image server.

    srv = GenerationServer(cfg, decoder, checkpoint_id="step_0000100")   # layerpar serve on an LM
    address = await srv.start(); ...; await srv.stop()
    with GenerationServerThread(cfg, decoder) as srv: Client(srv.address)  # tests, benchmarks

layerpar.v1.Inference/Generate (server-streaming) runs on the continuous-batching scheduler
(serve/generation.py): one GenerateResponse{token} per token as it is made, then GenerateResponse{done}
(stop reason, token counts, the text). The same server answers ModelInfo, grpc.health.v1 (SERVING
while the decoder can decode) and reflection; Predict answers FAILED_PRECONDITION (an LM has no
classes). Auth and garbage bytes as for the image server (auth.TokenAuth, decoding.DecodeGuard).
Statuses: INVALID_ARGUMENT for a bad request (empty prompt, a prompt longer than the context,
max_tokens 0 or above serve.max_new_tokens, a prompt that is not UTF-8, ...), RESOURCE_EXHAUSTED when
serve.max_queue generations wait, UNAVAILABLE while draining or when a worker is lost mid-generation
(the scheduler then rebuilds the decoder for the requests that follow; with serve.degraded: allow the
live generations continue on it instead, marked degraded), CANCELLED when the client leaves (its
cache slot is freed at the next decode step). Metrics beside the image server's:
layerpar_generated_tokens_total, layerpar_generations_total{reason} (the five stop reasons),
layerpar_token_seconds (time per token), layerpar_decode_step_seconds, layerpar_generate_slots_used.
"""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram

from layerpar.data.text import ByteTokenizer
from layerpar.serve import layerpar_v1_pb2 as pb
from layerpar.serve.auth import TokenAuth, resolve_token, server_credentials
from layerpar.serve.decoding import DecodeGuard
from layerpar.serve.generation import (
    STOP_REASONS,
    Closed,
    Finished,
    GenerationError,
    QueueFull,
    Sampling,
    Scheduler,
)
from layerpar.serve.metrics import LATENCY_BUCKETS, ServerMetrics
from layerpar.serve.server import ServerThread, method_label, redacted_config

log = logging.getLogger("layerpar.serve")
Code = grpc.StatusCode
SERVICE = "layerpar.v1.Inference"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
NOT_IMAGES = ("this server serves a language model; Predict classifies images: use Generate "
              "(layerpar generate, or the Generate RPC)")
DRAINING = "the server is draining (shutting down); send the request elsewhere"


def _bytes_twin():
    """GenerateRequest with its string fields as bytes: parses what the real one refuses as bad UTF-8."""
    proto = descriptor_pb2.FileDescriptorProto(name="layerpar_generate_twin.proto", package="twin",
                                               syntax="proto3")
    pb.GenerateRequest.DESCRIPTOR.CopyToProto(proto.message_type.add())
    for f in proto.message_type[0].field:
        if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
            f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return GetMessageClass(pool.FindMessageTypeByName("twin.GenerateRequest"))


_TWIN = _bytes_twin()


def parse_generate(raw: bytes) -> pb.GenerateRequest:
    """The request, or GenerationError naming the field that is not UTF-8 (or the garbage)."""
    try:
        return pb.GenerateRequest.FromString(raw)
    except Exception:  # noqa: BLE001 - any parse failure is the caller's bytes; say which
        pass
    try:
        twin = _TWIN.FromString(raw)
    except Exception:  # noqa: BLE001
        raise GenerationError("request is not a valid layerpar.v1.GenerateRequest message") from None
    for name, values in (("prompt", [twin.prompt]), ("stop", list(twin.stop))):
        for v in values:
            try:
                v.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise GenerationError(f"the {name} is not valid UTF-8 (byte {exc.start}: "
                                      f"{v[exc.start:exc.start + 1]!r})") from None
    raise GenerationError("request is not a valid layerpar.v1.GenerateRequest message")


def request_of(req: pb.GenerateRequest, tok: ByteTokenizer) -> tuple[list[int], Sampling]:
    """Prompt tokens (BOS + the prompt's UTF-8 bytes) and sampling settings; GenerationError."""
    if not req.prompt:
        raise GenerationError("the prompt is empty: give at least one character")
    sampling = Sampling(
        max_tokens=int(req.max_tokens), temperature=float(req.temperature), top_k=int(req.top_k),
        seed=int(req.seed) if req.HasField("seed") else None, stop=tuple(s.encode() for s in req.stop),
        num_branches=int(req.num_branches) if req.HasField("num_branches") else None,
        min_branches=int(req.min_branches) if req.HasField("min_branches") else 1,
        token_deadline_ms=float(req.token_deadline_ms) if req.HasField("token_deadline_ms") else None)
    return tok.encode(req.prompt, bos=True), sampling


def token_message(t) -> pb.GenerateResponse:
    return pb.GenerateResponse(token=pb.GeneratedToken(
        id=t.id, piece=t.piece, index=t.index, num_branches=t.branches, degraded=t.degraded,
        step_ms=t.step_ms, latency_ms=t.latency_ms))


def done_message(f: Finished) -> pb.GenerateResponse:
    return pb.GenerateResponse(done=pb.GenerateDone(
        text=f.text.decode("utf-8", "replace"), stop_reason=f.reason, prompt_tokens=f.prompt_tokens,
        completion_tokens=f.completion_tokens, tokens=f.tokens, num_branches=f.branches, seed=f.seed,
        stop_sequence=f.stop_sequence.decode("utf-8", "replace"), queue_ms=f.queue_ms,
        token_ms=f.token_ms, degraded=f.degraded, recoveries=f.recoveries))


class GenerationMetrics:
    """Generation's series, in the server's registry (labels bounded by STOP_REASONS)."""

    def __init__(self, m: ServerMetrics, used):
        r = m.registry
        self.tokens = Counter("layerpar_generated_tokens", "Tokens generated", registry=r)
        self.done = Counter("layerpar_generations", "Generations ended, by stop reason", ["reason"],
                            registry=r)
        for reason in STOP_REASONS:
            self.done.labels(reason=reason)
        self.token_s = Histogram("layerpar_token_seconds", "Time per generated token (since the previous "
                                 "one; the first: since arrival)", buckets=LATENCY_BUCKETS, registry=r)
        self.step_s = Histogram("layerpar_decode_step_seconds", "One decode call (a step or a prefill)",
                                buckets=LATENCY_BUCKETS, registry=r)
        self.slots = Gauge("layerpar_generate_slots_used", "Cache slots decoding now", registry=r)
        self.slots.set_function(used)


class GenerationServer:
    """One gRPC server for a causal LM on the current asyncio loop; start(), then stop() (drains)."""

    def __init__(self, cfg, decoder, *, checkpoint_id: str = "", token: str | None = None,
                 rebuild=None, params: int = 0, workers: int = 0):
        self.cfg, self.decoder, self.checkpoint_id = cfg, decoder, checkpoint_id
        s = cfg.serve
        self.token = token if token is not None else resolve_token(s.token_file)
        self.tok = ByteTokenizer()
        self.params, self.workers = params, workers
        self.metrics = ServerMetrics(max_batch=max(1, decoder.slots))
        self.scheduler = Scheduler(decoder, piece=lambda t: self.tok.decode_bytes([t]), eos=self.tok.EOS,
                                   max_queue=s.max_queue, max_tokens=s.max_new_tokens,
                                   token_deadline_ms=s.token_latency_ms, min_branches=max(1, s.min_branches),
                                   on_step=self._on_step, rebuild=rebuild, resume=s.degraded == "allow",
                                   on_finish=self._on_finish)
        self.gen = GenerationMetrics(self.metrics, lambda: self.scheduler.decoder.num_used())
        self.metrics.track_queue(self.scheduler.depth)
        self.metrics.workers.set(workers)
        self.address = self.metrics_url = self.port = None
        self._draining = False
        self.serving = False
        self._inflight = 0

    def _on_step(self, rows: int, k: int, seconds: float) -> None:
        self.gen.step_s.observe(seconds)
        self.metrics.batch(rows, rows)

    def _on_finish(self, f: Finished) -> None:
        self.gen.done.labels(reason=f.reason).inc()
        if f.completion_tokens:
            self.metrics.branches_used.observe(f.branches)
        if f.degraded:
            self.metrics.degraded.inc()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        s = self.cfg.serve
        count = self.metrics.request
        interceptors = [TokenAuth(self.token, on_refused=lambda m: count(method_label(m), "UNAUTHENTICATED"),
                                  health_auth=s.health_auth)] if self.token else []
        interceptors.append(DecodeGuard(on_invalid=lambda m: count(method_label(m), "INVALID_ARGUMENT")))
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.max_receive_message_length", s.max_message_bytes), ("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": grpc.unary_stream_rpc_method_handler(  # raw bytes: bad UTF-8 gets its own sentence
                self.generate, response_serializer=pb.GenerateResponse.SerializeToString),
            "Predict": grpc.unary_unary_rpc_method_handler(
                self.predict, response_serializer=pb.PredictResponse.SerializeToString),
            "ModelInfo": grpc.unary_unary_rpc_method_handler(
                self.model_info, request_deserializer=pb.ModelInfoRequest.FromString,
                response_serializer=pb.ModelInfoResponse.SerializeToString),
        }),))
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server)
        host = f"[{s.host}]" if ":" in s.host else s.host
        target = f"{host}:{s.port}"
        port = (self.server.add_secure_port(target, server_credentials(s.tls_cert, s.tls_key)) if s.tls_cert
                else self.server.add_insecure_port(target))
        await self.server.start()
        self.address, self.port = f"{host}:{port}", port
        if s.metrics_port >= 0:
            mport = self.metrics.start_http(s.metrics_host, s.metrics_port)
            mhost = f"[{s.metrics_host}]" if ":" in s.metrics_host else s.metrics_host
            self.metrics_url = f"http://{mhost}:{mport}/metrics"
        await self._check_health()
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        return self.address

    async def _check_health(self) -> None:
        if self._draining:
            return
        ok = self.scheduler.broken is None
        for name in ("", SERVICE):
            await self.health.set(name, SERVING if ok else NOT_SERVING)
        self.serving = ok
        self.metrics.serving.set(1 if ok else 0)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.serve.health_interval_s)
            await self._check_health()

    async def begin_drain(self) -> None:
        self._draining = True
        self.serving = False
        self.metrics.serving.set(0)
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_s: float | None = None) -> bool:
        """Drain, let live generations finish (at most grace_s), stop. True if none was cut off."""
        loop = asyncio.get_running_loop()
        end = loop.time() + (self.cfg.serve.drain_timeout_s if grace_s is None else grace_s)
        if not self._draining:
            await self.begin_drain()
        while self._inflight and loop.time() < end:
            await asyncio.sleep(0.005)
        finished = self._inflight == 0
        await asyncio.sleep(min(0.25, max(0.0, end - loop.time())))
        self._health_task.cancel()
        await loop.run_in_executor(None, self.scheduler.close)
        if self.scheduler.rebuilds:  # a decoder the server built itself after a lost worker: its own
            await loop.run_in_executor(None, self.scheduler.decoder.close)
        await self.server.stop(min(0.2, max(0.0, end - loop.time())))
        self.metrics.stop_http()
        return finished

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()

    # ------------------------------------------------------------------ the service

    async def generate(self, raw: bytes, context):
        self._inflight += 1
        g, status = None, "OK"
        try:
            if self._draining:
                status = "UNAVAILABLE"
                await context.abort(Code.UNAVAILABLE, DRAINING)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            try:
                prompt, sampling = request_of(parse_generate(raw), self.tok)
                g = self.scheduler.submit(prompt, sampling,
                                          on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
            except (GenerationError, QueueFull, Closed) as exc:
                status = {GenerationError: "INVALID_ARGUMENT", QueueFull: "RESOURCE_EXHAUSTED",
                          Closed: "UNAVAILABLE"}[type(exc)]
                await context.abort(Code[status], str(exc))
            while True:
                event = await events.get()
                if not isinstance(event, Finished):
                    self.gen.tokens.inc()
                    self.gen.token_s.observe(event.latency_ms / 1e3)
                    yield token_message(event)
                    continue
                if event.code != "OK":
                    status = event.code
                    await context.abort(Code[event.code], event.message)
                yield done_message(event)
                return
        except asyncio.CancelledError:  # the client left (or its deadline passed)
            status = "CANCELLED"
            raise
        finally:
            if g is not None and g.result is None:
                self.scheduler.cancel(g)  # frees its slot at the next decode step
                if status == "OK":
                    status = "CANCELLED"
            self.metrics.request("Generate", status)
            self._inflight -= 1

    async def predict(self, raw: bytes, context):
        self.metrics.request("Predict", "FAILED_PRECONDITION")
        await context.abort(Code.FAILED_PRECONDITION, NOT_IMAGES)

    async def model_info(self, request, context) -> pb.ModelInfoResponse:
        m, s = self.cfg.model, self.cfg.serve
        self.metrics.request("ModelInfo", "OK")
        return pb.ModelInfoResponse(
            model_kind=m.kind, num_branches=self.scheduler.n, workers=self.workers,
            transport="local" if not self.workers else "fastpath", params=self.params,
            checkpoint_id=self.checkpoint_id, max_batch=self.decoder.slots, degraded_policy=s.degraded,
            config_json=json.dumps(redacted_config(self.cfg, self.port, token=bool(self.token))),
            replicas=1, workers_per_replica=self.workers, min_branches=self.scheduler.min_branches)


class GenerationServerThread(ServerThread):
    """A GenerationServer on its own event loop in a background thread (tests, benchmarks):

        with GenerationServerThread(cfg, decoder) as srv: ...srv.address...
    """

    async def _make(self, cfg, decoder, kwargs) -> GenerationServer:
        return GenerationServer(cfg, decoder, **kwargs)
