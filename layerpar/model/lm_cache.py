"""Causal blocks with a key/value cache, for the language models in lm.py.

The blocks are the image model's `Block` (same parameters, same `linear` / `layer_norm` / `mlp`
arithmetic from blocks.py); only the attention differs: causal, and optionally reading and writing a
`KVCache`. Like `block_forward`, `causal_block` takes plain weights with h (B, T, D) or weights stacked
over K branches ((K, 3A, D), ...) with h (K, B, T, D): the fused branch stack and the loop over branches
run the same code.

Cache layout: one preallocated tensor for keys and one for values, (depth, K, S, H, T_max, Dh):
layer d of branch b is the contiguous (S, H, T_max, Dh) block `k[d, b]`, and a prefix of branches
`k[d, :k]` is contiguous too, so the fused stack writes all its branches in one index_put. S is the
number of sequence slots; each slot has its own write position (`lengths[slot]`), so sequences of
different lengths decode together and a finished one frees its slot for the next (continuous batching).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from layerpar.model.blocks import layer_norm, linear, mlp


class CacheError(ValueError):
    """A cache slot request that cannot be met (no free slot, unknown slot, context overflow)."""


class KVCache:
    """Preallocated keys/values for `slots` sequences: (depth, branches, slots, heads, context, head_dim)."""

    def __init__(self, *, slots: int, depth: int, branches: int, heads: int, head_dim: int, context: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if slots < 1:
            raise CacheError(f"a cache needs at least one slot, got {slots}")
        shape = (depth, branches, slots, heads, context, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # (S,) write position per slot
        self.context, self.capacity, self.branches = context, slots, branches
        # per slot, how many leading branches hold its whole history (a prefix k decodes only those)
        self.filled = [branches] * slots
        self._free = list(range(slots))
        self._used: set[int] = set()

    # -- slots ---------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A free slot (its length reset to 0); CacheError when all are in use."""
        if not self._free:
            raise CacheError(f"no free cache slot: all {self.capacity} slots are in use")
        slot = self._free.pop(0)
        self._used.add(slot)
        self.lengths[slot] = 0
        self.filled[slot] = self.branches
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise CacheError(f"cache slot {slot} is not allocated")
        self._used.remove(slot)
        self._free.append(slot)
        self._free.sort()
        self.lengths[slot] = 0

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def check(self, slots: Sequence[int], new_tokens: int, branches: int | None = None) -> torch.Tensor:
        """The slots as a (B,) index after checking each is allocated, has room for new_tokens and
        (with `branches`) has the history of that many branches; marks what the step will fill."""
        if len(set(slots)) != len(slots):
            raise CacheError(f"a decoding step names a cache slot twice: {list(slots)}")
        for s in slots:
            if s not in self._used:
                raise CacheError(f"cache slot {s} is not allocated")
            have = int(self.lengths[s])
            if have + new_tokens > self.context:
                raise CacheError(f"{new_tokens} new tokens after {have} do not fit the context of "
                                 f"{self.context} tokens (slot {s})")
            if branches is not None and have and branches > self.filled[s]:
                raise CacheError(f"slot {s} was decoded with {self.filled[s]} branches; it cannot "
                                 f"continue with {branches} (their caches lack its history)")
        if branches is not None:
            for s in slots:
                self.filled[s] = branches if not int(self.lengths[s]) else min(self.filled[s], branches)
        return torch.tensor(list(slots), dtype=torch.long, device=self.lengths.device)

    def layer(self, d: int, branches: slice | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of layer d's keys and values for some branches: (S, H, Tm, Dh) or (K, S, H, Tm, Dh)."""
        return self.k[d, branches], self.v[d, branches]


def causal_attention(p: dict[str, torch.Tensor], h: torch.Tensor, heads: int,
                     kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                     slots: torch.Tensor | None = None, starts: torch.Tensor | None = None) -> torch.Tensor:
    """Causal multi-head self-attention; h (..., B, T, D) -> (..., B, T, D), with ... = () or (K,).

    Without kv: the T rows attend to rows 0..t (a fresh sequence). With kv (the cache views of this
    layer, (..., S, H, Tm, Dh)): the new keys/values are written at positions starts[b] + t of slot
    slots[b], and row t attends to the slot's positions 0..starts[b] + t."""
    *lead, bsz, t, _ = h.shape
    inner = p["qkv_w"].shape[-2] // 3  # A = heads * head_dim
    dh = inner // heads
    qkv = linear(h, p["qkv_w"], p.get("qkv_b"))  # (..., B, T, 3A)
    qkv = qkv.reshape(-1, bsz, t, 3, heads, dh).permute(3, 0, 1, 4, 2, 5)  # (3, L, B, H, T, dh)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if kv is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (L, B, H, T, dh)
    else:
        cache_k, cache_v = (c.view(-1, *c.shape[-4:]) for c in kv)  # (L, S, H, Tm, dh), same storage
        ll = cache_k.shape[0]
        pos = starts[:, None] + torch.arange(t, device=h.device)  # (B, T)
        idx = (torch.arange(ll, device=h.device)[:, None, None, None],  # (L, 1, 1, 1)
               slots[None, :, None, None],  # (1, B, 1, 1)
               torch.arange(heads, device=h.device)[None, None, :, None],  # (1, 1, H, 1)
               pos[None, :, None, :])  # (1, B, 1, T) -> broadcast (L, B, H, T)
        cache_k.index_put_(idx, k)  # k (L, B, H, T, dh)
        cache_v.index_put_(idx, v)
        tcur = int(pos[:, -1].max()) + 1
        keys = cache_k[:, slots, :, :tcur]  # (L, B, H, Tc, dh)
        values = cache_v[:, slots, :, :tcur]
        mask = torch.arange(tcur, device=h.device)[None, None, :] <= pos[:, :, None]  # (B, T, Tc)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])  # (L, B, H, T, dh)
    out = out.transpose(-3, -2).reshape(*lead, bsz, t, inner)  # (..., B, T, A)
    return linear(out, p["proj_w"], p["proj_b"])


def causal_block(p: dict[str, torch.Tensor], h: torch.Tensor, *, heads: int,
                 kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                 slots: torch.Tensor | None = None, starts: torch.Tensor | None = None) -> torch.Tensor:
    """One causal pre-norm block (or K stacked): h + Attn(LN(h)), then + MLP(LN(h)). (..., B, T, D)."""
    h = h + causal_attention(p, layer_norm(h, p["ln1_w"], p["ln1_b"]), heads, kv, slots, starts)
    return h + mlp(p, layer_norm(h, p["ln2_w"], p["ln2_b"]))
