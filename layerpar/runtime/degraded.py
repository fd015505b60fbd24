"""The driver's copy of the (replicated, small) head, and answers from the surviving branches while a
lost worker is recovered (serve.degraded=allow).

    head = HeadCopy(cfg)
    logits = head.get(group)(ordered_sum(rows))           # fetched from rank 0 when stale
    out = degraded_answer(recovery, head, group, ref, k)  # (logits, meta) or None: wait instead

Both only use the workers' `side` threads (head_piece, partial), which a blocked collective never
holds, so they answer while the default threads are stuck or being replaced.
"""

from __future__ import annotations

import time

import ray
import torch

from layerpar.model.paraformer import make_head, ordered_sum
from layerpar.runtime.recovery import Recovery
from layerpar.runtime.worker import as_tensor


class HeadCopy:
    """The head for the object_store transport, evaluation and degraded answers; stale after a
    training step or a load (`invalidate`)."""

    def __init__(self, cfg) -> None:
        self.cfg, self._head = cfg, None

    def invalidate(self) -> None:
        self._head = None

    def _make(self, state: dict) -> torch.nn.Module:
        head = make_head(self.cfg.model, self.cfg.train.seed)
        head.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()})
        return head.eval().requires_grad_(False)

    def get(self, group) -> torch.nn.Module:
        """The copy, fetched from rank 0 when stale."""
        if self._head is None:
            self._head = self._make(group.get(group.workers[0].head_piece.remote()))
        return self._head

    def from_any(self, handles: dict, timeout_s: float) -> torch.nn.Module | None:
        """The copy, fetched from any survivor when stale (None if none answers)."""
        if self._head is None:
            for w in handles.values():
                try:
                    self._head = self._make(ray.get(w.head_piece.remote(), timeout=timeout_s))
                    break
                except (ray.exceptions.RayError, TimeoutError):
                    continue
        return self._head


@torch.no_grad()
def degraded_answer(rec: Recovery, head: HeadCopy, group, ref, k: int) -> tuple | None:
    """The surviving workers' branches below k, added on the driver in branch order, through the head
    copy; None when no survivor owns such a branch (the caller then waits for the recovery)."""
    t0 = time.perf_counter()
    while rec.active:
        handles = {r: w for r, w in sorted(rec.handles.items()) if group.layout.owned(r).start < k}
        if not handles:
            return None
        refs = {r: w.partial.remote(ref, k) for r, w in handles.items()}  # side threads
        outs = {}
        for r, out_ref in refs.items():
            try:
                outs[r] = ray.get(out_ref, timeout=group.call_timeout_s)
            except (ray.exceptions.GetTimeoutError, TimeoutError):
                pass  # slow (a loaded machine), not dead: asked again below, never dropped for it
            except ray.exceptions.RayError:
                rec.handles.pop(r, None)  # killed by the recovery meanwhile: ask the others
        model = head.from_any(handles, group.call_timeout_s) if len(outs) == len(refs) else None
        if model is None:
            continue
        rows = torch.cat([as_tensor(outs[r][0]) for r in sorted(outs)])  # (K, B, D) in branch order
        logits = model(ordered_sum(rows))
        rec.degraded_answers += 1
        timings = {"compute": time.perf_counter() - t0, "total": time.perf_counter() - t0}
        return logits, {"degraded": True, "branches_used": [b for r in sorted(outs) for b in outs[r][1]],
                        "timings": timings}
    return None
