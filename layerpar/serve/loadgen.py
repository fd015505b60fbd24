"""Load generators of the serving benchmark.

- run_load: C concurrent closed-loop clients, a fixed request count. Each client sends its next request
  as soon as its previous answer arrives.
- run_open_loop: requests sent at a fixed rate whatever the answers do (an offered load, which a
  closed loop cannot exceed the server's capacity with), consecutive rows of a pool each.
- run_oip_load / run_http_load: run_load's closed loop over the Open Inference Protocol (tritonclient's
  gRPC client: layerpar and Triton) and over plain HTTP POSTs (Ray Serve); the peer benchmark's clients.

Latency is measured per request on the client (send -> answer); throughput is answered requests over
the wall time of the run. `record=True` keeps every request's send time (time.monotonic) and latency.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from layerpar.serve import layerpar_v1_pb2 as pb
from layerpar.serve import layerpar_v1_pb2_grpc as pb_grpc
from layerpar.serve.client import auth_metadata, channel_options, make_request


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1e3
    if not len(ms):
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3), "p99_ms": round(float(p99), 3),
            "mean_ms": round(float(ms.mean()), 3)}


async def _load(address: str, request: pb.PredictRequest, *, concurrency: int, requests: int,
                token: str | None, timeout_s: float, record: bool = False) -> dict:
    channels = [grpc.aio.insecure_channel(address, options=channel_options()) for _ in range(concurrency)]
    stubs = [pb_grpc.InferenceStub(c) for c in channels]
    metadata = auth_metadata(token)
    latencies: list[float] = []
    sent: list[float] = []
    errors: dict[str, int] = {}
    left = requests

    async def client(stub) -> None:
        nonlocal left
        while left > 0:
            left -= 1  # one event loop: no lock needed
            t0 = time.perf_counter()
            start = time.monotonic()
            try:
                await stub.Predict(request, timeout=timeout_s, metadata=metadata)
                latencies.append(time.perf_counter() - t0)
                sent.append(start)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(s) for s in stubs))
    wall = time.perf_counter() - t0
    for c in channels:
        await c.close()
    out = {"concurrency": concurrency, "requests": requests, "ok": len(latencies), "errors": errors,
           "seconds": round(wall, 3), "throughput_rps": round(len(latencies) / wall, 1),
           **percentiles(latencies)}
    if record:
        out["samples"] = list(zip(sent, latencies, strict=True))
    return out


def run_load(address: str, x: np.ndarray, *, concurrency: int, requests: int, token: str | None = None,
             timeout_s: float = 30.0, record: bool = False) -> dict:
    """Send `requests` copies of x from `concurrency` clients; throughput and latency percentiles
    (record: also "samples", every answered request's (send time, latency seconds))."""
    return asyncio.run(_load(address, make_request(x), concurrency=concurrency, requests=requests,
                             token=token, timeout_s=timeout_s, record=record))


async def _open_loop(address: str, xs: np.ndarray, *, rate: float, requests: int, rows: int,
                     token: str | None, timeout_s: float) -> dict:
    channel = grpc.aio.insecure_channel(address, options=channel_options())
    stub, metadata = pb_grpc.InferenceStub(channel), auth_metadata(token)
    starts = list(range(0, len(xs) - rows + 1, rows))
    reqs = [make_request(xs[j: j + rows]) for j in starts]
    replies: list[tuple] = []  # (first row, latency s, predicted, branches, server-side total ms)
    errors: dict[str, int] = {}

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            r = await stub.Predict(reqs[i % len(reqs)], timeout=timeout_s, metadata=metadata)
            replies.append((starts[i % len(reqs)], time.perf_counter() - t0, list(r.predicted),
                            int(r.num_branches), float(r.timings_ms.get("total", 0.0))))
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    tasks, start = [], time.perf_counter()
    for i in range(requests):  # request i is due at start + i / rate; sent late if the loop is late
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i)))
    sent_s = time.perf_counter() - start
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    await channel.close()
    return {"rate_asked": rate, "rate_offered": round(requests / sent_s, 1), "requests": requests,
            "ok": len(replies), "errors": errors, "seconds": round(wall, 3),
            "throughput_rps": round(len(replies) / wall, 1), **percentiles([r[1] for r in replies]),
            "replies": replies}


def run_open_loop(address: str, xs: np.ndarray, *, rate: float, requests: int, rows: int = 1,
                  token: str | None = None, timeout_s: float = 30.0) -> dict:
    """`requests` requests of `rows` consecutive rows of xs each (cycling through xs) at `rate` per
    second, not waiting for answers; "replies": every answer's (first row, latency seconds, predicted
    classes, branches used, the server's own milliseconds from receiving it to answering)."""
    return asyncio.run(_open_loop(address, xs, rate=rate, requests=requests, rows=rows, token=token,
                                  timeout_s=timeout_s))


async def _closed_loop(calls: list, *, requests: int, failure) -> dict:
    """`len(calls)` closed-loop clients; calls[i]() sends one request of client i (a coroutine that
    raises on failure); failure(exc) names the status of a failed call."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    left = requests

    async def client(call) -> None:
        nonlocal left
        while left > 0:
            left -= 1  # one event loop: no lock needed
            t0 = time.perf_counter()
            try:
                await call()
                latencies.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - a failed request is counted, the load goes on
                name = failure(exc)
                errors[name] = errors.get(name, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in calls))
    wall = time.perf_counter() - t0
    return {"concurrency": len(calls), "requests": requests, "ok": len(latencies), "errors": errors,
            "seconds": round(wall, 3), "throughput_rps": round(len(latencies) / wall, 1),
            **percentiles(latencies)}


async def _oip_load(address: str, x: np.ndarray, *, concurrency: int, requests: int, model: str,
                    timeout_s: float) -> dict:
    import tritonclient.grpc.aio as tca
    from tritonclient.utils import InferenceServerException

    clients = [tca.InferenceServerClient(address) for _ in range(concurrency)]
    tensor = tca.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(x, np.float32))
    want = [tca.InferRequestedOutput("logits")]

    def call(client):
        async def one():
            await client.infer(model, [tensor], outputs=want, client_timeout=timeout_s)
        return one

    def failure(exc) -> str:
        if isinstance(exc, InferenceServerException):
            return str(exc.status() or "ERROR").replace("StatusCode.", "")
        return type(exc).__name__

    try:
        return await _closed_loop([call(c) for c in clients], requests=requests, failure=failure)
    finally:
        for c in clients:
            await c.close()


def run_oip_load(address: str, x: np.ndarray, *, concurrency: int, requests: int, model: str = "layerpar",
                 timeout_s: float = 30.0) -> dict:
    """The Open Inference Protocol over gRPC with the standard client (tritonclient.grpc.aio, one client
    and channel per concurrent caller): `requests` ModelInfer calls of x from `concurrency` closed-loop
    clients, as run_load does for layerpar.v1; works against layerpar and Triton alike."""
    return asyncio.run(_oip_load(address, x, concurrency=concurrency, requests=requests, model=model,
                                 timeout_s=timeout_s))


async def _http_load(url: str, body: bytes, headers: dict, *, concurrency: int, requests: int,
                     timeout_s: float) -> dict:
    import aiohttp

    class HttpStatus(Exception):
        pass

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    sessions = [aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1))
                for _ in range(concurrency)]

    def call(session):
        async def one():
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise HttpStatus(str(r.status))
        return one

    try:
        return await _closed_loop([call(s) for s in sessions], requests=requests,
                                  failure=lambda e: str(e) if isinstance(e, HttpStatus) else type(e).__name__)
    finally:
        for s in sessions:
            await s.close()


def run_http_load(url: str, body: bytes, *, concurrency: int, requests: int, headers: dict | None = None,
                  timeout_s: float = 30.0) -> dict:
    """`requests` POSTs of body to url from `concurrency` closed-loop clients (one keep-alive connection
    each, aiohttp); a reply other than 200 counts as an error named by its status."""
    return asyncio.run(_http_load(url, body, headers or {}, concurrency=concurrency, requests=requests,
                                  timeout_s=timeout_s))


def batch_histogram(metrics_url: str) -> dict[str, float]:
    """Cumulative layerpar_batch_rows buckets {le: count} plus _sum and _count, scraped now."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "layerpar_batch_rows":
            continue
        for s in family.samples:
            if s.name.endswith("_bucket"):
                out[s.labels["le"]] = s.value
            elif s.name.endswith("_sum") or s.name.endswith("_count"):
                out[s.name.rsplit("_", 1)[1]] = s.value
    return out


def histogram_delta(before: dict[str, float], after: dict[str, float]) -> dict:
    """Engine calls per batch-size bucket between two scrapes: {"<=1": n, "<=2": n, ...}, mean rows."""
    les = [k for k in after if k not in ("sum", "count")]
    les.sort(key=lambda k: float("inf") if k == "+Inf" else float(k))
    buckets, prev = {}, 0.0
    for le in les:
        cum = after[le] - before.get(le, 0.0)
        label = f"<={int(float(le))}" if le != "+Inf" else ">max"
        if cum - prev:
            buckets[label] = int(cum - prev)
        prev = cum
    calls = after.get("count", 0) - before.get("count", 0)
    rows = after.get("sum", 0) - before.get("sum", 0)
    return {"engine_calls": int(calls), "mean_batch_rows": round(rows / calls, 2) if calls else None,
            "histogram": buckets}
