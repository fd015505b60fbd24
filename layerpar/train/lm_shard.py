"""A rank's share of a language model for the one training loop (rank_loop.py): the LM's BranchShard.

    shard = shard_class(cfg)(cfg, worker_rank=0, total_steps=n)       # one process (loop.py)
    shard, comm = shard_class(cfg).attached(cfg, global_rank=r, ...)  # a Ray Train rank (spmd.py)

LMShard holds the branches of its worker rank of the Para-Former LM (parallel.layout's blocks), and
replicas of the token embedding, the learned positions, the final norm (and the head, tied to the
embedding by default); the serial baseline (model.kind serial_lm) trains in one process only. It has
BranchShard's interface -- group attachment, the timed comm, checkpoint pieces ("embed": tok and
pos, "head": the final norm and an untied head, "branch.<b>": one branch; the serial GPT: its blocks
as one piece), load, param counts -- so the loop, save_sharded, restore, Tune and the progress bar
treat it as they treat an image shard; its train_step is lm_step.lm_train_step, and its evaluator
(`evaluator(comm)`) gives the loop language-model metrics (LMEval).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from layerpar.config_rules import LM_KINDS
from layerpar.model.lm import ParaFormerLM, build_lm
from layerpar.model.paraformer import prefix_sums
from layerpar.parallel.comm import LocalComm
from layerpar.parallel.layout import BranchLayout
from layerpar.train.lm_step import lm_train_step
from layerpar.train.precision import LossScale, wide
from layerpar.train.shard import BranchShard

EVAL_TOKENS = 8192  # tokens per evaluation forward: (N, tokens, vocab) logits stay a few MB


def shard_class(cfg) -> type:
    """The shard that trains cfg's model: LMShard for a language model, else BranchShard."""
    return LMShard if cfg.model.kind in LM_KINDS else BranchShard


def lm_optimizer(model, tcfg) -> torch.optim.AdamW:
    """AdamW as train/optim.py sets it up by name: decay on the blocks' matrices only (not on the
    token embedding, the positions, biases or norms)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and name not in ("tok", "pos") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)


def lm_piece(name: str) -> str:
    """The checkpoint piece of an LM weight."""
    if name.startswith("branches."):
        return "branch." + name.split(".")[1]
    if name.startswith("blocks."):
        return "blocks"
    return "embed" if name in ("tok", "pos") else "head"


class LMShard(BranchShard):
    """A worker's share of a language model; see the module docstring."""

    def __init__(self, cfg, *, worker_rank: int, total_steps: int = 0):  # noqa: D107 - BranchShard's
        self.cfg = cfg
        self.layout = BranchLayout(cfg.model.num_branches, max(1, cfg.parallel.workers))
        self.worker_rank = worker_rank
        self.device = torch.device("cuda" if cfg.parallel.gpus_per_worker > 0 else "cpu")
        self.model = build_lm(cfg.model, seed=cfg.train.seed,
                              branch_ids=list(self.layout.owned(worker_rank))).to(self.device)
        self.opt = lm_optimizer(self.model, cfg.train)
        self.scaler = LossScale.for_precision(cfg.train.precision)
        self.compile_s = 0.0
        self.total_steps, self.step = total_steps, 0
        self.comms: dict[int, object] = {1: LocalComm()}
        self.calls = {"train_step": 0, "evaluate": 0}

    def train_step(self, x, y, share: tuple[int, int] | None = None) -> dict:
        """One batch of windows; in a training mesh (R > 1) this replica's share of its rows
        (share: (x, y) is already the share -- (rows of the whole batch, its first row))."""
        self.calls["train_step"] += 1
        self.model.train()
        comm = self.comms[self.layout.num_workers]
        rows = None
        if share is not None:
            rows = share[0] if comm.replicas > 1 else None
        elif comm.replicas > 1:
            rows = len(y)
            x, y = (torch.tensor_split(torch.as_tensor(t), comm.replicas)[comm.replica] for t in (x, y))
        out = lm_train_step(self.model, self.opt, comm, self.on_device(x), self.on_device(y), cfg=self.cfg,
                            step=self.step, total_steps=self.total_steps, batch_rows=rows, scaler=self.scaler)
        self.step = out["step"]
        return out

    def pieces(self, *, replicated: bool) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in self.model.state_dict().items():
            piece = lm_piece(name)
            if replicated or piece.startswith("branch."):
                out.setdefault(piece, {})[name] = t.detach().cpu().clone()
        return out

    def param_counts(self) -> dict:
        branch = sum(p.numel() for n, p in self.model.named_parameters() if lm_piece(n).startswith("branch."))
        total = sum(p.numel() for p in self.model.parameters())
        ids = getattr(self.model, "branch_ids", [])
        return {"branches": branch, "replicated": total - branch, "branch_ids": ids}

    def evaluator(self, comm) -> LMEval:
        return LMEval(self, comm)


class LMEval:
    """Evaluation of a language model by every rank together: per prefix k = 1..N, the cross-entropy
    of next-token prediction, as bits per byte, and next-byte accuracy. `evaluate_split` is what
    train/evaluate.py's evaluate() runs for it (the loop's val and test)."""

    def __init__(self, shard: LMShard, comm) -> None:
        self.shard, self.comm = shard, comm

    @torch.no_grad()
    def prefix_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Windows x (B, T) -> logits of every prefix model (K, B*T, V), float32 (K = 1: the serial
        GPT). Every rank's branch rows are gathered in branch order (one all_gather)."""
        shard, model = self.shard, self.shard.model
        model.eval()
        with shard.autocast():
            x0 = model.embed(shard.on_device(x))  # (B, T, D)
            if not isinstance(model, ParaFormerLM):
                return wide(model.logits(model.trunk(x0))).reshape(1, -1, model.cfg.vocab).cpu()
            rows = model.owned_outputs(x0, model.branch_ids)  # (K_w, B, T, D)
        b, t, d = x0.shape
        rows = self.comm.all_branch_rows(wide(rows).reshape(-1, b * t, d))  # (N, B*T, D)
        with shard.autocast():
            return wide(model.logits(prefix_sums(rows))).cpu()

    def evaluate_split(self, split, batch_size: int = 0) -> dict:
        """{"accuracy", "loss" (nats per token), "prefix_accuracy", "samples" (windows), "extra":
        {"bits_per_byte", "prefix_bits_per_byte"}} of the full model (the last prefix). Bits per byte:
        the summed cross-entropy of every target (bytes, BOS, EOS) in bits over the bytes among them."""
        self.shard.calls["evaluate"] += 1
        n = len(split)
        if n == 0:
            return {"accuracy": None, "loss": None, "prefix_accuracy": None, "samples": 0,
                    "extra": {"bits_per_byte": None, "prefix_bits_per_byte": None}}
        chunk = max(1, EVAL_TOKENS // split.context)
        nll = hits = None
        tokens = nbytes = 0
        for start in range(0, n, chunk):
            x, y = split.take(slice(start, start + chunk))
            logits = self.prefix_logits(x)  # (K, B*T, V)
            target = y.reshape(-1)
            k = logits.shape[0]
            step_nll = torch.stack([F.cross_entropy(logits[i].double(), target, reduction="sum")
                                    for i in range(k)])
            step_hits = (logits.argmax(dim=-1) == target).sum(dim=1)
            nll = step_nll if nll is None else nll + step_nll
            hits = step_hits if hits is None else hits + step_hits
            tokens += target.numel()
            nbytes += int((target < 256).sum())
        bpb = [v / math.log(2) / max(1, nbytes) for v in nll.tolist()]
        acc = [h / tokens for h in hits.tolist()]
        return {"accuracy": acc[-1], "loss": float(nll[-1]) / tokens, "prefix_accuracy": acc, "samples": n,
                "extra": {"bits_per_byte": bpb[-1], "prefix_bits_per_byte": bpb}}
