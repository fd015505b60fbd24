"""Load generator of the serving benchmark: C concurrent closed-loop clients, a fixed request count.

Each client sends its next request as soon as its previous answer arrives. Latency is measured per
request on the client (send -> answer); throughput is answered requests over the wall time of the run.
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
                token: str | None, timeout_s: float) -> dict:
    channels = [grpc.aio.insecure_channel(address, options=channel_options()) for _ in range(concurrency)]
    stubs = [pb_grpc.InferenceStub(c) for c in channels]
    metadata = auth_metadata(token)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    left = requests

    async def client(stub) -> None:
        nonlocal left
        while left > 0:
            left -= 1  # one event loop: no lock needed
            t0 = time.perf_counter()
            try:
                await stub.Predict(request, timeout=timeout_s, metadata=metadata)
                latencies.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(s) for s in stubs))
    wall = time.perf_counter() - t0
    for c in channels:
        await c.close()
    return {"concurrency": concurrency, "requests": requests, "ok": len(latencies), "errors": errors,
            "seconds": round(wall, 3), "throughput_rps": round(len(latencies) / wall, 1),
            **percentiles(latencies)}


def run_load(address: str, x: np.ndarray, *, concurrency: int, requests: int, token: str | None = None,
             timeout_s: float = 30.0) -> dict:
    """Send `requests` copies of x from `concurrency` clients; throughput and latency percentiles."""
    return asyncio.run(_load(address, make_request(x), concurrency=concurrency, requests=requests,
                             token=token, timeout_s=timeout_s))


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
