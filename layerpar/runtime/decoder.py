"""The seam between generation (sampling, scheduling, serving) and whatever runs the causal LM.

A `Decoder` holds a causal Para-Former LM's key/value caches, one slot per live sequence, and runs
prefill and single-token steps; it never samples (the caller owns sampling, stop rules and slots'
lifetimes). Two implementations: `LocalDecoder` (one process: the model and its `KVCache`) here, and
the distributed decoder over W workers (runtime/lm_decode.py), which implements the same protocol.

`num_branches=k` decodes with the prefix of the first k branches. A cache written with k branches is
only valid for that k, so a sequence keeps one k for its whole life (the cache raises CacheError
otherwise). A decoder error meaning "a worker died" is `layerpar.runtime.errors.WorkerError`.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

import torch

from layerpar.model.lm_cache import CacheError


@runtime_checkable
class Decoder(Protocol):
    """Holds a causal Para-Former LM's key/value caches (one slot per live sequence) and runs
    prefill and single-token steps; it never samples (the caller owns sampling)."""

    slots: int          # how many sequences fit at once
    context: int        # the most positions one sequence may hold (prompt + generated)
    num_branches: int   # the model's N
    vocab: int

    def allocate(self) -> int: ...             # a free slot; CacheError when full

    def free(self, slot: int) -> None: ...     # idempotent for a slot it handed out

    def num_used(self) -> int: ...

    def prefill(self, slots: list[int], prompts: list[list[int]], num_branches: int | None = None
                ) -> torch.Tensor: ...          # (B, V) float32 logits at each prompt's last position

    def step(self, slots: list[int], tokens: list[int], num_branches: int | None = None
             ) -> torch.Tensor: ...             # (B, V) float32 logits after appending one token per slot

    def close(self) -> None: ...


class LocalDecoder:
    """One process: wraps a ParaFormerLM (or SerialLM) and its KVCache (model.new_cache / model.step).

    Thread-safe (one lock around every cache change), so a scheduler thread may decode while another
    thread frees a cancelled sequence's slot."""

    def __init__(self, model, slots: int):
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise CacheError(f"a decoder needs at least one slot, got {slots!r}")
        self.model = model.eval()
        cfg = model.cfg
        self.slots, self.context, self.vocab = slots, cfg.context, cfg.vocab
        # a SerialLM has no branches to choose from: it is one "branch" (num_branches is ignored)
        self.num_branches = cfg.num_branches if hasattr(model, "branches") else 1
        self._serial = not hasattr(model, "branches")
        self.cache = model.new_cache(slots)
        self._handed: set[int] = set()
        self._lock = threading.Lock()
        self._device = model.tok.device

    def _k(self, num_branches: int | None) -> int | None:
        if self._serial or num_branches is None:
            return None
        if not 1 <= num_branches <= self.num_branches:
            raise CacheError(f"num_branches must be in 1..{self.num_branches}, got {num_branches}")
        return num_branches

    def allocate(self) -> int:
        with self._lock:
            slot = self.cache.allocate()
            self._handed.add(slot)
            return slot

    def free(self, slot: int) -> None:
        with self._lock:
            if slot in self._handed:
                self._handed.discard(slot)
                self.cache.free(slot)

    def num_used(self) -> int:
        with self._lock:
            return self.cache.num_used

    def prefill(self, slots: list[int], prompts: list[list[int]], num_branches: int | None = None
                ) -> torch.Tensor:
        if len(slots) != len(prompts):
            raise CacheError(f"{len(prompts)} prompts for {len(slots)} cache slots")
        k = self._k(num_branches)
        rows = []
        with self._lock:
            for slot, prompt in zip(slots, prompts, strict=True):
                if not prompt:
                    raise CacheError("a prompt needs at least one token")
                tokens = torch.tensor([list(prompt)], dtype=torch.long, device=self._device)
                rows.append(self.model.step(tokens, self.cache, [slot], num_branches=k)[0, -1])
        return torch.stack(rows).float()

    def step(self, slots: list[int], tokens: list[int], num_branches: int | None = None) -> torch.Tensor:
        if len(slots) != len(tokens):
            raise CacheError(f"{len(tokens)} tokens for {len(slots)} cache slots")
        k = self._k(num_branches)
        new = torch.tensor(list(tokens), dtype=torch.long, device=self._device)[:, None]  # (B, 1)
        with self._lock:
            return self.model.step(new, self.cache, list(slots), num_branches=k)[:, -1].float()

    def length(self, slot: int) -> int:
        """How many positions slot holds (prompt + generated so far)."""
        return int(self.cache.lengths[slot])

    def close(self) -> None:
        with self._lock:
            for slot in sorted(self._handed):
                self.cache.free(slot)
            self._handed.clear()
