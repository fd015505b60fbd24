"""Distributed decoding of the causal LM (layerpar/runtime/lm_decode.py) on a real local Ray: W
decoding actors fed over the same-node fast path equal one-process decoding."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from layerpar.config import ParallelConfig
from layerpar.model.lm import LMConfig, ParaFormerLM, SerialLM, generate
from layerpar.model.lm_cache import CacheError
from layerpar.runtime import lm_decode
from layerpar.runtime.decoder import Decoder
from layerpar.runtime.errors import WorkerError
from layerpar.runtime.lm_decode import DistributedDecoder, PipelinedDecoder

pytestmark = pytest.mark.ray
PROMPTS = [[3, 14, 15, 9, 2], [6, 5], [35, 8, 9, 7, 9, 3, 2]]  # different lengths: chunked prefill
NEW = 8


def lm_cfg(dtype: str, **kw) -> LMConfig:
    base = dict(vocab=50, dim=16, heads=2, mlp_dim=32, num_branches=3, branch_depth=2, context=24,
                dtype=dtype)
    return LMConfig(**{**base, **kw})


def parallel(w: int) -> ParallelConfig:
    return ParallelConfig(workers=w, cpus_per_worker=0.5, heartbeat_s=1.5, call_timeout_s=30.0)


def greedy(decoder, prompts, new: int, k: int | None = None, logits_out: list | None = None):
    """Greedy decoding through a Decoder (prefill every prompt at once, then batched steps)."""
    slots = [decoder.allocate() for _ in prompts]
    try:
        logits = decoder.prefill(slots, prompts, num_branches=k)
        out = [[] for _ in prompts]
        for i in range(new):
            if logits_out is not None:
                logits_out.append(logits)
            nxt = logits.argmax(dim=-1).tolist()
            for row, t in zip(out, nxt, strict=True):
                row.append(t)
            if i + 1 < new:
                logits = decoder.step(slots, nxt, num_branches=k)
        return out
    finally:
        for s in slots:
            decoder.free(s)


def reference_logits(model, prompts, tokens, k=None):
    """One-process cached decoding fed the same tokens: the (B, V) logits of every step."""
    cache = model.new_cache(len(prompts))
    slots = [cache.allocate() for _ in prompts]
    rows = [model.step(torch.tensor([p]), cache, [s], num_branches=k)[0, -1]
            for s, p in zip(slots, prompts, strict=True)]
    out = [torch.stack(rows)]
    for i in range(len(tokens[0]) - 1):
        step = torch.tensor([[t[i]] for t in tokens])
        out.append(model.step(step, cache, slots, num_branches=k)[:, -1])
    return out


@pytest.fixture(scope="module", params=["float64", "float32"])
def models(request):
    return ParaFormerLM(lm_cfg(request.param), seed=7).eval()


@pytest.mark.parametrize("w", [1, 2, 3])
def test_distributed_greedy_equals_one_process(local_ray, models, w):
    model = models
    decoder = DistributedDecoder(model, slots=4, parallel=parallel(w))
    try:
        decoder.exact_logits = True
        want = generate(model, PROMPTS, NEW)
        got_logits: list = []
        assert greedy(decoder, PROMPTS, NEW, logits_out=got_logits) == want
        if model.cfg.dtype == "float64":  # the algebra: the same logits, step by step
            for got, ref in zip(got_logits, reference_logits(model, PROMPTS, want), strict=True):
                assert (got - ref).abs().max().item() < 1e-10
        for k in range(1, 4):  # every prefix of branches is the k-branch model
            assert greedy(decoder, PROMPTS[:2], 5, k=k) == generate(model, PROMPTS[:2], 5, num_branches=k)
        assert decoder.num_used() == 0
        assert decoder.worker_slots_used() == [0] * w  # every worker mirrored every free
    finally:
        decoder.close()


def test_group_reduce_slots_and_bad_input(local_ray):
    """reduce: group (a gloo group here, NCCL on GPUs): worker 0 applies the head; slot accounting
    and the cache rules hold on the driver before anything reaches a worker."""
    model = ParaFormerLM(lm_cfg("float64"), seed=3).eval()
    decoder = DistributedDecoder(model, slots=2, parallel=parallel(2), reduce="group")
    try:
        assert isinstance(decoder, Decoder)  # the seam the generation server builds on
        decoder.exact_logits = True
        got: list = []
        tokens = greedy(decoder, PROMPTS[:2], 6, logits_out=got)
        assert tokens == generate(model, PROMPTS[:2], 6)
        for g, ref in zip(got, reference_logits(model, PROMPTS[:2], tokens), strict=True):
            assert (g - ref).abs().max().item() < 1e-10
        a, b = decoder.allocate(), decoder.allocate()
        with pytest.raises(CacheError, match="no free cache slot"):
            decoder.allocate()
        assert decoder.worker_slots_used() == [2, 2] and decoder.num_used() == 2
        decoder.prefill([a], [[1, 2, 3]], num_branches=1)
        with pytest.raises(CacheError, match="cannot continue with 3"):
            decoder.step([a], [4])  # a sequence keeps its k
        with pytest.raises(CacheError, match="context"):
            decoder.prefill([b], [list(range(25))])
        with pytest.raises(CacheError, match="vocabulary"):
            decoder.prefill([b], [[50]])
        with pytest.raises(CacheError, match="not allocated"):
            decoder.step([7], [1])
        decoder.free(a)
        decoder.free(a)  # idempotent
        decoder.free(b)
        assert decoder.num_used() == 0 and decoder.worker_slots_used() == [0, 0]
        assert greedy(decoder, PROMPTS[2:], 3) == generate(model, PROMPTS[2:], 3)  # still usable
    finally:
        decoder.close()


def test_pipelined_serial_gpt_equals_one_process(local_ray, monkeypatch):
    model = SerialLM(lm_cfg("float64", num_branches=2), seed=5).eval()
    decoder = PipelinedDecoder(model, slots=3, parallel=parallel(3))  # 4 blocks on 3 stages
    # a request may carry the hidden state of 3 positions of one row: prompts go through in pieces
    monkeypatch.setattr(lm_decode, "MAX_REQUEST_BYTES", 4 * 3 * 16 * 8)
    passes, through = [], decoder._through_stages
    monkeypatch.setattr(decoder, "_through_stages", lambda c, o: passes.append(1) or through(c, o))
    try:
        decoder.exact_logits = True
        got: list = []
        tokens = greedy(decoder, PROMPTS, NEW, logits_out=got)
        assert tokens == generate(model, PROMPTS, NEW)
        for g, ref in zip(got, reference_logits(model, PROMPTS, tokens), strict=True):
            assert (g - ref).abs().max().item() < 1e-10
        assert len(passes) == (2 + 1 + 3) + (NEW - 1)  # prompts of 5, 2, 7 in pieces of 3; steps
    finally:
        decoder.close()


def test_sigkill_mid_generation_raises_worker_error(local_ray):
    model = ParaFormerLM(lm_cfg("float32"), seed=1).eval()
    decoder = DistributedDecoder(model, slots=2, parallel=parallel(2))
    try:
        slot = decoder.allocate()
        logits = decoder.prefill([slot], [[1, 2, 3]])
        decoder.step([slot], [int(logits.argmax())])
        os.kill(decoder.worker_pids()[1], signal.SIGKILL)  # the worker process this test started
        start = time.monotonic()
        with pytest.raises(WorkerError):
            for t in range(10):  # the step in flight, or the next, notices
                decoder.step([slot], [t])
        assert time.monotonic() - start < 30  # the heartbeat bound (1.5 s) with a wide margin: no hang
        with pytest.raises(WorkerError, match="lost a worker"):
            decoder.step([slot], [1])
        decoder.free(slot)  # callers can still release their slots
        assert decoder.num_used() == 0
    finally:
        decoder.close()
