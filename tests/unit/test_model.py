"""Model math: fused stack == loop, prefixes == manual sums, ParaFormer(N=1) == ViT, both block styles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layerpar.config import load_config
from layerpar.model import ParaFormer, ViT, build_model
from layerpar.model.blocks import Block
from layerpar.model.fused import FusedBranchStack
from layerpar.model.layers import pool
from layerpar.train.local import prefix_logits_of

pytestmark = pytest.mark.unit


def model_cfg(**model):
    base = {"image_size": 8, "patch_size": 2, "dim": 32, "heads": 4, "mlp_dim": 64, "num_branches": 4,
            "branch_depth": 2}
    base.update(model)
    return load_config(None, [f"model.{k}={v}" for k, v in base.items()]).model


def images(n=3, seed=0, side=8):
    return torch.randn(n, 1, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("style", ["prenorm", "reference"])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_fused_stack_equals_loop_forward_and_grads(style, qkv_bias):
    torch.manual_seed(0)
    m = ParaFormer(model_cfg(style=style, qkv_bias=qkv_bias), seed=1)
    x0 = m.embed(images())  # (B, T, D)
    ids = m.branch_ids
    fused = FusedBranchStack([m.branch(b) for b in ids])(x0)  # (K, B, T, D)
    loop = torch.stack([m.branch(b)(x0) for b in ids])
    torch.testing.assert_close(fused, loop, atol=1e-6, rtol=0)

    # a loss at a training-like scale (a mean) that reads every output element differently
    weights = torch.randn_like(loop)
    grads = []
    for out in (lambda: FusedBranchStack([m.branch(b) for b in ids])(m.embed(images())),
                lambda: torch.stack([m.branch(b)(m.embed(images())) for b in ids])):
        m.zero_grad(set_to_none=True)
        (out() * weights).mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("branches.3.") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("style", ["prenorm", "reference"])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_depth1_cls_branches_equal_full_blocks_forward_and_grads(style, qkv_bias):
    """Depth-1 branches of a CLS-pooled model run together on the shared x0: one LayerNorm
    normalisation, its per-branch affine folded into single-query attention, keys and values never
    projected. Outputs and every gradient (the embedding's included) equal row 0 of the full blocks."""
    m = ParaFormer(model_cfg(style=style, qkv_bias=qkv_bias, branch_depth=1, pool="cls"), seed=2)
    with torch.no_grad():  # away from the init (unit LayerNorm affine, zero biases) the fold shows
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = m.branch_ids
    weights = torch.randn(len(ids), 3, m.cfg.dim)
    outs, grads = [], []
    for run in (lambda x0: m.branch_outputs(x0, ids),  # the shared-input path
                lambda x0: torch.stack([m.branch(b)(x0)[:, 0] for b in ids])):  # every row, row 0
        m.zero_grad(set_to_none=True)
        out = run(m.embed(images()))
        (out * weights).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("embed.") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=0, msg=name)


def test_fused_cache_follows_weight_updates():
    m = ParaFormer(model_cfg(), seed=0)
    x = images()
    with torch.no_grad():
        before = m(x)
        for p in m.branch(2).parameters():
            p.add_(0.01)  # in place: bumps the version the stacked-weight cache is keyed on
        after_fused, after_loop = m(x), m(x, fused=False)
    assert not torch.equal(before, after_fused)
    torch.testing.assert_close(after_fused, after_loop, atol=1e-6, rtol=0)


def test_prefix_forward_equals_manual_sum():
    m = ParaFormer(model_cfg(), seed=3).eval()
    x = images(5)
    with torch.no_grad():
        x0 = m.embed(x)
        pooled = [pool(m.branch(b)(x0), "cls") for b in range(4)]  # each (B, D), branch by branch
        all_prefixes = prefix_logits_of(m, x)  # (N, B, classes), one pass
        assert all_prefixes.shape == (4, 5, 10)
        for k in range(1, 5):
            manual = m.head(sum(pooled[:k]))
            torch.testing.assert_close(m(x, num_branches=k), manual, atol=1e-6, rtol=0)
            torch.testing.assert_close(all_prefixes[k - 1], m(x, num_branches=k), atol=1e-6, rtol=0)
        assert torch.equal(all_prefixes[-1], m(x))  # the same additions in the same order
    with pytest.raises(ValueError, match="num_branches"):
        m(x, num_branches=5)


def test_mean_pool_commutes_with_branch_sum():
    m = ParaFormer(model_cfg(pool="mean"), seed=0).eval()
    x = images()
    with torch.no_grad():
        x0 = m.embed(x)
        full = sum(m.branch(b)(x0) for b in range(4)).mean(dim=1)  # sum tokens, then pool
        torch.testing.assert_close(m(x), m.head(full), atol=1e-5, rtol=0)


@pytest.mark.parametrize("depth", [1, 3])
def test_paraformer_one_branch_equals_vit(depth):
    """N = 1 branch of depth L and the ViT of depth L are the same blocks with the same weights."""
    cfg = model_cfg(num_branches=1, branch_depth=depth)
    pf, vit = ParaFormer(cfg, seed=7).eval(), ViT(cfg, seed=7).eval()
    assert type(pf.branch(0).blocks[0]) is type(vit.blocks[0]) is Block
    pf_state = pf.state_dict()
    for name, t in vit.state_dict().items():
        assert torch.equal(t, pf_state[name.replace("blocks.", "branches.0.blocks.", 1)
                                        if name.startswith("blocks.") else name]), name
    x = images()
    with torch.no_grad():
        assert torch.equal(pf(x, fused=False), vit(x))
        torch.testing.assert_close(pf(x), vit(x), atol=1e-6, rtol=0)


def reference_block(blk: Block, h: torch.Tensor, style: str) -> torch.Tensor:
    """One block written out by hand, head by head (no shared helpers), for both residual styles."""
    d, heads = h.shape[-1], blk.heads
    dh = d // heads

    def ln(v, w, b):
        mu, var = v.mean(-1, keepdim=True), v.var(-1, unbiased=False, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-5) * w + b

    n = ln(h, blk.ln1_w, blk.ln1_b)
    qkv = n @ blk.qkv_w.T + (blk.qkv_b if blk.qkv_b is not None else 0)
    q, k, v = qkv.split(d, dim=-1)
    outs = []
    for i in range(heads):
        sl = slice(i * dh, (i + 1) * dh)
        att = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / dh ** 0.5, dim=-1)
        outs.append(att @ v[..., sl])
    a = torch.cat(outs, dim=-1) @ blk.proj_w.T + blk.proj_b
    h = (n if style == "reference" else h) + a
    n = ln(h, blk.ln2_w, blk.ln2_b)
    m = F.gelu(n @ blk.fc1_w.T + blk.fc1_b) @ blk.fc2_w.T + blk.fc2_b
    return (n if style == "reference" else h) + m


@pytest.mark.parametrize("style", ["prenorm", "reference"])
def test_block_styles_match_hand_written_math(style):
    g = torch.Generator().manual_seed(0)
    blk = Block(32, 4, 64, style=style, generator=g)
    with torch.no_grad():
        for p in blk.parameters():  # non-trivial norms and biases, so every term shows
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        h = torch.randn(2, 5, 32, generator=g)
        torch.testing.assert_close(blk(h), reference_block(blk, h, style), atol=1e-5, rtol=1e-5)


def test_styles_differ_and_both_train():
    x = images()
    outs = {}
    for style in ("prenorm", "reference"):
        m = build_model(model_cfg(style=style), seed=0)
        out = m(x)
        out.sum().backward()
        assert all(p.grad is not None for p in m.parameters())
        outs[style] = out.detach()
    assert not torch.allclose(outs["prenorm"], outs["reference"])


def test_partial_model_holds_the_same_branches():
    """A worker's share (branch_ids) has the same weights, under the same names, as the whole model."""
    cfg = model_cfg()
    whole, share = ParaFormer(cfg, seed=5), ParaFormer(cfg, seed=5, branch_ids=[3, 1])
    assert share.branch_ids == [1, 3]
    assert share.pieces() == ["embed", "head", "branch.1", "branch.3"]
    full = whole.state_dict()
    for name, t in share.state_dict().items():
        assert torch.equal(t, full[name]), name
    assert set(share.piece_state("branch.3")) == {k for k in full if k.startswith("branches.3.")}
    x0 = whole.embed(images())
    with torch.no_grad():
        torch.testing.assert_close(share.branch_sum(x0), whole.branch_sum(x0, [1, 3]), atol=0, rtol=0)


@pytest.mark.parametrize(("depth", "pool_kind"), [(1, "cls"), (2, "cls"), (2, "mean")])
def test_dropout_masks_follow_the_branch_not_the_route(depth, pool_kind, monkeypatch):
    """With a DropoutDraw each branch drops the same elements whichever route runs it (its own loop,
    a fused stack of any subset, the shared-input CLS path, the large-input loop) and a share of the
    rows gets exactly those rows' masks: distributed == one process with dropout (model/dropout.py)."""
    import layerpar.model.fused as fused_module
    from layerpar.model.dropout import DropoutDraw

    m = ParaFormer(model_cfg(branch_depth=depth, pool=pool_kind, dropout=0.3, dtype="float64"), seed=1)
    m.train()
    x0 = m.embed(images(6).double())  # (B, T, D)
    draw = DropoutDraw(seed=7, step=3, p=0.3)
    whole = m.branch_outputs(x0, m.branch_ids, draw=draw)  # (N, B, D): all branches fused
    alone = torch.cat([m.branch_outputs(x0, [b], draw=draw) for b in m.branch_ids])
    pair = m.branch_outputs(x0, [1, 3], draw=draw)
    unfused = m.branch_outputs(x0, m.branch_ids, fused=False, draw=draw)
    for got in (alone, unfused):
        torch.testing.assert_close(got, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(pair, whole[[1, 3]], atol=1e-12, rtol=0)
    monkeypatch.setattr(fused_module, "LOOP_MIN_ELEMENTS", 1)  # the large-input route
    torch.testing.assert_close(m.branch_outputs(x0, m.branch_ids, draw=draw), whole, atol=1e-12, rtol=0)
    # a replica's rows 2..5 of the 6-row batch get those rows' masks
    share = m.branch_outputs(x0[2:], m.branch_ids, draw=DropoutDraw(seed=7, step=3, p=0.3, row_start=2,
                                                                    total_rows=6))
    torch.testing.assert_close(share, whole[:, 2:], atol=1e-12, rtol=0)
    # and it does drop: another step draws other masks
    other = m.branch_outputs(x0, m.branch_ids, draw=DropoutDraw(seed=7, step=4, p=0.3))
    assert (other - whole).abs().max() > 1e-3


def test_fused_weight_cache_follows_a_dtype_change():
    """The no-grad path caches the stacked weights; .float() after a float64 forward must not reuse them
    (it raised "mixed dtype" before the cache keyed on the storage)."""
    import torch

    from layerpar.config import ModelConfig
    from layerpar.model import ParaFormer

    model = ParaFormer(ModelConfig(dtype="float64", num_branches=4, branch_depth=2)).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        model(x)
        model.float()
        got = model(x)
    assert got.dtype == torch.float32
