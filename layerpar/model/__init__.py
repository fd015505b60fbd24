"""Pure model math on one device: no ray, no torch.distributed, no grpc in this package."""

from layerpar.model.blocks import Block, block_forward
from layerpar.model.fused import Branch, FusedBranchStack
from layerpar.model.lm import LMConfig, ParaFormerLM, SerialLM
from layerpar.model.lm_cache import KVCache
from layerpar.model.paraformer import ParaFormer
from layerpar.model.vit import ViT

__all__ = [
    "Block", "Branch", "FusedBranchStack", "KVCache", "LMConfig", "ParaFormer", "ParaFormerLM", "SerialLM",
    "ViT", "block_forward", "build_model",
]


def build_model(cfg, *, seed: int = 0, branch_ids=None):
    """The model a ModelConfig describes: a ParaFormer (optionally owning only some branches) or a ViT."""
    if cfg.kind == "vit":
        return ViT(cfg, seed=seed)
    return ParaFormer(cfg, seed=seed, branch_ids=branch_ids)
