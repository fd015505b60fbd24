"""The pieces around the blocks: patch embedding (+CLS, +positions), pooling, and the head."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn


def seeded(seed: int, *tags: int) -> torch.Generator:
    """A CPU generator for one named piece of the model, so any process can build exactly that piece
    (branch 5 on worker 2 gets the same weights as branch 5 in a single process).

    The generator's seed is an 8-byte blake2b digest (read little-endian, shifted right by one: 63
    bits) of the canonical encoding b"layerpar.seeded:" + the ASCII decimals "seed,tag1,tag2,...".
    It depends only on (seed, *tags), never on Python's hash(), the process, the platform or the
    Python version, and any change in any part gives an unrelated stream.
    """
    text = ",".join(str(int(part)) for part in (seed, *tags))
    digest = hashlib.blake2b(b"layerpar.seeded:" + text.encode("ascii"), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def torch_dtype(cfg) -> torch.dtype:
    """The parameter dtype a model config asks for (`model.dtype`)."""
    return {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches row-major, pixels flattened in (p1 p2 c) order."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p1, p2, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class PatchEmbed(nn.Module):
    """Linear patch embedding, a learned CLS token and learned positions: (B, C, H, W) -> (B, T, D)."""

    def __init__(self, *, image_size: int, patch_size: int, in_channels: int, dim: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Linear(patch_size * patch_size * in_channels, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.empty(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.proj.weight, std=0.02, generator=generator)
        nn.init.zeros_(self.proj.bias)
        nn.init.trunc_normal_(self.pos, std=0.02, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.proj.weight.dtype)  # float32 on the wire; a float64 model computes in float64
        tokens = self.proj(patchify(x, self.patch_size))  # (B, N, D)
        cls = self.cls.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, tokens], dim=1) + self.pos  # (B, T, D)


def pool(h: torch.Tensor, kind: str) -> torch.Tensor:
    """(..., B, T, D) -> (..., B, D): the CLS row or the token mean. Linear, so it commutes with the
    branch sum: only the pooled (B, D) row of each branch ever has to travel."""
    return h[..., 0, :] if kind == "cls" else h.mean(dim=-2)


class Head(nn.Module):
    """LayerNorm -> Linear on the pooled vector: (B, D) -> (B, classes)."""

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02, generator=generator)
        nn.init.zeros_(self.fc.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc(F.layer_norm(y, y.shape[-1:], self.norm.weight, self.norm.bias, eps=1e-5))
