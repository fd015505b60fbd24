"""Causal language models: the Para-Former LM and its serial baseline (a GPT of the same blocks).

    cfg = LMConfig(dim=64, heads=4, mlp_dim=128, num_branches=4, branch_depth=2, context=128)
    model = ParaFormerLM(cfg, seed=0)
    logits = model(tokens, num_branches=k)            # (B, T) -> (B, T, V); any prefix k is an LM
    cache = model.new_cache(slots=8)
    slot = cache.allocate(); model.step(prompt[None], cache, [slot])   # prefill one sequence
    model.step(next_tokens, cache, slots)             # (B, 1) -> (B, 1, V), one position per slot

Architecture: token embedding + learned absolute positions -> x0 (B, T, D); N branches of
`branch_depth` causal pre-norm blocks (the image model's `Block`), ALL reading x0; their sum; a final
LayerNorm; the LM head, tied to the token embedding by default. Positions are learned (a (context, D)
table added to x0), as in the image model: the position enters once, in x0, so the cached keys need no
rotation and every branch sees the same input; rotary would have to be applied inside every branch's
attention. The context is therefore fixed at `context` tokens. Dropout is not used yet (0).

Why one reduction per token, whatever the depth: every branch reads only x0, which each device can
compute from the tokens themselves, and keeps its own key/value cache (lm_cache.py) next to its
weights. A decode step therefore needs no exchange between blocks: each branch runs its own depth on
one position, and only the branch sum of the final hidden state, (B, 1, D), has to travel. A serial
stack (or a pipeline of it) passes the hidden state through every layer in turn; tensor parallelism
needs two collectives per layer.

The distributed decoder (not built yet): the new tokens reach every worker once; each worker runs
`branch_sum(..., cache=its cache)` over its own branches (the fused stack), one all-reduce (or reduce
to one rank) brings (B, 1, D) together, and that rank applies `logits` (norm + tied head) and samples.

`LMConfig` is a standalone frozen dataclass; `build_lm(cfg.model)` makes one from the config tree
(`model.kind: paraformer_lm` or `serial_lm`), which the training loop does (train/lm_shard.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layerpar.model.blocks import Block
from layerpar.model.fused import LOOP_MIN_ELEMENTS, Branch, FusedBranchStack
from layerpar.model.layers import seeded
from layerpar.model.lm_cache import CacheError, KVCache, causal_block

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class LMConfig:
    vocab: int = 259  # byte tokenizer: 256 bytes + BOS, EOS, PAD (layerpar/data/text.py)
    dim: int = 128
    heads: int = 4
    mlp_dim: int = 512
    num_branches: int = 4
    branch_depth: int = 2
    context: int = 256
    dtype: str = "float32"
    tie: bool = True  # the LM head is the token embedding's transpose
    positions: str = "learned"

    def __post_init__(self):
        for name in ("vocab", "dim", "heads", "mlp_dim", "num_branches", "branch_depth", "context"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LMConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"LMConfig.dim ({self.dim}) must be a multiple of heads ({self.heads})")
        if self.dtype not in DTYPES:
            raise ValueError(f"LMConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.positions != "learned":
            raise ValueError(f"LMConfig.positions must be 'learned' (the only kind built), "
                             f"got {self.positions!r}")
        if not isinstance(self.tie, bool):
            raise ValueError(f"LMConfig.tie must be true or false, got {self.tie!r}")


class _LM(nn.Module):
    """Embedding, final norm, head, cached stepping; subclasses define the trunk."""

    cache_depth: int
    cache_branches: int

    def __init__(self, cfg: LMConfig, seed: int):
        super().__init__()
        self.cfg = cfg
        g = seeded(seed, 0)
        self.tok = nn.Parameter(torch.empty(cfg.vocab, cfg.dim))
        self.pos = nn.Parameter(torch.empty(cfg.context, cfg.dim))
        nn.init.normal_(self.tok, std=0.02, generator=g)
        nn.init.normal_(self.pos, std=0.02, generator=g)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head_w = None
        if not cfg.tie:
            self.head_w = nn.Parameter(torch.empty(cfg.vocab, cfg.dim))
            nn.init.normal_(self.head_w, std=0.02, generator=g)

    def _k(self, num_branches: int | None) -> int | None:
        """How many leading branches a call uses (None: the model has no branches)."""
        return None

    def _block(self, seed: int, *tags: int) -> Block:
        c = self.cfg
        return Block(c.dim, c.heads, c.mlp_dim, generator=seeded(seed, *tags))

    def _finish(self) -> None:
        self.to(DTYPES[self.cfg.dtype])

    def embed(self, tokens: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) at positions starts[b] + t (0 without starts) -> x0 (B, T, D)."""
        t = tokens.shape[1]
        pos = torch.arange(t, device=tokens.device)[None, :]  # (1, T)
        if starts is not None:
            pos = starts[:, None] + pos  # (B, T)
        if int(pos.max()) >= self.cfg.context:
            raise CacheError(f"a sequence of {int(pos.max()) + 1} tokens does not fit the context of "
                             f"{self.cfg.context} tokens")
        return self.tok[tokens] + self.pos[pos]  # (B, T, D)

    def head_weight(self) -> torch.Tensor:
        """The LM head's (V, D) weight: the token embedding when tied."""
        return self.tok if self.head_w is None else self.head_w

    def logits(self, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The summed final hidden state y (B, T, D) -> logits (B, T, V): final LayerNorm, head
        (`weight`: the head's weight to use instead of head_weight(), e.g. a detached copy whose
        gradient training keeps apart from the embedding's)."""
        n = F.layer_norm(y, y.shape[-1:], self.norm.weight, self.norm.bias, eps=1e-5)
        return F.linear(n, self.head_weight() if weight is None else weight)

    def forward(self, tokens: torch.Tensor, *, num_branches: int | None = None,
                fused: bool = True) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V), every position causal, no cache."""
        return self.logits(self.trunk(self.embed(tokens), num_branches, fused=fused))

    def new_cache(self, slots: int, device: torch.device | str | None = None) -> KVCache:
        c = self.cfg
        return KVCache(slots=slots, depth=self.cache_depth, branches=self.cache_branches, heads=c.heads,
                       head_dim=c.dim // c.heads, context=c.context, dtype=DTYPES[c.dtype],
                       device=device if device is not None else self.tok.device)

    @torch.no_grad()
    def step(self, tokens_new: torch.Tensor, cache: KVCache, slots: Sequence[int] | None = None, *,
             num_branches: int | None = None, fused: bool = True) -> torch.Tensor:
        """Appends tokens_new (B, T) to the sequences in cache slots `slots` (B of them; default
        0..B-1) and returns their logits (B, T, V). A prompt is one call with T = its length.
        Decoding only (no autograd); training goes through forward()."""
        slots = list(range(tokens_new.shape[0])) if slots is None else list(slots)
        if len(slots) != tokens_new.shape[0]:
            raise CacheError(f"{tokens_new.shape[0]} token rows for {len(slots)} cache slots")
        if tokens_new.shape[1] < 1:
            raise CacheError("a decoding step needs at least one token")
        index = cache.check(slots, tokens_new.shape[1], self._k(num_branches))
        starts = cache.lengths[index]  # (B,)
        x0 = self.embed(tokens_new, starts)
        y = self.trunk(x0, num_branches, fused=fused, cache=cache, slots=index, starts=starts)
        cache.lengths[index] += tokens_new.shape[1]
        return self.logits(y)


class _Absent(nn.Module):
    """A branch another worker owns: no weights here, so the owned branches keep their names."""


class ParaFormerLM(_LM):
    """N branches of branch_depth causal blocks, all reading x0; logits of their sum. `branch_ids`:
    build only those branches (a training worker's share, train/lm_shard.py); the others are empty
    placeholders, so every weight has the whole model's name and a branch the same weights wherever
    it is built. Such a share trains through `owned_outputs`; forward/step need every branch."""

    def __init__(self, cfg: LMConfig, seed: int = 0, branch_ids: Sequence[int] | None = None):
        super().__init__(cfg, seed)
        ids = range(cfg.num_branches) if branch_ids is None else sorted(set(branch_ids))
        if any(not 0 <= b < cfg.num_branches for b in ids):
            raise ValueError(f"branch ids {list(ids)} out of range 0..{cfg.num_branches - 1}")
        self.branch_ids = list(ids)
        self.branches = nn.ModuleList(
            Branch([self._block(seed, 1, b, d) for d in range(cfg.branch_depth)]) if b in self.branch_ids
            else _Absent() for b in range(cfg.num_branches))
        self.cache_depth, self.cache_branches = cfg.branch_depth, cfg.num_branches
        self._stacks: dict = {}
        self._finish()

    def _apply(self, fn, *args, **kw):
        # .to()/.float()/.cuda() swap parameter data without bumping its version, which the fused
        # stack's no-grad weight cache keys on: drop the stacks so they restack the new tensors
        self._stacks = {}
        return super()._apply(fn, *args, **kw)

    def owned_outputs(self, x0: torch.Tensor, branch_ids: Sequence[int]) -> torch.Tensor:
        """x0 (B, T, D) -> the listed owned branches' outputs (K, B, T, D) (K may be 0), no cache: the
        training forward of a worker's share. Fused (stacked weights) while the activations are
        small, one branch at a time above fused.LOOP_MIN_ELEMENTS on a CPU (as the image model)."""
        ids, heads = tuple(branch_ids), self.cfg.heads
        if not ids:
            return x0.new_zeros((0, *x0.shape))
        if len(ids) == 1 or (x0.device.type == "cpu" and x0.numel() >= LOOP_MIN_ELEMENTS):
            outs = []
            for b in ids:
                h = x0
                for block in self.branches[b].blocks:
                    h = causal_block(block.weights(), h, heads=heads)
                outs.append(h)
            return torch.stack(outs)
        stack = self._stacks.get(ids)
        if stack is None:
            stack = self._stacks[ids] = FusedBranchStack([self.branches[b] for b in ids], list(ids))
        h = x0.unsqueeze(0).expand(len(ids), *x0.shape)
        for p in stack.stacked_weights():
            h = causal_block(p, h, heads=heads)
        return h

    def _k(self, num_branches: int | None) -> int:
        k = self.cfg.num_branches if num_branches is None else num_branches
        if not 1 <= k <= self.cfg.num_branches:
            raise ValueError(f"num_branches must be in 1..{self.cfg.num_branches}, got {k}")
        return k

    def branch_outputs(self, x0: torch.Tensor, num_branches: int | None = None, *, fused: bool = True,
                       cache: KVCache | None = None, slots: torch.Tensor | None = None,
                       starts: torch.Tensor | None = None) -> torch.Tensor:
        """x0 (B, T, D) -> each of the first k branches' output (K, B, T, D), fused (stacked weights,
        batched matmuls over the branch axis) or one branch at a time; the same math."""
        k, heads = self._k(num_branches), self.cfg.heads
        if k > len(self.branch_ids) or self.branch_ids[k - 1] != k - 1:
            raise ValueError(f"this model holds branches {self.branch_ids}, not the first {k}")
        if fused and k > 1:
            stack = self._stacks.get(k)
            if stack is None:
                stack = self._stacks[k] = FusedBranchStack(list(self.branches[:k]))
            h = x0.unsqueeze(0).expand(k, *x0.shape)  # (K, B, T, D)
            for d, p in enumerate(stack.stacked_weights()):
                kv = None if cache is None else cache.layer(d, slice(0, k))  # (K, S, H, Tm, Dh)
                h = causal_block(p, h, heads=heads, kv=kv, slots=slots, starts=starts)
            return h
        outs = []
        for b in range(k):
            h = x0
            for d, block in enumerate(self.branches[b].blocks):
                kv = None if cache is None else cache.layer(d, b)  # (S, H, Tm, Dh)
                h = causal_block(block.weights(), h, heads=heads, kv=kv, slots=slots, starts=starts)
            outs.append(h)
        return torch.stack(outs)  # (K, B, T, D)

    def trunk(self, x0: torch.Tensor, num_branches: int | None = None, **kw) -> torch.Tensor:
        """The branch sum (B, T, D): on W workers, the one tensor a decode step reduces."""
        return self.branch_outputs(x0, num_branches, **kw).sum(dim=0)


class SerialLM(_LM):
    """The serial baseline: a GPT of num_branches * branch_depth causal blocks (the same Block code)."""

    def __init__(self, cfg: LMConfig, seed: int = 0):
        super().__init__(cfg, seed)
        depth = cfg.num_branches * cfg.branch_depth
        self.blocks = nn.ModuleList(self._block(seed, 2, i) for i in range(depth))
        self.cache_depth, self.cache_branches = depth, 1
        self._finish()

    def trunk(self, x0: torch.Tensor, num_branches: int | None = None, *, fused: bool = True,
              cache: KVCache | None = None, slots: torch.Tensor | None = None,
              starts: torch.Tensor | None = None) -> torch.Tensor:
        if num_branches not in (None, self.cfg.num_branches):
            raise ValueError("the serial baseline has no branches to take a prefix of")
        h = x0
        for d, block in enumerate(self.blocks):
            kv = None if cache is None else cache.layer(d, 0)
            h = causal_block(block.weights(), h, heads=self.cfg.heads, kv=kv, slots=slots, starts=starts)
        return h


@torch.no_grad()
def generate(model: _LM, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             num_branches: int | None = None, cache: KVCache | None = None) -> list[list[int]]:
    """Greedy decoding of several prompts together (each prefilled alone, then one batched step per
    token). Uses `cache` (or a fresh one) and frees every slot it took, whatever happens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise CacheError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise CacheError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    cache = model.new_cache(len(prompts)) if cache is None else cache
    device = model.tok.device
    slots: list[int] = []
    try:
        last = []
        for p in prompts:
            slots.append(cache.allocate())
            logits = model.step(torch.tensor([list(p)], device=device), cache, [slots[-1]],
                                num_branches=num_branches)
            last.append(logits[0, -1])
        out: list[list[int]] = [[] for _ in prompts]
        nxt = torch.stack(last).argmax(dim=-1)  # (B,)
        for i in range(max_new_tokens):
            for row, tok in zip(out, nxt.tolist(), strict=True):
                row.append(tok)
            if i + 1 < max_new_tokens:
                nxt = model.step(nxt[:, None], cache, slots, num_branches=num_branches)[:, -1].argmax(dim=-1)
        return out
    finally:
        for s in slots:
            cache.free(s)


def lm_config(model_cfg, vocab: int = 259) -> LMConfig:
    """The LMConfig of a config tree's model section (model.kind paraformer_lm / serial_lm)."""
    m = model_cfg
    return LMConfig(vocab=vocab, dim=m.dim, heads=m.heads, mlp_dim=m.mlp_dim, num_branches=m.num_branches,
                    branch_depth=m.branch_depth, context=m.context, dtype=m.dtype)


def build_lm(model_cfg, *, seed: int = 0, branch_ids: Sequence[int] | None = None) -> _LM:
    """The language model a config tree's model section describes; `branch_ids`: a share of the
    Para-Former LM's branches (the serial baseline is always whole)."""
    cfg = lm_config(model_cfg)
    if model_cfg.kind == "serial_lm":
        return SerialLM(cfg, seed=seed)
    if model_cfg.kind != "paraformer_lm":
        raise ValueError(f"model.kind {model_cfg.kind!r} is not a language model")
    return ParaFormerLM(cfg, seed=seed, branch_ids=branch_ids)
