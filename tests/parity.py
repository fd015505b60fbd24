"""The one equivalence rule of the parity tests: what "distributed equals the single process" means.

float64 proves the algebra. Every layout computes the same sums; only the order in which floats are
added differs (the embedding's gradient is a sum over workers; a worker's fused stack batches its own
branches). In float64 that reordering costs ~1e-16 relative, so after a few AdamW steps the weights of
a distributed run equal the single process's to 1e-10: a real error in the algebra (a missing branch,
a gradient counted W times, a wrong reduce order) is many orders of magnitude larger.

float32 is compared within a tolerance derived from the step size. Adam divides each gradient element
by its own running RMS, so an element whose true gradient is ~0 moves by up to ~lr in whichever
direction its rounding noise points: a one-ulp reordering difference can become a sizeable share of an
lr-sized move. Such moves are bounded by the learning rates actually taken, so the float32 bound is a
fixed share of their sum: it does not depend on the CPU, and it is still far below what an algebra
error moves (a wrong sum changes the gradient of nearly every weight, which then moves by ~lr a step).
Seen after 5 batches of tests/ray/test_engine.py (lr peak 1e-3): 8.4e-7 on one AMD EPYC, 1.06e-5 on
another machine of the same kind, i.e. <= 0.05% of the summed learning rates; the bound, 1%, is 20x
that. The loss curves are compared too: the forward pass does not amplify noise.
"""

from __future__ import annotations

import torch

from layerpar.train.optim import lr_at

FLOAT64_ATOL = 1e-10  # weights after a few steps, and logits: float64 reordering noise is ~1e-16
FLOAT32_LR_SHARE = 0.01  # float32 weights: within 1% of the summed learning rates of the steps taken
FLOAT32_LOGITS_ATOL = 1e-5  # float32 logits: the fused stack's batching changes rounding (~1e-7)
FLOAT32_LOSS_ATOL = 1e-5  # float32 loss values of the same step
DTYPES = ("float64", "float32")


def lr_sum(cfg, steps: int, total_steps: int) -> float:
    """Sum of the learning rates of optimizer steps 0..steps-1 under cfg's schedule."""
    return sum(lr_at(s, total_steps, cfg.train) for s in range(steps))


def weight_atol(cfg, steps: int, total_steps: int) -> float:
    """The largest element-wise weight difference a layout may show after `steps` optimizer steps."""
    if cfg.model.dtype == "float64":
        return FLOAT64_ATOL
    return FLOAT32_LR_SHARE * lr_sum(cfg, steps, total_steps)


def logits_atol(cfg) -> float:
    return FLOAT64_ATOL if cfg.model.dtype == "float64" else FLOAT32_LOGITS_ATOL


def loss_atol(cfg) -> float:
    return FLOAT64_ATOL if cfg.model.dtype == "float64" else FLOAT32_LOSS_ATOL


def assert_weights_match(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], cfg, *,
                         steps: int, total_steps: int) -> float:
    """Every tensor of `got` equals `expected` within weight_atol; returns the largest difference."""
    atol = weight_atol(cfg, steps, total_steps)
    assert got.keys() <= expected.keys(), sorted(set(got) - set(expected))[:3]
    worst = 0.0
    for name, value in got.items():
        want = expected[name]
        assert value.dtype == want.dtype, f"{name}: {value.dtype} != {want.dtype}"
        torch.testing.assert_close(value, want, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        worst = max(worst, (value - want).abs().max().item())
    return worst
