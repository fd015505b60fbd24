"""The gRPC server: a thin servicer (decode -> validate -> batch -> encode) in front of any Backend.

    layerpar serve --checkpoint runs/<run>                      # or: python launch/serve.py ...
    layerpar serve --checkpoint runs/<run> --port 0 --set serve.max_wait_ms=2 --set parallel.workers=2

In Python (tests, benchmarks): ``with ServerThread(cfg, backend) as srv: Client(srv.address)``.

Services: layerpar.v1.Inference (Predict, ModelInfo), the Open Inference Protocol's
inference.GRPCInferenceService (oip_grpc.py; its REST twin on serve.http_port: http_oip.py; both call
InferenceServer.answer, as Predict does), grpc.health.v1.Health (SERVING only while the
backend reports every worker up, or for replica groups (parallel.replicas) while one group is whole;
NOT_SERVING while draining or degraded below serve.min_live_fraction) and server reflection. The
batcher runs one batch per replica group at once, dispatching on idle; with serve.latency_slo_ms a
batch may be answered by a prefix of the branches (serve/slo.py; the reply's branches_used says so).
Metrics: Prometheus text on <serve.metrics_host>:<serve.metrics_port>/metrics
(127.0.0.1 unless told otherwise). Auth (layerpar/serve/auth.py): the token comes from
serve.token_file or LAYERPAR_SERVE_TOKEN; serve.health_auth says whether health and reflection need it.
SIGTERM / SIGINT: health turns NOT_SERVING, new calls get UNAVAILABLE, in-flight requests finish
(at most serve.drain_timeout_s), then the server stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from layerpar.model.overflow import InputOverflow, nonfinite_rows, overflow_message
from layerpar.serve import layerpar_v1_pb2 as pb
from layerpar.serve import oip_grpc, oip_pb
from layerpar.serve.auth import TokenAuth, resolve_token, server_credentials
from layerpar.serve.batching import Batcher, DeadlineExpired, Draining, LoopBridge, QueueFull
from layerpar.serve.codec import BadRequest, InputSpec, decode_request, encode_response, parse_request
from layerpar.serve.decoding import DecodeGuard
from layerpar.serve.metrics import ServerMetrics
from layerpar.serve.prefixes import PrefixAccuracy, prefix_floor
from layerpar.serve.runner import BackendRunner, BackendUnavailable, probe
from layerpar.serve.slo import LatencyPlanner

log = logging.getLogger("layerpar.serve")
SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "layerpar.v1.Inference"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
Code = grpc.StatusCode
DRAIN_LINGER_S = 0.25
PROBE_SHARE = 0.6  # of the health probe's bound, what the backend may spend on one group's health
# Metrics label of each method this server has; anything else is "unknown", so that made-up method
# names (refused for want of a token) cannot create new series without bound.
METHOD_LABELS = {f"/{service.full_name}/{m.name}": m.name for service in (
    pb.DESCRIPTOR.services_by_name["Inference"], health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]) for m in service.methods}
METHOD_LABELS.update({f"/{oip_pb.SERVICE}/{m}": m for m in oip_pb.METHODS})  # the Open Inference Protocol


DRAINING = "the server is draining (shutting down); send the request elsewhere"


@dataclass(frozen=True)
class Answer:
    """One request's answer, before any protocol encodes it."""

    logits: np.ndarray  # (B, num_classes) float32: this caller's rows only
    num_branches: int  # branches whose sum produced it
    degraded: bool
    branches_used: list[int]
    timings_ms: dict[str, float]
    batch_rows: int  # rows in the merged engine call


def method_label(method: str) -> str:
    """"/layerpar.v1.Inference/Predict" -> "Predict"; a method this server does not have -> "unknown"."""
    return METHOD_LABELS.get(method, "unknown")


def redacted_config(cfg, port: int | None = None, *, token: bool = False) -> dict:
    """The config as ModelInfo shows it: the bound port, whether a token is required, no key paths."""
    raw = cfg.to_dict()
    raw["serve"] = {**raw["serve"], "token": "<set>" if token else None,
                    "token_file": "<set>" if cfg.serve.token_file else None,
                    "tls_key": "<set>" if cfg.serve.tls_key else None}
    if port is not None:
        raw["serve"]["port"] = port
    return raw


class InferenceServer:
    """One gRPC server on the current asyncio loop; start(), then stop() (drains first)."""

    def __init__(self, cfg, backend, *, classes: list[str] | None = None, checkpoint_id: str = "",
                 token: str | None = None, prefix_accuracy: PrefixAccuracy | None = None):
        """token: the bearer token calls must send; None reads serve.token_file, else the environment
        variable LAYERPAR_SERVE_TOKEN (neither: no token). prefix_accuracy: each prefix's accuracy from
        the checkpoint's run (serve/prefixes.py): shown in ModelInfo, and the latency target's floor
        under serve.min_prefix_accuracy (ValueError when no prefix meets it)."""
        self.cfg, self.backend = cfg, backend
        s = cfg.serve
        self.token = token if token is not None else resolve_token(cfg.serve.token_file)
        self.spec = InputSpec.from_config(cfg)
        self.metrics = ServerMetrics(max_batch=cfg.serve.max_batch)
        self.runner = BackendRunner(backend, retries=cfg.serve.retries,
                                    on_error=self.metrics.backend_errors.inc)
        self.info = dict(backend.info())
        self.classes = classes or [str(i) for i in range(cfg.model.num_classes)]
        self.checkpoint_id = checkpoint_id
        self.workers = int(self.info.get("workers", 0))
        self.address = self.metrics_url = self.port = None
        self.batcher: Batcher | None = None
        self.planner = None
        self.prefix_accuracy = prefix_accuracy
        self.floor = prefix_floor(cfg, prefix_accuracy)
        if s.latency_slo_ms > 0 and self.spec.prefix_models:
            self.planner = LatencyPlanner(slo_ms=s.latency_slo_ms, num_branches=self.spec.num_branches,
                                          work=getattr(backend, "prefix_work", None),
                                          min_branches=self.floor.k)
        self._draining = False
        self.serving = False  # what health says (SERVING), for the Open Inference Protocol's ready calls
        self.http = self.http_port = self.http_url = None  # the OIP's REST front end (serve.http_port)
        self._engine_failed = False
        self._inflight = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        """Bind, start serving, return "host:port"."""
        from layerpar.serve.generate_refusal import not_an_lm_handler
        s = self.cfg.serve
        self.batcher = Batcher(self._compute, max_batch=s.max_batch, max_wait_ms=s.max_wait_ms,
                               max_queue=s.max_queue, slots=int(getattr(self.backend, "concurrency", 1)),
                               planner=self.planner, on_batch=self.metrics.batch,
                               on_expired=self.metrics.expired.inc)
        self.metrics.track_queue(self.batcher.depth)
        self._bridge = LoopBridge(asyncio.get_running_loop())  # answers reach this loop in bursts
        count = self.metrics.request
        interceptors = [TokenAuth(self.token, on_refused=lambda m: count(method_label(m), "UNAUTHENTICATED"),
                                  health_auth=s.health_auth)] if self.token else []
        interceptors.append(DecodeGuard(on_invalid=lambda m: count(method_label(m), "INVALID_ARGUMENT")))
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a taken port is an error, not a silently shared one
        ])
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            # Predict takes raw bytes so that a garbage message is INVALID_ARGUMENT, not INTERNAL.
            "Predict": grpc.unary_unary_rpc_method_handler(
                self.predict, response_serializer=pb.PredictResponse.SerializeToString),
            "ModelInfo": grpc.unary_unary_rpc_method_handler(
                self.model_info, request_deserializer=pb.ModelInfoRequest.FromString,
                response_serializer=pb.ModelInfoResponse.SerializeToString),
            "Generate": not_an_lm_handler(count),  # FAILED_PRECONDITION: generate_rpc.py serves LMs
        }), oip_grpc.handlers(self)))  # the Open Inference Protocol on the same port
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE, oip_pb.SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server, pool=oip_pb.ReflectionPool())
        await self._set_health(False)  # NOT_SERVING until the first probe says the workers are up
        host = f"[{s.host}]" if ":" in s.host else s.host
        target = f"{host}:{s.port}"
        if s.tls_cert:
            port = self.server.add_secure_port(target, server_credentials(s.tls_cert, s.tls_key))
        else:
            port = self.server.add_insecure_port(target)
        await self.server.start()
        self.address, self.port = f"{host}:{port}", port
        if s.metrics_port >= 0:
            mport = self.metrics.start_http(s.metrics_host, s.metrics_port)
            mhost = f"[{s.metrics_host}]" if ":" in s.metrics_host else s.metrics_host
            self.metrics_url = f"http://{mhost}:{mport}/metrics"
        if s.http_port >= 0:
            from layerpar.serve.http_oip import HttpFrontEnd

            self.http = HttpFrontEnd(self, token=self.token)
            self.http_port = await self.http.start(s.host, s.http_port, cert=s.tls_cert, key=s.tls_key)
            self.http_url = f"{'https' if s.tls_cert else 'http'}://{host}:{self.http_port}"
        await self._check_health()
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        return self.address

    async def begin_drain(self) -> None:
        """Health NOT_SERVING from now on; new Predict calls get UNAVAILABLE; queued ones still run."""
        self._draining = True
        self.serving = False
        self.metrics.serving.set(0)
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_s: float | None = None) -> bool:
        """Drain, wait for in-flight requests (at most grace_s), stop. True if none was cut off."""
        loop = asyncio.get_running_loop()
        grace = self.cfg.serve.drain_timeout_s if grace_s is None else grace_s
        end = loop.time() + grace
        if not self._draining:
            await self.begin_drain()
        while (self._inflight or self.batcher.depth()) and loop.time() < end:
            await asyncio.sleep(0.005)
        finished = self._inflight == 0
        # Keep answering UNAVAILABLE (retryable) a moment longer: a call that reaches a stopping gRPC
        # server is CANCELLED instead, which clients do not retry.
        await asyncio.sleep(min(DRAIN_LINGER_S, max(0.0, end - loop.time())))
        self._health_task.cancel()
        # Only long-lived streams (health Watch) can be left; give them a moment, not the whole grace.
        await self.server.stop(min(0.2, max(0.0, end - loop.time())))
        if self.http is not None:
            await self.http.stop()
        await loop.run_in_executor(None, self.batcher.close, max(1.0, end - loop.time()))
        self.metrics.stop_http()
        return finished

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()

    # ------------------------------------------------------------------ health

    async def _set_health(self, serving: bool) -> None:
        if self._draining:
            return
        for name in ("", SERVICE):
            await self.health.set(name, SERVING if serving else NOT_SERVING)
        self.serving = serving
        self.metrics.serving.set(1 if serving else 0)

    async def _check_health(self) -> None:
        interval = self.cfg.serve.health_interval_s
        bound = max(5.0, 5 * interval)
        try:
            # the backend's own bound (per replica group) ends well inside the probe's
            h = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                None, probe, self.backend, self.workers, PROBE_SHARE * bound), timeout=bound)
        except TimeoutError:
            log.warning("health probe failed: the backend's health check did not answer within %.1fs "
                        "(a worker stopped or hung?)", bound)
            h = {"ready": False, "workers": self.workers, "workers_alive": 0}
        except Exception as exc:  # noqa: BLE001 - a probe that fails means not serving, not a crash
            log.warning("health probe failed: %s: %s", type(exc).__name__, exc)
            h = {"ready": False, "workers": self.workers, "workers_alive": 0}
        ready, workers, alive = h["ready"], h["workers"], h["workers_alive"]
        self.metrics.workers.set(workers)
        self.metrics.workers_alive.set(alive)
        self.metrics.placement_fallbacks.set(int(h.get("placement_fallbacks", 0)))
        for i, whole in enumerate(h.get("replica_ready", ())):
            self.metrics.replica_ready.labels(replica=str(i)).set(1 if whole else 0)
        if "replicas" in h:  # replica groups: serving while one group is whole
            enough = h["replicas_ready"] >= 1
        else:
            enough = workers == 0 or alive >= math.ceil(workers * self.cfg.serve.min_live_fraction - 1e-9)
        if ready and enough and self._engine_failed and not self._draining:
            await self._probe_engine(timeout_s=max(5.0, 5 * interval))
        await self._set_health(ready and enough and not self._engine_failed)

    async def _probe_engine(self, timeout_s: float) -> None:
        """After a failed engine call, one 1-row request through the batcher (the engine's only caller)
        tells whether the engine answers again, even when no client sends traffic."""
        x = np.zeros((1, *self.spec.input_shape), np.float32)
        try:
            await asyncio.wait_for(asyncio.wrap_future(
                self.batcher.submit(x, None, time.monotonic() + timeout_s)), timeout_s)
        except Exception as exc:  # noqa: BLE001 - still failing: stay NOT_SERVING
            log.warning("engine probe failed: %s: %s", type(exc).__name__, exc)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.serve.health_interval_s)
            await self._check_health()

    # ------------------------------------------------------------------ Inference service

    def _compute(self, x, num_branches):
        """Runs on the batcher thread: one engine call for a merged batch."""
        try:
            logits, meta = self.runner(x, num_branches)
        except InputOverflow:
            raise  # the input's fault: the engine is fine
        except BaseException:
            self._engine_failed = True  # health says NOT_SERVING until an engine call succeeds again
            raise
        self._engine_failed = False
        self.metrics.phases(meta["timings"])  # once per engine call, not once per request
        if "replica" in meta:
            self.metrics.replica_batches.labels(replica=str(meta["replica"])).inc()
        return logits, meta

    async def predict(self, raw: bytes, context) -> pb.PredictResponse:
        self._inflight += 1
        start = time.monotonic()
        try:
            result = await self._predict(raw, context)
        except asyncio.CancelledError:  # the caller left or its deadline passed mid-call
            remaining = context.time_remaining()
            gone = remaining is not None and remaining <= 0
            self.metrics.request("Predict", "DEADLINE_EXCEEDED" if gone else "CANCELLED")
            raise
        finally:
            self._inflight -= 1
        if isinstance(result, pb.PredictResponse):
            self.metrics.request("Predict", "OK")
            self.metrics.phase.labels(phase="total").observe(time.monotonic() - start)
            return result
        code, message = result
        self.metrics.request("Predict", code.name)
        await context.abort(code, message)

    async def _predict(self, raw: bytes, context) -> pb.PredictResponse | tuple[Code, str]:
        t0 = time.perf_counter()
        if self._draining:
            return Code.UNAVAILABLE, DRAINING
        try:
            d = decode_request(parse_request(raw), self.spec)
        except BadRequest as exc:
            return Code.INVALID_ARGUMENT, str(exc)
        out = await self.answer(d, context.time_remaining(), t0)
        if not isinstance(out, Answer):
            return out
        return encode_response(out.logits, d, num_branches=out.num_branches, degraded=out.degraded,
                               branches_used=out.branches_used, timings_ms=out.timings_ms,
                               batch_rows=out.batch_rows)

    async def answer(self, d, remaining_s: float | None, t0: float) -> Answer | tuple[Code, str]:
        """A decoded request through the batcher and the engine: its Answer, or (status, one sentence).
        Every protocol's calls come here (layerpar.v1 Predict, the Open Inference Protocol's
        ModelInfer over gRPC and HTTP). remaining_s: the caller's deadline; t0: perf_counter at arrival."""
        if self._draining:
            return Code.UNAVAILABLE, DRAINING
        self._inflight += 1
        try:
            return await self._answer(d, remaining_s, t0)
        finally:
            self._inflight -= 1

    async def _answer(self, d, remaining: float | None, t0: float) -> Answer | tuple[Code, str]:
        deadline = time.monotonic() + remaining if remaining is not None and remaining < 1e8 else None
        try:
            future = self.batcher.submit(d.x, d.num_branches, deadline, min_branches=d.min_branches)
        except QueueFull as exc:
            return Code.RESOURCE_EXHAUSTED, str(exc)
        except Draining as exc:
            return Code.UNAVAILABLE, str(exc)
        try:
            out = await self._bridge.wrap(future)
        except DeadlineExpired as exc:
            return Code.DEADLINE_EXCEEDED, str(exc)
        except BackendUnavailable as exc:
            return Code.UNAVAILABLE, str(exc)
        except InputOverflow as exc:
            return Code.INVALID_ARGUMENT, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad engine call must not take the server down
            log.exception("engine call failed")
            return Code.INTERNAL, f"the engine failed: {type(exc).__name__}: {exc}"
        # this request's rows only: its batch-mates are judged alone (numpy first: no torch per request)
        bad = [] if np.isfinite(out.logits).all() else nonfinite_rows(out.logits)
        if bad:
            return Code.INVALID_ARGUMENT, overflow_message(bad, d.rows)
        meta = out.meta
        k = out.num_branches or self.spec.num_branches
        degraded = bool(meta.get("degraded", False))
        used = [int(b) for b in meta.get("branches_used") or range(k)]
        if degraded:
            self.metrics.degraded.inc()
        if d.num_branches is None and k < self.spec.num_branches:
            self.metrics.slo_prefix.inc()  # the latency target chose a prefix
        self.metrics.branches_used.observe(len(used))
        self.metrics.rows.inc(d.rows)
        self.metrics.phase.labels(phase="queue").observe(out.queue_s)
        timings = {"queue": out.queue_s * 1e3, **{p: s * 1e3 for p, s in meta["timings"].items()}}
        timings["total"] = (time.perf_counter() - t0) * 1e3
        if self.planner is not None:  # the server's own time around the queue and the engine call
            self.planner.observe_overhead(timings["total"] / 1e3 - out.queue_s - meta["timings"]["backend"])
        return Answer(out.logits, num_branches=len(used) if degraded else k, degraded=degraded,
                      branches_used=used, timings_ms=timings, batch_rows=out.batch_rows)

    async def model_info(self, request, context) -> pb.ModelInfoResponse:
        m, s = self.cfg.model, self.cfg.serve
        self.metrics.request("ModelInfo", "OK")
        return pb.ModelInfoResponse(
            model_kind=m.kind, classes=self.classes, input_shape=list(self.spec.input_shape),
            input_dtype="float32", num_classes=m.num_classes, num_branches=m.num_branches,
            workers=self.workers, transport=str(self.info.get("transport", "local")),
            params=int(self.info.get("params", 0)), checkpoint_id=self.checkpoint_id,
            config_json=json.dumps(redacted_config(self.cfg, self.port, token=bool(self.token))),
            max_request_rows=s.max_request_rows, max_batch=s.max_batch, degraded_policy=s.degraded,
            replicas=int(self.info.get("replicas", 1)),
            workers_per_replica=int(self.info.get("workers_per_replica", self.workers)),
            prefix_accuracy=self.prefix_accuracy.accuracy if self.prefix_accuracy else [],
            min_branches=self.floor.k if self.planner is not None else self.spec.num_branches)


class ServerThread:
    """An InferenceServer on its own event loop in a background thread (tests, benchmarks, notebooks).

        with ServerThread(cfg, backend) as srv:
            Client(srv.address).predict(x)
    """

    def __init__(self, cfg, backend, **kwargs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="layerpar-grpc", daemon=True)
        self._thread.start()
        self.server = self._call(self._make(cfg, backend, kwargs))

    async def _make(self, cfg, backend, kwargs) -> InferenceServer:
        return InferenceServer(cfg, backend, **kwargs)

    def _call(self, coro, timeout_s: float | None = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def start(self) -> ServerThread:
        self.address = self._call(self.server.start())
        self.metrics_url = self.server.metrics_url
        return self

    def begin_drain(self) -> None:
        self._call(self.server.begin_drain())

    def stop(self, grace_s: float | None = 5.0) -> bool:
        try:
            return self._call(self.server.stop(grace_s), None)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
