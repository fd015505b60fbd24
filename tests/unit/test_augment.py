"""Training augmentation: seeded per batch (a resumed run sees the same images), shape-preserving,
and each image either itself or its mirror, shifted by at most CROP_PAD pixels."""

import pytest
import torch

from layerpar.config import ConfigError, load_config
from layerpar.data.augment import CROP_PAD, augment

pytestmark = pytest.mark.unit


def test_augment_is_seeded_per_batch_and_moves_pixels_only_as_allowed():
    x = torch.randn(64, 1, 12, 12)
    assert augment(x, kind="none", seed=0, epoch=0, index=0) is x
    a = augment(x, kind="flip_crop", seed=0, epoch=1, index=5)
    assert a.shape == x.shape and torch.equal(a, augment(x, kind="flip_crop", seed=0, epoch=1, index=5))
    assert not torch.equal(a, augment(x, kind="flip_crop", seed=0, epoch=1, index=6))
    f = augment(x, kind="flip", seed=3, epoch=0, index=0)
    mirrored = [torch.equal(f[i], x[i].flip(-1)) for i in range(64)]
    assert all(m or torch.equal(f[i], x[i]) for i, m in enumerate(mirrored)) and 10 < sum(mirrored) < 54
    p, side = CROP_PAD, 12
    for i in range(64):  # each crop's centre is some shift of the image or of its mirror
        centre = a[i, :, p:-p, p:-p]
        found = any(torch.equal(centre, src[:, dy:side - 2 * p + dy, dx:side - 2 * p + dx])
                    for src in (x[i], x[i].flip(-1))
                    for dy in range(2 * p + 1) for dx in range(2 * p + 1))
        assert found, i


def test_unknown_augmentation_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.augment \('rotate'\) must be one of none, flip, flip_crop"):
        load_config(None, ["data.augment=rotate"])
