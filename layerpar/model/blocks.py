"""Transformer blocks: one math path for a single block and for K branches stacked on a leading axis.

`block_forward(p, h, ...)` takes the block's weights as a dict of tensors. With plain weights
(`qkv_w` of shape (3D, D)) it runs one block on `h` (B, T, D); with weights stacked over K branches
(`qkv_w` of shape (K, 3D, D)) it runs K independent blocks on `h` (K, B, T, D) as batched matmuls.
`Block` (the module every model is made of) and the fused branch stack both call it, so the serial
ViT, a single branch and a fused group of branches share the same arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layerpar.model.dropout import ATTENTION, MLP, SiteMask, drop

# Weight names of one block, in a fixed order (used to stack branches and to name checkpoint keys).
PARAM_NAMES = (
    "ln1_w", "ln1_b", "qkv_w", "qkv_b", "proj_w", "proj_b",
    "ln2_w", "ln2_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b",
)


def linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """h (..., Din) @ w.T + b; w (Dout, Din), or (K, Dout, Din) with h (K, ..., Din)."""
    if w.dim() == 2:
        return F.linear(h, w, b)
    k = w.shape[0]
    flat = h.reshape(k, -1, h.shape[-1])  # (K, B*T, Din)
    if b is None:
        out = torch.bmm(flat, w.transpose(1, 2))
    else:
        out = torch.baddbmm(b.unsqueeze(1), flat, w.transpose(1, 2))  # (K, B*T, Dout)
    return out.reshape(*h.shape[:-1], w.shape[1])


def layer_norm(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis; w, b (D,) or stacked (K, D) with h (K, ..., D)."""
    if w.dim() == 1:
        return F.layer_norm(h, (h.shape[-1],), w, b, eps=1e-5)
    shape = (w.shape[0],) + (1,) * (h.dim() - 2) + (w.shape[1],)
    return F.layer_norm(h, (h.shape[-1],), eps=1e-5) * w.view(shape) + b.view(shape)


def attention(p: dict[str, torch.Tensor], h: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention; h (..., B, T, D) -> (..., B, T, D)."""
    *lead, t, d = h.shape
    inner = p["qkv_w"].shape[-2] // 3  # attention width A = heads * head_dim (usually D)
    qkv = linear(h, p["qkv_w"], p.get("qkv_b"))  # (..., B, T, 3A)
    qkv = qkv.reshape(-1, t, 3, heads, inner // heads).permute(2, 0, 3, 1, 4)  # (3, *B, H, T, dh)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (*B, H, T, dh)
    out = out.transpose(1, 2).reshape(*lead, t, inner)  # (..., B, T, A)
    return linear(out, p["proj_w"], p["proj_b"])


def _pool_rows(rows: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Softmax pooling of rows (..., B, T, D) by score vectors u (..., B, G, D) -> (..., B, G, D)."""
    a = torch.matmul(u, rows.transpose(-1, -2)).softmax(dim=-1)  # (..., B, G, T)
    return torch.matmul(a, rows)


def attention_cls(p: dict[str, torch.Tensor], n: torch.Tensor, heads: int, *,
                  query: torch.Tensor | None = None,
                  affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Self-attention output of the first (CLS) row only; n (..., B, T, D) -> (..., B, 1, D).

    One query row lets the key and value projections move off the T rows (associativity):
        score_j = q . (Wk n_j + bk) = (Wk^T q) . n_j + const      (the const cancels in softmax)
        out     = sum_j a_j (Wv n_j + bv) = Wv (sum_j a_j n_j) + bv (the a_j sum to 1)
    so per head the rows meet one D-vector twice instead of a (2*dh x D) projection each: at
    T = 50, D = 64, 4 heads, ~12x fewer multiply-adds. It equals row 0 of the full attention to float
    rounding; everything after it runs on one row, which is all a CLS-pooled model reads.

    Shared input (K stacked blocks reading one x0, see `cls_blocks_shared_input`): n is x0 normalised
    without affine (B, T, D), `query` the CLS row after each block's LayerNorm (K, B, 1, D) and
    `affine` each block's (gamma, beta) as (K, 1, 1, D). With n_j = gamma * xhat_j + beta the affine
    folds into the score vectors and the pooled row, so the rows are never copied K times."""
    inner = p["qkv_w"].shape[-2] // 3  # attention width A = heads * head_dim
    dh = inner // heads
    w, b = p["qkv_w"], p.get("qkv_b")
    query = n[..., :1, :] if query is None else query
    lead, d = query.shape[:-2], query.shape[-1]  # (..., B)
    wk = w[..., inner:2 * inner, :].reshape(*w.shape[:-2], heads, dh, d)  # ([K,] H, dh, D)
    wv = w[..., 2 * inner:, :].reshape(*w.shape[:-2], heads, dh, d)
    q = linear(query, w[..., :inner, :], None if b is None else b[..., :inner])  # (..., B, 1, A)
    q = q.reshape(*lead, heads, dh) * dh ** -0.5  # (..., B, H, dh), scaled as in sdpa
    u = torch.matmul(q.transpose(-2, -3), wk).transpose(-2, -3)  # (..., B, H, D): Wk^T q per head
    if affine is None:
        mix = _pool_rows(n, u)  # (..., B, H, D): sum_j a_j n_j
    else:  # all K blocks' heads score the shared rows in one product: (B, K*H, D)
        gamma, beta = affine
        k, bsz = u.shape[0], u.shape[1]
        ug = (u * gamma).transpose(0, 1).reshape(bsz, k * heads, d)
        mix = _pool_rows(n, ug).reshape(bsz, k, heads, d).transpose(0, 1) * gamma + beta
    out = torch.matmul(mix.transpose(-2, -3), wv.transpose(-1, -2))  # (..., H, B, dh): Wv per head
    out = out.transpose(-2, -3).reshape(*lead, 1, inner)  # (..., B, 1, A)
    if b is not None:  # value bias: (A,) or stacked (K, A) -> (K, 1, 1, A)
        bv = b[..., 2 * inner:]
        out = out + (bv if bv.dim() == 1 else bv[:, None, None, :])
    return linear(out, p["proj_w"], p["proj_b"])


def mlp(p: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    return linear(F.gelu(linear(h, p["fc1_w"], p["fc1_b"])), p["fc2_w"], p["fc2_b"])


def block_forward(
    p: dict[str, torch.Tensor], h: torch.Tensor, *, heads: int, style: str, dropout: float = 0.0,
    training: bool = False, cls_only: bool = False, masks: SiteMask | None = None,
) -> torch.Tensor:
    """One transformer block (or K stacked ones). `prenorm`: h + F(LN(h));
    `reference` (the authors' code): LN(h) + F(LN(h)).
    cls_only: compute only the first output row, (..., B, T, D) -> (..., B, 1, D); it equals row 0
    of the full block (used for the last block of a CLS-pooled model: a pure saving).
    masks: this block's dropout masks (model/dropout.py); None draws from torch's generator."""
    n = layer_norm(h, p["ln1_w"], p["ln1_b"])
    if cls_only:
        a = attention_cls(p, n, heads)
        h, n = h[..., :1, :], n[..., :1, :]
    else:
        a = attention(p, n, heads)
    return _block_tail(p, h, n, a, style=style, dropout=dropout, training=training, masks=masks)


def cls_blocks_shared_input(
    p: dict[str, torch.Tensor], x0: torch.Tensor, *, heads: int, style: str, dropout: float = 0.0,
    training: bool = False, masks: SiteMask | None = None,
) -> torch.Tensor:
    """K stacked blocks (weights (K, ...)) all reading the same x0 (B, T, D), CLS row only ->
    (K, B, 1, D): equal to block_forward(p, x0 expanded to (K, B, T, D), cls_only=True), but the
    first LayerNorm normalises x0 once and its per-block affine folds into the attention, so nothing
    of size K*B*T*D is ever made (how depth-1 branches of a CLS-pooled Para-Former run together)."""
    xhat = F.layer_norm(x0, x0.shape[-1:], eps=1e-5)  # (B, T, D)
    gamma, beta = p["ln1_w"][:, None, None, :], p["ln1_b"][:, None, None, :]  # (K, 1, 1, D)
    n = xhat[:, :1, :] * gamma + beta  # (K, B, 1, D): the CLS row after each block's LayerNorm
    a = attention_cls(p, xhat, heads, query=n, affine=(gamma, beta))
    h = x0[:, :1, :].expand_as(n)
    return _block_tail(p, h, n, a, style=style, dropout=dropout, training=training, masks=masks)


def _block_tail(p: dict[str, torch.Tensor], h: torch.Tensor, n: torch.Tensor, a: torch.Tensor, *,
                style: str, dropout: float, training: bool, masks: SiteMask | None) -> torch.Tensor:
    """The block after its attention output a: residual, LayerNorm, MLP, residual."""
    h = (n if style == "reference" else h) + drop(a, dropout, training, ATTENTION, masks)
    n = layer_norm(h, p["ln2_w"], p["ln2_b"])
    m = drop(mlp(p, n), dropout, training, MLP, masks)
    return (n if style == "reference" else h) + m


class Block(nn.Module):
    """One transformer block: attention + MLP, each behind a LayerNorm, with a residual."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, style: str = "prenorm",
                 qkv_bias: bool = True, dropout: float = 0.0, attn_dim: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.heads, self.style, self.dropout = heads, style, dropout
        inner = dim if attn_dim is None else attn_dim  # heads * head_dim
        self.ln1_w = nn.Parameter(torch.ones(dim))
        self.ln1_b = nn.Parameter(torch.zeros(dim))
        self.qkv_w = nn.Parameter(torch.empty(3 * inner, dim))
        self.qkv_b = nn.Parameter(torch.zeros(3 * inner)) if qkv_bias else None
        self.proj_w = nn.Parameter(torch.empty(dim, inner))
        self.proj_b = nn.Parameter(torch.zeros(dim))
        self.ln2_w = nn.Parameter(torch.ones(dim))
        self.ln2_b = nn.Parameter(torch.zeros(dim))
        self.fc1_w = nn.Parameter(torch.empty(mlp_dim, dim))
        self.fc1_b = nn.Parameter(torch.zeros(mlp_dim))
        self.fc2_w = nn.Parameter(torch.empty(dim, mlp_dim))
        self.fc2_b = nn.Parameter(torch.zeros(dim))
        for w in (self.qkv_w, self.proj_w, self.fc1_w, self.fc2_w):
            nn.init.trunc_normal_(w, std=0.02, generator=generator)

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in PARAM_NAMES if getattr(self, name) is not None}

    def forward(self, h: torch.Tensor, *, cls_only: bool = False, masks: SiteMask | None = None
                ) -> torch.Tensor:
        """(B, T, D) -> (B, T, D), or (B, 1, D) with cls_only (the CLS row alone)."""
        return block_forward(self.weights(), h, heads=self.heads, style=self.style, dropout=self.dropout,
                             training=self.training, cls_only=cls_only, masks=masks)


def make_block(cfg, generator: torch.Generator | None = None) -> Block:
    """A block shaped by a ModelConfig."""
    return Block(cfg.dim, cfg.heads, cfg.mlp_dim, style=cfg.style, qkv_bias=cfg.qkv_bias,
                 dropout=cfg.dropout, attn_dim=cfg.attn_dim, generator=generator)
