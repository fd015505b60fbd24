"""The Decoder protocol's one-process implementation and the continuous-batching scheduler over it:
real tiny causal LMs, no mocks (serve/generation.py, runtime/decoder.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from layerpar.model.lm import LMConfig, ParaFormerLM, SerialLM, generate
from layerpar.model.lm_cache import CacheError
from layerpar.runtime.decoder import Decoder, LocalDecoder
from layerpar.serve.generation import Finished, GenerationError, QueueFull, Sampling, Scheduler, Token

CFG = LMConfig(dim=32, heads=2, mlp_dim=64, num_branches=3, branch_depth=1, context=24)
PROMPTS = [[1, 2, 3], [7, 8], [9, 10, 11, 12, 13], [4]]
HANG_S = 60.0


def piece(t: int) -> bytes:
    return bytes([t]) if t < 256 else b""


@pytest.fixture(scope="module")
def model():
    return ParaFormerLM(CFG, seed=0)


def greedy(decoder, prompt, n, k=None):
    s = decoder.allocate()
    try:
        out = [int(decoder.prefill([s], [prompt], k)[0].argmax())]
        while len(out) < n:
            out.append(int(decoder.step([s], [out[-1]], k)[0].argmax()))
        return out
    finally:
        decoder.free(s)


@pytest.mark.parametrize("k", [None, 1, 2])
def test_local_decoder_greedy_equals_generate(model, k):
    dec = LocalDecoder(model, slots=2)
    assert isinstance(dec, Decoder)
    ref = generate(model, PROMPTS, 8, num_branches=k)
    assert [greedy(dec, p, 8, k) for p in PROMPTS] == ref
    assert dec.num_used() == 0


def test_local_decoder_batched_step_and_slots(model):
    dec = LocalDecoder(model, slots=2)
    a, b = dec.allocate(), dec.allocate()
    with pytest.raises(CacheError):
        dec.allocate()
    logits = dec.prefill([a, b], PROMPTS[:2])
    assert logits.shape == (2, CFG.vocab) and logits.dtype == torch.float32
    nxt = logits.argmax(-1).tolist()
    out = dec.step([a, b], nxt)
    ref = generate(model, PROMPTS[:2], 2)
    assert out.argmax(-1).tolist() == [r[1] for r in ref]
    dec.free(a)
    dec.free(a)  # idempotent
    assert dec.num_used() == 1
    dec.close()
    assert dec.num_used() == 0


def test_serial_lm_decoder(model):
    serial = SerialLM(CFG, seed=1)
    dec = LocalDecoder(serial, slots=1)
    assert dec.num_branches == 1
    assert greedy(dec, PROMPTS[0], 5) == generate(serial, PROMPTS[:1], 5)[0]


def wait_until(cond, timeout_s=HANG_S):
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def run_all(sched, requests):
    gens = [sched.submit(p, s) for p, s in requests]
    return [g.wait(HANG_S) for g in gens]


def test_continuous_batching_greedy_matches_and_frees_slots(model):
    dec = LocalDecoder(model, slots=2)  # 4 requests through 2 slots: the queue must drain
    sched = Scheduler(dec, piece=piece)
    try:
        lens = [3, 9, 5, 7]
        results = run_all(sched, [(p, Sampling(max_tokens=n)) for p, n in zip(PROMPTS, lens, strict=True)])
        for r, p, n in zip(results, PROMPTS, lens, strict=True):
            assert r.reason == "length" and r.code == "OK"
            assert r.tokens == generate(model, [p], n)[0]
            assert r.completion_tokens == n and r.prompt_tokens == len(p) and r.branches == 3
            assert len(r.token_ms) == n
        assert dec.num_used() == 0
    finally:
        sched.close()


def test_sampling_seeded_reproducible_and_topk(model):
    dec = LocalDecoder(model, slots=4)
    sched = Scheduler(dec, piece=piece)
    try:
        s = Sampling(max_tokens=12, temperature=1.5, top_k=5, seed=123)
        a, b = run_all(sched, [(PROMPTS[0], s), (PROMPTS[0], s)])
        assert a.tokens == b.tokens and a.seed == 123
        c = run_all(sched, [(PROMPTS[0], Sampling(max_tokens=12, temperature=1.5, top_k=5, seed=7))])[0]
        assert c.tokens != a.tokens  # 12 draws from 5 candidates: equal by chance ~never
        # top_k=1 is greedy whatever the temperature
        one = run_all(sched, [(PROMPTS[1], Sampling(max_tokens=6, temperature=5.0, top_k=1, seed=3))])[0]
        assert one.tokens == generate(model, [PROMPTS[1]], 6)[0]
        unseeded = run_all(sched, [(PROMPTS[1], Sampling(max_tokens=2, temperature=1.0))])[0]
        assert isinstance(unseeded.seed, int)
    finally:
        sched.close()


def test_stop_sequence_and_context(model):
    dec = LocalDecoder(model, slots=2)
    sched = Scheduler(dec, piece=piece)
    try:
        free_run = run_all(sched, [(PROMPTS[0], Sampling(max_tokens=6))])[0]
        stop = free_run.text[2:4]
        r = run_all(sched, [(PROMPTS[0], Sampling(max_tokens=6, stop=(stop,)))])[0]
        assert r.reason == "stop" and r.stop_sequence == stop
        assert r.text == free_run.text[:free_run.text.find(stop)]
        # prompt of context - 2 tokens: 3 tokens fit (the last needs no cache position)
        long = list(range(1, CFG.context - 1))
        r = run_all(sched, [(long, Sampling(max_tokens=50))])[0]
        assert r.reason == "context" and r.completion_tokens == 3
        full = run_all(sched, [(list(range(1, CFG.context + 1)), Sampling(max_tokens=5))])[0]
        assert full.reason == "context" and full.completion_tokens == 1
        assert dec.num_used() == 0
    finally:
        sched.close()


@pytest.mark.parametrize("prompt, sampling, words", [
    ([], Sampling(max_tokens=3), "empty"),
    (list(range(CFG.context + 1)), Sampling(max_tokens=3), "context"),
    ([1], Sampling(max_tokens=0), "at least 1"),
    ([1], Sampling(max_tokens=10 ** 9), "more than this server allows"),
    ([1], Sampling(max_tokens=3, temperature=-1.0), "temperature"),
    ([1], Sampling(max_tokens=3, top_k=10 ** 6), "top_k"),
    ([1], Sampling(max_tokens=3, num_branches=4), "num_branches"),
    ([1], Sampling(max_tokens=3, stop=(b"",)), "stop"),
])
def test_bad_requests_refused(model, prompt, sampling, words):
    dec = LocalDecoder(model, slots=1)
    sched = Scheduler(dec, piece=piece, max_tokens=100)
    try:
        with pytest.raises(GenerationError, match=words):
            sched.submit(prompt, sampling)
        assert dec.num_used() == 0 and sched.depth() == 0
    finally:
        sched.close()


def test_cancel_mid_generation_frees_slot_and_queue_full(model):
    dec = LocalDecoder(model, slots=1)
    sched = Scheduler(dec, piece=piece, max_queue=1, max_tokens=10 ** 6)
    try:
        events, holder = [], []

        def on_event(e):  # runs on the scheduler thread: the cancel lands before the next step
            events.append(e)
            if isinstance(e, Token) and e.index == 2:
                holder[0].cancel()

        gate = threading.Lock()
        with gate:
            g = sched.submit([1], Sampling(max_tokens=CFG.context), on_event=lambda e: (gate.acquire(),
                                                                                       gate.release(),
                                                                                       on_event(e)))
            holder.append(g)
            wait_until(lambda: sched.live() == 1)  # admitted; the scheduler now waits on the gate
            queued = sched.submit([2], Sampling(max_tokens=2))
            with pytest.raises(QueueFull):
                sched.submit([3], Sampling(max_tokens=2))
        r = g.wait(HANG_S)
        assert r.reason == "cancelled" and r.code == "CANCELLED" and r.completion_tokens == 3
        assert queued.wait(HANG_S).reason == "length"
        assert isinstance(events[-1], Finished)
        assert dec.num_used() == 0
    finally:
        sched.close()


def test_per_token_deadline_answers_with_prefix(model):
    dec = LocalDecoder(model, slots=2)
    sched = Scheduler(dec, piece=piece, token_deadline_ms=1e-6)  # no step can meet it
    try:
        warm = run_all(sched, [(PROMPTS[0], Sampling(max_tokens=12))])[0]
        assert warm.branches == 3  # the planner knows nothing yet: the full model
        fast = run_all(sched, [(PROMPTS[1], Sampling(max_tokens=4))])[0]
        assert fast.branches == 1 and fast.tokens == generate(model, [PROMPTS[1]], 4, num_branches=1)[0]
        floor = run_all(sched, [(PROMPTS[1], Sampling(max_tokens=2, min_branches=2))])[0]
        assert floor.branches == 2
        relaxed = run_all(sched, [(PROMPTS[1], Sampling(max_tokens=2, token_deadline_ms=1e6))])[0]
        assert relaxed.branches == 3
    finally:
        sched.close()


class LosesAWorker(LocalDecoder):
    """A LocalDecoder whose `fail_at`-th decode step raises WorkerError, as a decoder does when a
    worker dies (the distributed one: tests/serve/test_generate.py SIGKILLs a real worker)."""

    def __init__(self, model, slots, fail_at):
        super().__init__(model, slots)
        self.fail_at, self.steps = fail_at, 0

    def step(self, slots, tokens, num_branches=None):
        from layerpar.runtime.errors import WorkerError

        self.steps += 1
        if self.steps == self.fail_at:
            raise WorkerError("worker 1 died")
        return super().step(slots, tokens, num_branches)


@pytest.mark.parametrize("resume", [False, True])
def test_lost_worker_ends_or_resumes_exactly(model, resume):
    built = []

    def rebuild():
        built.append(LocalDecoder(model, 2))
        return built[-1]

    first = LosesAWorker(model, 2, fail_at=4)
    sched = Scheduler(first, piece=piece, rebuild=rebuild, resume=resume)
    try:
        s = Sampling(max_tokens=10, temperature=0.9, top_k=20, seed=9)
        a, b = run_all(sched, [(PROMPTS[0], s), (PROMPTS[2], Sampling(max_tokens=10))])
        ref = run_all(Scheduler(LocalDecoder(model, 2), piece=piece), [(PROMPTS[0], s)])[0]
        wait_until(lambda: sched.rebuilds == 1)  # at once, not when the next request comes
        assert first.num_used() == 0 and built[0].num_used() == 0
        if resume:  # both continue on the rebuilt decoder: exactly the tokens of an unbroken run
            assert a.code == b.code == "OK" and a.degraded and a.recoveries == 1
            assert a.tokens == ref.tokens and b.tokens == generate(model, [PROMPTS[2]], 10)[0]
        else:
            assert a.code == b.code == "UNAVAILABLE" and a.reason == "error" and "worker 1 died" in a.message
            assert a.tokens == ref.tokens[:len(a.tokens)]
            again = run_all(sched, [(PROMPTS[1], Sampling(max_tokens=3))])[0]  # served by the new decoder
            assert again.code == "OK" and not again.degraded
    finally:
        sched.close()
