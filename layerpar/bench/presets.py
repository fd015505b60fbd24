"""What a scaling run measures: the systems, the presets and the sweep settings.

    cfg, settings = build_settings("default", ["bench.batches=[1]", "model.dim=256"])

`bench.<field>=value` items set a BenchSettings field; any other item is a config override.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from layerpar.config import Config, ConfigError, load_config, parse_override

CPU_SYSTEMS = ("layerpar-collective", "layerpar-object_store", "reference-threads", "vit-1dev",
               "vit-pipeline")
GPU_SYSTEMS = ("paraformer-1gpu", "vit-1gpu", "paraformer-1gpu-graph", "vit-1gpu-graph")
# The reference configuration's blocks: width 192, 3 heads, MLP 768, 224x224 -> 197 tokens.
REFERENCE_BLOCKS = ["model.image_size=224", "model.in_channels=3", "model.patch_size=16",
                    "model.dim=192", "model.heads=3", "model.mlp_dim=768", "model.num_classes=10",
                    "model.branch_depth=2", "model.pool=cls", "model.style=prenorm"]


@dataclass(frozen=True)
class BenchSettings:
    workers: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Worker counts W; a point exists only where W <= N."""
    branches: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Branch counts N (the serial ViT stacks N * branch_depth blocks)."""
    batches: list[int] = field(default_factory=lambda: [1, 8])
    """Batch sizes."""
    systems: list[str] = field(default_factory=lambda: list(CPU_SYSTEMS))
    """Systems to measure (see layerpar/bench/systems.py)."""
    warmup: int = 2
    """Calls thrown away before timing each point."""
    reps: int = 15
    """Most timed calls per point."""
    min_reps: int = 5
    """Fewest timed calls per point, however slow."""
    max_seconds: float = 1.5
    """Timed calls stop once this many seconds were spent on a point (after min_reps)."""
    devices: int = 0
    """Devices the workers share (0: CPU cores for CPU systems, 1 for the GPU preset); more workers
    than devices is labelled oversubscribed."""
    oversubscribed: str = "largest"
    """Points with more workers than devices: `all` N, only the `largest` N, or `none`."""
    atol: float = 1e-4
    """Largest |logits - single-process logits| accepted (the GPU preset uses 1e-3)."""
    check_rows: int = 8
    """Rows of each batch compared against the single-process model on the CPU."""
    plots: bool = True
    """Write PNG plots (needs matplotlib)."""
    dtype: str = "float32"
    """GPU systems only: `float32` or `bfloat16` weights and inputs (bfloat16 is checked with atol 0.05
    unless bench.atol is set)."""
    tf32: bool = False
    """GPU systems only: let float32 matmuls use TF32 tensor cores."""


PRESETS: dict[str, tuple[list[str], dict]] = {
    "default": (REFERENCE_BLOCKS, {}),
    "tiny": (["model.image_size=16", "model.in_channels=3", "model.patch_size=4", "model.dim=32",
              "model.heads=2", "model.mlp_dim=64", "model.num_classes=10", "model.branch_depth=2"],
             {"workers": [1, 2], "branches": [1, 2], "batches": [2], "warmup": 1, "reps": 3,
              "min_reps": 2, "max_seconds": 0.5}),
    "gpu-one": (REFERENCE_BLOCKS,
                {"workers": [1], "branches": [1, 2, 4, 8, 16, 32], "batches": [1, 64],
                 "systems": list(GPU_SYSTEMS), "warmup": 10, "reps": 200, "min_reps": 20,
                 "max_seconds": 1.5, "devices": 1, "atol": 1e-3, "check_rows": 4}),
}


def split_sets(items: list[str], settings_cls, bench: dict, overrides: list[str]
               ) -> tuple[dict, list[str]]:
    """`--set` items: bench.<field>=value into `bench` (a field of settings_cls), the rest appended
    to the config `overrides`; an unknown bench key is a ConfigError listing the known ones."""
    names = {f.name for f in dataclasses.fields(settings_cls)}
    for item in items:
        keys, value = parse_override(item)
        if keys[0] != "bench":
            overrides.append(item)
        elif len(keys) != 2 or keys[1] not in names:
            raise ConfigError(f"unknown key {'.'.join(keys)}; bench keys: {', '.join(sorted(names))}")
        else:
            bench[keys[1]] = value
    return bench, overrides


def build_settings(preset: str, items: list[str]) -> tuple[Config, BenchSettings]:
    """The preset's model config and sweep, with `--set` items applied on top."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r} is unknown; presets: {', '.join(PRESETS)}")
    model_sets, bench = PRESETS[preset]
    bench, overrides = split_sets(items, BenchSettings, dict(bench), list(model_sets))
    cfg = load_config(None, overrides)
    if bench.get("dtype") == "bfloat16" and not any(i.startswith("bench.atol=") for i in items):
        bench["atol"] = 5e-2  # bfloat16 keeps ~3 significant digits
    for key in ("workers", "branches", "batches"):
        v = bench.get(key, [1])
        if not (isinstance(v, list) and v and all(isinstance(i, int) and i >= 1 for i in v)):
            raise ConfigError(f"bench.{key} ({v!r}) must be a non-empty list of positive integers, "
                              f"e.g. bench.{key}=[1,2]")
        if key in bench:
            bench[key] = sorted(set(v))
    settings = BenchSettings(**bench)
    if settings.oversubscribed not in ("all", "largest", "none"):
        raise ConfigError(f"bench.oversubscribed ({settings.oversubscribed!r}) must be one of "
                          "all, largest, none")
    if settings.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"bench.dtype ({settings.dtype!r}) must be one of float32, bfloat16")
    if (settings.dtype != "float32" or settings.tf32) and \
            not set(settings.systems) <= set(GPU_SYSTEMS):
        raise ConfigError("bench.dtype and bench.tf32 apply to the GPU systems only "
                          f"({', '.join(GPU_SYSTEMS)})")
    unknown = sorted(set(settings.systems) - set(CPU_SYSTEMS + GPU_SYSTEMS))
    if unknown:
        raise ConfigError(f"bench.systems: unknown {unknown[0]!r}; systems: "
                          f"{', '.join(CPU_SYSTEMS + GPU_SYSTEMS)}")
    return cfg, settings
