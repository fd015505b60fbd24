"""The systems under test. Each takes a batch and returns logits; each is built from the same blocks,
the same seed and so the same weights as its single-process reference.

    layerpar-collective    the runtime: W Ray workers, partial sums reduced in their gloo/NCCL group
    layerpar-object_store  the runtime: W Ray workers, partial sums reduced by the driver
    reference-threads      the authors' way: all branches in one process, W Python threads each running
                           its share (torch releases the GIL; one torch thread each), summed on one device
    vit-1dev               the serial ViT of the same N * depth blocks on one device (one thread)
    vit-pipeline           that ViT cut into W stages, GPipe over W processes (bench/pipeline.py)
    paraformer-1gpu        every branch fused into one batched computation on one GPU (gpu-one preset)
    vit-1gpu               the serial ViT on that GPU
    *-graph                the same two, replayed from a captured CUDA graph: no Python or kernel
                           launch cost per call, so what remains is the GPU's own time

The reference-threads system runs exactly the same model code as a layerpar worker (fused stacks,
CLS-only last block), so its difference to layerpar is the runtime alone.
Ray is imported only inside LayerparSystem: the GPU preset runs where Ray is not installed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from layerpar.config import Config
from layerpar.model import ParaFormer


def reference_model(system: str) -> str:
    """Which single-process model a system's logits must equal: `vit` or `paraformer`."""
    return "vit" if system.startswith("vit-") else "paraformer"


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class System:
    """A system under test: `run(x)` -> logits (B, classes), blocking until they exist."""

    name = "system"
    cuda = False  # time with CUDA events

    def run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def phases(self) -> dict[str, float]:
        """Seconds per phase of the last call (empty when the system has no phase split)."""
        return {}

    def bytes_moved(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        return None


class LayerparSystem(System):
    """The layerpar runtime (layerpar.runtime.Engine) with W workers and one transport."""

    def __init__(self, cfg: Config, *, workers: int, transport: str):
        from layerpar.runtime import Engine  # imports ray: only here

        self.name = f"layerpar-{transport}"
        self.engine = Engine(cfg.replace(parallel={"workers": workers, "transport": transport}))

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine.infer(x)

    def phases(self) -> dict[str, float]:
        return dict(self.engine.last_timings)

    def bytes_moved(self) -> dict[str, int]:
        return dict(self.engine.last_bytes)

    def close(self) -> None:
        self.engine.shutdown()


class ReferenceThreads(System):
    """All branches in this process; W threads each run a contiguous share of the branches (the same
    layout as layerpar's workers); the partial sums are added on the calling thread, in order."""

    name = "reference-threads"

    def __init__(self, model: ParaFormer, *, workers: int):
        from layerpar.parallel.layout import BranchLayout

        self.model = model.eval()
        layout = BranchLayout(model.cfg.num_branches, workers)
        self.shares = [list(layout.owned(r)) for r in range(workers)]
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="branch-device")

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.model.embed(x)  # (B, T, D), on the first device
        futures = [self.pool.submit(self._share, x0, ids) for ids in self.shares]
        partials = [f.result() for f in futures]  # (B, D) each
        total = partials[0]
        for p in partials[1:]:  # fixed order: reproducible sums
            total = total + p
        return self.model.head(total)

    def _share(self, x0: torch.Tensor, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():  # grad mode is per thread
            return self.model.branch_sum(x0, ids)

    def close(self) -> None:
        self.pool.shutdown()


class ModelSystem(System):
    """A single-process model on one device: the serial ViT, or the whole fused Para-Former."""

    def __init__(self, name: str, model: torch.nn.Module, device: torch.device):
        self.name, self.model, self.device = name, model.to(device).eval(), device
        self.cuda = device.type == "cuda"

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device, non_blocking=True))


class CudaGraphSystem(System):
    """A ModelSystem's forward on one fixed batch shape, captured once as a CUDA graph and replayed."""

    cuda = True

    def __init__(self, base: ModelSystem, example: torch.Tensor):
        self.name, self.model = base.name + "-graph", base.model
        self.static_x = example.to(base.device).clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():  # warm up outside the graph (lazy inits)
            for _ in range(3):
                self.model(self.static_x)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_out = self.model(self.static_x)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if x.data_ptr() != self.static_x.data_ptr():
            self.static_x.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_out


def micro_batches_for(batch: int, workers: int) -> int:
    """GPipe micro-batches: the largest divisor of the batch up to 2 per stage (enough to fill the
    pipeline without making each micro-batch tiny)."""
    return max(d for d in range(1, min(batch, 2 * workers) + 1) if batch % d == 0)
