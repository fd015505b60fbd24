"""Finite inputs can still overflow the model: one pixel at 3e38, or every pixel at 1e30, makes the
patch embedding or a LayerNorm's variance infinite and the logits NaN. No backend answers such rows:

    logits = check_finite_logits(model(x))   # raises InputOverflow naming the rows that overflowed

The check is per row, so a caller that merged several requests into one batch (the server's batcher)
can refuse only the requests whose rows overflowed: `InputOverflow.logits` keeps the whole batch.
"""

from __future__ import annotations

import torch


class InputOverflow(ValueError):
    """The input's values overflow the model (-> INVALID_ARGUMENT); `rows` are the offending rows."""

    def __init__(self, message: str, *, rows: list[int], logits: torch.Tensor | None = None):
        super().__init__(message)
        self.rows = rows
        self.logits = logits  # (B, classes) as computed: the rows not in `rows` are valid answers


def nonfinite_rows(logits) -> list[int]:
    """Indices of the rows (first axis) of a (B, classes) tensor or array holding NaN or Inf."""
    t = torch.as_tensor(logits)
    return torch.nonzero(~torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)).flatten().tolist()


def overflow_message(rows: list[int], total: int) -> str:
    """One sentence for people: which rows overflowed and what to do."""
    shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
    return (f"the input's values overflow the model: row(s) {shown} of {total} give non-finite scores; "
            "send values in the range the model was trained on (e.g. normalised pixels)")


def check_finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """`logits` (B, classes) unchanged when every row is finite, else InputOverflow (logits attached)."""
    rows = nonfinite_rows(logits)
    if rows:
        raise InputOverflow(overflow_message(rows, logits.shape[0]), rows=rows, logits=logits)
    return logits
