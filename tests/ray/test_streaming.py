"""The Ray Data reader (layerpar/data/streaming.py) against the in-memory path, on tiny image folders
and Parquet files: same batches, disjoint replica shares, seeded order, resume, unreadable files."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from layerpar.data import DataError, batches, load_dataset, streaming
from layerpar.data.augment import augment
from layerpar.data.streaming import StreamingSource
from tests.imagefolder import make_tree
from tests.unit.test_streaming_check import stream_cfg, to_parquet


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("stream")
    tree = make_tree(base / "imgs", per_class=12, test_per_class=4, side=12)
    return tree, to_parquet(tree, base / "pq")


def run(src: StreamingSource, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = list(src.batches(epoch, start))
    for x, y in out:
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8) and y.dtype == torch.int64
    return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
                                    for p, q in zip(a, b, strict=True))


def test_streamed_epoch_equals_the_in_memory_batches(local_ray, roots):
    tree, _ = roots
    for kind in ("none", "flip_crop"):
        cfg = stream_cfg(tree, augment=kind)
        mem = load_dataset(cfg)
        want = [(augment(x, kind=kind, seed=0, epoch=1, index=i), y)
                for i, (x, y) in enumerate(batches(mem.train, 5, seed=0, epoch=1))]
        assert same(run(StreamingSource(cfg, "train"), 1), want), kind
    test = run(StreamingSource(cfg, "test"), 0)  # not shuffled, never augmented
    assert same(test, list(batches(mem.test, 5, seed=0, epoch=0, shuffle=False)))


def test_replicas_read_disjoint_shares_and_resume_in_order(local_ray, roots, monkeypatch):
    tree, _ = roots
    monkeypatch.setattr(streaming, "MAX_BLOCK_ROWS", 1)  # one batch a block: many tasks, order kept
    cfg = stream_cfg(tree, augment="flip_crop")
    whole = run(StreamingSource(cfg, "train"), 2)
    shares = [run(StreamingSource(cfg, "train", r, 2), 2) for r in range(2)]
    glued = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*shares, strict=True)]
    assert same(glued, whole)  # each batch split between the replicas, nothing read twice
    again = run(StreamingSource(cfg, "train", 1, 2), 2)
    assert same(again, shares[1])  # the same seed and epoch: the same order and draws
    assert same(run(StreamingSource(cfg, "train", 1, 2), 2, start=3), shares[1][3:])  # resumed at batch 3


def test_parquet_epoch_covers_the_split_and_resumes(local_ray, roots):
    tree, pq_root = roots
    mem = load_dataset(stream_cfg(tree))
    src = StreamingSource(stream_cfg(pq_root, fmt="parquet"), "train")
    got = run(src, 0)
    x, y = torch.cat([b[0] for b in got]), torch.cat([b[1] for b in got])
    assert len(y) == len(src.catalog.rows["train"]) and len(got) == src.batches_per_epoch()
    # the Parquet rows hold the folder's files: each streamed image, with its label, is one of them
    # (normalised with the Parquet train split's own constants, so compare after undoing them)
    folder = {(int(c), tuple(r)) for c, r in zip(torch.cat([mem.train.y, mem.val.y]).tolist(),
              (torch.cat([mem.train.x, mem.val.x]) * mem_std(tree) + mem_mean(tree)).mul(255).round()
              .flatten(1).tolist(), strict=True)}
    streamed = (x * src.std[0] + src.mean[0]).mul(255).round().flatten(1).tolist()
    assert all((int(c), tuple(r)) in folder for c, r in zip(y.tolist(), streamed, strict=True))
    assert same(run(src, 0, start=2), got[2:])


def mem_mean(tree) -> float:
    from layerpar.data.folder import load_folder

    return load_folder(str(tree), channels=1, side=8, seed=0).mean[0]


def mem_std(tree) -> float:
    from layerpar.data.folder import load_folder

    return load_folder(str(tree), channels=1, side=8, seed=0).std[0]


def test_unreadable_image_is_one_error_naming_it(local_ray, tmp_path):
    root = make_tree(tmp_path / "imgs", per_class=6, test_per_class=2)
    src = StreamingSource(stream_cfg(root, batch=2), "train", stats=((0.5,), (0.25,)))
    cat = src.catalog  # the listing only: no image was opened
    bad = cat.reader().path(cat.file_of[cat.rows["train"][3]])
    with open(bad, "wb") as f:
        f.write(b"\x89PNG but truncated")
    with pytest.raises(DataError, match=rf"{bad} is not a readable image") as info:
        run(src, 0)
    assert "\n" not in str(info.value)
    # the failed read stopped Ray Data's execution, though the error (and its frames) are still held
    deadline = time.monotonic() + 60
    while any(t.name.startswith("StreamingExecutor") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "Ray Data kept executing after the reader failed"
        time.sleep(0.2)
