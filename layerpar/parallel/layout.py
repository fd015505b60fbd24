"""Which worker owns which branches: a validated value, computed once and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BranchLayout:
    """N branches on W workers in contiguous, balanced blocks (the first N % W workers own one more).

    >>> print(BranchLayout(num_branches=8, num_workers=3))
    branches=8 workers=3 owns=[[0,1,2],[3,4,5],[6,7]]
    """

    num_branches: int
    num_workers: int

    def __post_init__(self) -> None:
        if self.num_branches < 1:
            raise ValueError(f"num_branches ({self.num_branches}) must be >= 1")
        if not 1 <= self.num_workers <= self.num_branches:
            raise ValueError(
                f"num_workers ({self.num_workers}) must be in 1..num_branches ({self.num_branches}): "
                "every worker owns at least one branch"
            )

    def owned(self, worker_rank: int) -> range:
        """The branch ids worker `worker_rank` owns."""
        if not 0 <= worker_rank < self.num_workers:
            raise ValueError(f"worker_rank ({worker_rank}) must be in 0..{self.num_workers - 1}")
        base, extra = divmod(self.num_branches, self.num_workers)
        start = worker_rank * base + min(worker_rank, extra)
        return range(start, start + base + (worker_rank < extra))

    def owner(self, branch_id: int) -> int:
        """The worker rank that owns `branch_id`."""
        for rank in range(self.num_workers):
            if branch_id in self.owned(rank):
                return rank
        raise ValueError(f"branch_id ({branch_id}) must be in 0..{self.num_branches - 1}")

    def participants(self, num_branches: int | None = None) -> int:
        """How many workers (ranks 0..r-1) own a branch of the prefix model with `num_branches`
        branches; the others have nothing to compute for it."""
        k = self.num_branches if num_branches is None else num_branches
        if not 1 <= k <= self.num_branches:
            raise ValueError(f"num_branches ({k}) must be in 1..{self.num_branches}")
        return self.owner(k - 1) + 1

    @property
    def max_owned(self) -> int:
        return len(self.owned(0))

    def describe(self, worker_rank: int) -> str:
        ids = list(self.owned(worker_rank))
        return f"branches={self.num_branches} workers={self.num_workers} rank={worker_rank} owns={ids}"

    def __str__(self) -> str:
        blocks = ",".join("[" + ",".join(map(str, self.owned(r))) + "]" for r in range(self.num_workers))
        return f"branches={self.num_branches} workers={self.num_workers} owns=[{blocks}]"
