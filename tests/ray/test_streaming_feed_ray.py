"""The streamed feed (layerpar/train/feed.py) in the training loop, one process and two gloo ranks:

- the leader-broadcast batches: two gloo ranks of one branch group, rank 0 reading with Ray Data
  (connected to this test's Ray) and broadcasting (comm.broadcast_batch), rank 1 never touching Ray,
  both get exactly the batches a one-process run draws (the in-memory batches and augmentation);
- a one-process streaming run ends at the in-memory run's weights bit for bit (R = 1: the same rows,
  draws and float32 operations), and its accuracies are the same;
- stopped mid-epoch by the time budget and resumed, it ends bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from layerpar.config import load_config
from layerpar.data import batches, load_dataset
from layerpar.data.augment import augment
from layerpar.parallel import process_group
from layerpar.train.feed import check_stream
from layerpar.train.loop import run_training
from tests.imagefolder import make_tree
from tests.raytrain.conftest import final_weights

pytestmark = pytest.mark.ray


def folder_cfg(root, *sets: str):
    """The tiny model on a 3-class image folder of 8x8 images, streamed, float64."""
    return load_config("tiny", ["data.name=folder", f"data.root={root}", "data.streaming=true",
                                "data.val_fraction=0.25", "data.read_parallelism=1", "model.num_classes=3",
                                "model.image_size=8", "model.patch_size=4", "model.dtype=float64",
                                "train.batch_size=5", "train.epochs=2", "data.augment=flip_crop",
                                "parallel.timeout_s=60", *sets])


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("feed") / "imgs", per_class=8, test_per_class=3, side=10)


def _rank(rank: int, world: int, port: int, root: str, address: str, out: str) -> None:
    torch.set_num_threads(1)
    from layerpar.parallel.comm import GroupComm
    from layerpar.parallel.layout import BranchLayout
    from layerpar.train.feed import StreamingFeed

    process_group.set_env(master_addr="127.0.0.1", master_port=port, rank=rank, world_size=world)
    process_group.init_from_env(timeout_s=60)
    cfg = folder_cfg(root, f"parallel.workers={world}")
    comm = GroupComm(BranchLayout(cfg.model.num_branches, world), None)
    stream = {"rows": None, "catalog": None, "stats": None}
    if rank == 0:  # the leader alone checks and reads the dataset, with Ray Data
        import ray

        ray.init(address=address, logging_level="WARNING")
        stream = check_stream(cfg)
    rows = comm.share_objects(stream["rows"])[0]
    feed = StreamingFeed(cfg, comm, rows=rows, catalog=stream["catalog"], stats=stream["stats"])
    got = {"train": list(feed.train_batches(1)), "resumed": list(feed.train_batches(1, 2)),
           "test": list(feed.eval_batches("test", 4)), "ray": __import__("ray").is_initialized()}
    torch.save(got, f"{out}/rank{rank}.pt")
    process_group.destroy()


def test_leader_broadcast_batches_equal_the_one_process_draw(local_ray, tree, tmp_path):
    address = local_ray.get_runtime_context().gcs_address
    mp.start_processes(_rank, args=(2, process_group.free_port(), str(tree), address, str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    cfg = folder_cfg(tree)
    mem = load_dataset(cfg)  # the one-process draw: the in-memory batches and augmentation
    want = [(augment(x, kind="flip_crop", seed=0, epoch=1, index=i), y)
            for i, (x, y) in enumerate(batches(mem.train, 5, seed=0, epoch=1))]
    want_test = list(batches(mem.test, 4, seed=0, epoch=0, shuffle=False))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["ray"] is (rank == 0)  # only the leader opened Ray (and a Ray Data stream)
        assert len(got["train"]) == len(want) == 4 and len(got["resumed"]) == 2
        for (x, y, share), (wx, wy) in zip(got["train"], want, strict=True):
            assert torch.equal(x, wx) and torch.equal(y, wy) and share == (len(wy), 0)
        for (x, y, _), (wx, wy) in zip(got["resumed"], want[2:], strict=True):
            assert torch.equal(x, wx) and torch.equal(y, wy)
        assert len(got["test"]) == len(want_test)
        for (x, y), (wx, wy) in zip(got["test"], want_test, strict=True):
            assert torch.equal(x, wx) and torch.equal(y, wy)


@pytest.fixture(scope="module")
def streamed(local_ray, tree, tmp_path_factory):
    return run_training(folder_cfg(tree), tmp_path_factory.mktemp("s") / "run", progress=False)


def test_one_process_streaming_equals_in_memory_bit_for_bit(one_thread, streamed, tree, tmp_path):
    mem = run_training(folder_cfg(tree, "data.streaming=false"), tmp_path / "mem", progress=False)
    assert streamed["steps"] == mem["steps"] == 2 * 4
    want, got = final_weights(mem), final_weights(streamed)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for key in ("test_accuracy", "val_accuracy", "prefix_accuracy"):
        assert streamed[key] == mem[key], key
    # the streamed evaluation adds its rows' (float32) losses in float64, evaluate() per batch in float32
    assert streamed["test_loss"] == pytest.approx(mem["test_loss"], abs=1e-6)


def test_stopped_mid_epoch_and_resumed_streaming_is_bit_identical(one_thread, streamed, tree, tmp_path):
    # a budget of ~0: the one-process loop looks at the clock after every batch, so it stops after
    # the first batch of epoch 0 and saves a mid-epoch checkpoint
    first = run_training(folder_cfg(tree, "train.max_minutes=0.000001"), tmp_path / "run", progress=False)
    assert first["stopped_early"] and first["steps"] == 1
    record = json.loads((Path(first["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["epoch"] == 0 and record["epoch_batches"] == 1
    done = run_training(folder_cfg(tree), tmp_path / "run", progress=False)  # resumes at (0, 1)
    assert done["steps"] == streamed["steps"] and not done["stopped_early"]
    want, got = final_weights(streamed), final_weights(done)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert done["test_accuracy"] == streamed["test_accuracy"]
