"""The causal Para-Former LM (layerpar/model/lm.py, lm_cache.py) and the text data (layerpar/data/text.py)."""

from __future__ import annotations

import pytest
import torch

from layerpar.data.base import DataError
from layerpar.data.text import ByteTokenizer, encode_files, list_text_files, split_files, windows
from layerpar.model.blocks import Block
from layerpar.model.lm import LMConfig, ParaFormerLM, SerialLM, generate
from layerpar.model.lm_cache import CacheError

pytestmark = pytest.mark.unit
TOL = {"float32": 1e-6, "float64": 1e-10}


def cfg(dtype="float64", **kw) -> LMConfig:
    base = dict(vocab=50, dim=16, heads=2, mlp_dim=32, num_branches=3, branch_depth=2, context=24,
                dtype=dtype)
    return LMConfig(**{**base, **kw})


def tokens(b, t, seed=0, vocab=50):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def decode_incrementally(model, toks, prompt, slots=None, **kw):
    """Prefill `prompt` tokens, then one token per step: the concatenated logits (B, T, V)."""
    cache = model.new_cache(toks.shape[0] + 1)
    slots = slots or [cache.allocate() for _ in range(toks.shape[0])]
    outs = [model.step(toks[:, :prompt], cache, slots, **kw)]
    outs += [model.step(toks[:, t:t + 1], cache, slots, **kw) for t in range(prompt, toks.shape[1])]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind, fused", [(ParaFormerLM, True), (ParaFormerLM, False), (SerialLM, True)])
def test_cached_decoding_equals_recompute(dtype, kind, fused):
    model = kind(cfg(dtype), seed=1).eval()
    toks = tokens(3, 14)
    with torch.no_grad():
        full = model(toks, fused=fused)
        inc, cache = decode_incrementally(model, toks, prompt=5, fused=fused)
    assert full.dtype == getattr(torch, dtype) and full.shape == (3, 14, 50)
    assert (full - inc).abs().max() < TOL[dtype]
    assert cache.lengths[:3].tolist() == [14, 14, 14]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_prompts_of_different_lengths_decode_together(dtype):
    model = ParaFormerLM(cfg(dtype), seed=2).eval()
    a, b = tokens(1, 10, seed=3), tokens(1, 6, seed=4)
    nxt = tokens(2, 4, seed=5)
    with torch.no_grad():
        cache = model.new_cache(2)
        sa, sb = cache.allocate(), cache.allocate()
        model.step(a, cache, [sa])
        model.step(b, cache, [sb])
        inc = torch.cat([model.step(nxt[:, t:t + 1], cache, [sa, sb]) for t in range(4)], dim=1)
        full_a = model(torch.cat([a, nxt[:1]], dim=1))[:, 10:]
        full_b = model(torch.cat([b, nxt[1:]], dim=1))[:, 6:]
    assert (inc[0] - full_a[0]).abs().max() < TOL[dtype]
    assert (inc[1] - full_b[0]).abs().max() < TOL[dtype]


def test_fused_cached_stack_equals_loop_over_branches():
    model = ParaFormerLM(cfg("float64", num_branches=4), seed=3).eval()
    toks = tokens(2, 9)
    with torch.no_grad():
        fused, cf = decode_incrementally(model, toks, prompt=4, fused=True)
        loop, cl = decode_incrementally(model, toks, prompt=4, fused=False)
        x0 = model.embed(toks)
        per_branch = model.branch_outputs(x0, fused=True)
        one_by_one = model.branch_outputs(x0, fused=False)
    assert per_branch.shape == (4, 2, 9, 16)
    assert (per_branch - one_by_one).abs().max() < 1e-10
    assert (fused - loop).abs().max() < 1e-10
    assert (cf.k - cl.k).abs().max() < 1e-10 and (cf.v - cl.v).abs().max() < 1e-10


@pytest.mark.parametrize("fused", [True, False])
def test_prefix_decoding_equals_the_k_branch_model(fused):
    big = ParaFormerLM(cfg(num_branches=4), seed=4).eval()
    small = ParaFormerLM(cfg(num_branches=2), seed=4).eval()
    toks = tokens(2, 10)
    with torch.no_grad():
        prefix, _ = decode_incrementally(big, toks, prompt=3, num_branches=2, fused=fused)
        alone, _ = decode_incrementally(small, toks, prompt=3, fused=fused)
        assert (big(toks, num_branches=2) - small(toks)).abs().max() < 1e-10
    assert (prefix - alone).abs().max() < 1e-10
    cache = big.new_cache(1)
    slot = cache.allocate()
    big.step(toks[:1, :3], cache, [slot], num_branches=4)
    big.step(toks[:1, 3:4], cache, [slot], num_branches=2)  # fewer branches: their caches are full
    with pytest.raises(CacheError, match="decoded with 2 branches; it cannot continue with 3"):
        big.step(toks[:1, 4:5], cache, [slot], num_branches=3)
    assert not torch.allclose(big(toks), small(toks))  # the other branches do count
    with pytest.raises(ValueError, match="num_branches must be in 1..4"):
        big(toks, num_branches=5)


@pytest.mark.parametrize("kind", [ParaFormerLM, SerialLM])
def test_causality(kind):
    model = kind(cfg(), seed=5).eval()
    toks = tokens(2, 12)
    changed = toks.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50
    with torch.no_grad():
        a, b = model(toks), model(changed)
    assert (a[:, :7] - b[:, :7]).abs().max() == 0
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-6


def test_serial_baseline_is_made_of_the_same_blocks():
    c = cfg()
    serial, para = SerialLM(c), ParaFormerLM(c)
    assert len(serial.blocks) == c.num_branches * c.branch_depth
    assert all(type(b) is Block for b in serial.blocks)
    assert all(type(b) is Block for br in para.branches for b in br.blocks)
    n_serial = sum(p.numel() for p in serial.parameters())
    assert n_serial == sum(p.numel() for p in para.parameters())  # equal parameters: a fair baseline
    with pytest.raises(ValueError, match="no branches"):
        serial(tokens(1, 4), num_branches=1)


def test_greedy_generation_is_deterministic_and_frees_its_slots():
    model = ParaFormerLM(cfg("float32"), seed=6).eval()
    cache = model.new_cache(4)
    prompts = [[1, 2, 3, 4], [7], [9, 9]]
    first = generate(model, prompts, 6, cache=cache)
    assert cache.num_used == 0 and cache.num_free == 4
    again = generate(ParaFormerLM(cfg("float32"), seed=6).eval(), prompts, 6)
    assert first == again and [len(r) for r in first] == [6, 6, 6]
    with torch.no_grad():  # the first generated token is the argmax after the prompt
        assert first[0][0] == int(model(torch.tensor([prompts[0]]))[0, -1].argmax())
    with pytest.raises(CacheError, match="do not fit the context of 24"):
        generate(model, [[1] * 20], 10, cache=cache)  # runs out of context mid-generation
    assert cache.num_used == 0


def test_cache_slots_allocate_free_count_and_refuse_overflow():
    model = ParaFormerLM(cfg(), seed=7).eval()
    cache = model.new_cache(2)
    assert cache.k.shape == (2, 3, 2, 2, 24, 8)  # (depth, branches, slots, heads, context, head_dim)
    s0, s1 = cache.allocate(), cache.allocate()
    assert (s0, s1, cache.num_used, cache.num_free) == (0, 1, 2, 0)
    with pytest.raises(CacheError, match="no free cache slot: all 2 slots are in use"):
        cache.allocate()
    with torch.no_grad():
        with pytest.raises(CacheError, match="25 new tokens after 0 do not fit the context of 24"):
            model.step(tokens(1, 25), cache, [s0])
        model.step(tokens(1, 20), cache, [s0])
        with pytest.raises(CacheError, match="5 new tokens after 20 do not fit"):
            model.step(tokens(1, 5), cache, [s0])
        with pytest.raises(CacheError, match="does not fit the context of 24"):
            model(tokens(1, 25))
        with pytest.raises(CacheError, match="names a cache slot twice"):
            model.step(tokens(2, 1), cache, [s1, s1])
    assert int(cache.lengths[s0]) == 20 and int(cache.lengths[s1]) == 0  # refused steps change nothing
    cache.free(s0)
    with pytest.raises(CacheError, match="slot 0 is not allocated"):
        cache.free(s0)
    with pytest.raises(CacheError, match="slot 0 is not allocated"):
        model.step(tokens(1, 1), cache, [s0])
    assert cache.allocate() == 0 and int(cache.lengths[0]) == 0 and cache.num_used == 2


@pytest.mark.parametrize("bad, match", [
    (dict(dim=15), "multiple of heads"), (dict(vocab=0), "vocab must be a positive integer"),
    (dict(dtype="float16"), "dtype must be one of"), (dict(positions="rotary"), "positions must be"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        cfg(**bad)


def test_tokenizer_round_trips_arbitrary_bytes():
    tok = ByteTokenizer()
    data = bytes(range(256)) + b"\xff\xfe\xc3(" + "naïve ☃".encode()
    ids = tok.encode(data, bos=True, eos=True)
    assert ids[0] == tok.BOS and ids[-1] == tok.EOS and max(ids) < tok.vocab_size
    assert tok.decode_bytes(ids) == data
    assert tok.decode(tok.encode("naïve ☃")) == "naïve ☃"
    assert tok.decode(tok.encode(b"a\xffb")) == "a\ufffdb"  # invalid UTF-8 -> U+FFFD in str only
    with pytest.raises(DataError, match="outside the byte vocabulary"):
        tok.decode([300])


def test_stdlib_corpus_split_is_deterministic_by_file_and_disjoint():
    files = list_text_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    a, b = split_files(files, seed=0), split_files(list(reversed(files)), seed=0)
    assert a == b
    assert a != split_files(files, seed=1)
    parts = [set(a.train), set(a.val), set(a.test)]
    assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(files)
    assert not any("site-packages" in f.parts for f in files)


def test_text_directory_windows_are_seeded(tmp_path):
    for i in range(4):
        (tmp_path / f"f{i}.txt").write_bytes(bytes([65 + i]) * 50 + b"\xff")
    files = list_text_files(tmp_path)
    stream = encode_files(files)
    assert stream.numel() == 4 * 53 and stream[0] == ByteTokenizer.BOS
    w1 = list(windows(stream, batch=3, context=10, seed=0))
    w2 = list(windows(stream, batch=3, context=10, seed=0))
    w3 = list(windows(stream, batch=3, context=10, seed=0, epoch=1))
    assert len(w1) == 7 and w1[0].shape == (3, 11) and w1[0].dtype == torch.int64
    assert all(torch.equal(x, y) for x, y in zip(w1, w2, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(w1, w3, strict=True))
    all_windows = stream[: 21 * 10 + 1].unfold(0, 11, 10)  # (21, 11): every window at a multiple of T
    seen = torch.cat(w1)  # (21, 11): each exactly once, in a shuffled order
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, all_windows.tolist()))
    assert not torch.equal(seen, all_windows)
    with pytest.raises(DataError, match="fewer than one batch"):
        next(windows(stream, batch=100, context=10))
    (tmp_path / "empty.txt").write_bytes(b"")  # an empty file (the stdlib has many) is BOS, EOS
    assert encode_files([tmp_path / "empty.txt"]).tolist() == [ByteTokenizer.BOS, ByteTokenizer.EOS]
    with pytest.raises(DataError, match="not a directory"):
        list_text_files(tmp_path / "missing")


def test_fused_forward_trains_like_the_loop_and_follows_dtype_changes():
    """Gradients through the fused stack land on each branch's own parameters, as the loop's do;
    converting the model after a no-grad call does not reuse the stale stacked weights."""
    model = ParaFormerLM(cfg(), seed=8)
    toks = tokens(2, 8)
    grads = []
    for fused in (True, False):
        model.zero_grad()
        model(toks, fused=fused).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(*grads, strict=True))
    with torch.no_grad():
        before = model(toks)
        model.float()
        after = model(toks)
    assert after.dtype == torch.float32 and (after - before).abs().max() < 1e-5
