"""A small image-folder tree of generated PNGs (data.name: folder), for the data and Ray Train tests.

Each class is a fixed random pattern plus noise, so a tiny model learns it in a few epochs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "stripe")


def make_tree(root: Path, *, per_class: int = 16, test_per_class: int = 4, side: int = 12,
              mode: str = "L", seed: int = 0, with_test: bool = True) -> Path:
    """ROOT/train/<class>/NNN.png (and ROOT/test/... when with_test); returns ROOT."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    patterns = rng.integers(0, 256, size=(len(CLASSES), side, side, channels))
    splits = [("train", per_class)] + ([("test", test_per_class)] if with_test else [])
    for split, count in splits:
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = rng.integers(-40, 41, size=patterns[c].shape)
                pixels = np.clip(patterns[c] + noise, 0, 255).astype(np.uint8)
                img = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode)
                suffix = ".png" if i % 2 == 0 else ".jpg"  # both kinds a user has
                img.save(folder / f"{i:03d}{suffix}")
    return root
