"""The streamed dataset's driver-side check (no pixels decoded), its plan of rows and draws, and
make_folder; no Ray here (tests/ray/test_streaming.py runs the Ray Data reader)."""

from __future__ import annotations

import gzip

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from layerpar.config import Config
from layerpar.data import DataError, batches, load_dataset
from layerpar.data.folder import load_folder
from layerpar.data.streaming import StreamingSource, check_dataset
from layerpar.data.streaming_catalog import channel_stats, read_rows
from tests.imagefolder import CLASSES, make_tree


def stream_cfg(root, *, fmt="folder", batch=5, **data):
    return Config().replace(
        data={"name": "folder", "root": str(root), "val_fraction": 0.25, "streaming": True, "format": fmt,
              **data},
        model={"image_size": 8, "num_classes": 3, "patch_size": 4}, train={"batch_size": batch})


def to_parquet(tree, out, *, files=2, group=4, label=True, seed=0):
    """The images of a folder tree as Parquet files of (PNG bytes, label), rows shuffled."""
    for split in ("train", "test"):
        rows = [(p.read_bytes(), c) for c, name in enumerate(CLASSES)
                for p in sorted((tree / split / name).iterdir())]
        rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
        (out / split).mkdir(parents=True)
        for f, part in enumerate(np.array_split(np.arange(len(rows)), files)):
            cols = {"image": pa.array([rows[i][0] for i in part], pa.binary())}
            if label:
                cols["label"] = pa.array([rows[i][1] for i in part], pa.int64())
            table = pa.table(cols).replace_schema_metadata({b"classes": b'["circle", "square", "stripe"]'})
            pq.write_table(table, out / split / f"part-{f}.parquet", row_group_size=group)
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("imgs"), per_class=12, test_per_class=4, side=12)


def test_check_reads_classes_and_split_sizes_without_decoding(tree):
    cat = check_dataset(stream_cfg(tree), replicas=2)
    mem = load_dataset(stream_cfg(tree))
    assert cat.classes == list(CLASSES) == mem.classes
    assert {k: len(v) for k, v in cat.rows.items()} == {"train": len(mem.train), "val": len(mem.val),
                                                         "test": len(mem.test)}
    assert cat.labels[cat.rows["test"]].tolist() == mem.test.y.tolist()


def test_stats_are_the_in_memory_constants(tree):
    raw = load_folder(str(tree), channels=1, side=8, seed=0)
    assert channel_stats(check_dataset(stream_cfg(tree)), 10_000) == (raw.mean, raw.std)  # bit for bit
    mean, std = channel_stats(check_dataset(stream_cfg(tree)), 5)  # a sample: close, not equal
    assert abs(mean[0] - raw.mean[0]) < 0.1 and std[0] > 0


def test_plan_is_the_in_memory_order_and_reads_the_same_images(tree):
    cfg = stream_cfg(tree)
    src = StreamingSource(cfg, "train")
    mem = load_dataset(cfg)
    plan = src.plan(epoch=3)
    want = list(batches(mem.train, 5, seed=0, epoch=3))
    assert plan.sizes == [len(y) for _, y in want]
    assert torch.equal(torch.from_numpy(src.catalog.labels[plan.rows]), torch.cat([y for _, y in want]))
    x = torch.from_numpy(read_rows(src.catalog, plan.rows[:5]).astype(np.float32))
    x.mul_(1 / 255).sub_(src.mean[0]).div_(src.std[0])
    assert torch.equal(x, want[0][0])


def test_replica_plans_are_disjoint_shares_of_every_batch(tree):
    cfg = stream_cfg(tree, augment="flip_crop")
    whole = StreamingSource(cfg, "train").plan(epoch=1)
    shares = [StreamingSource(cfg, "train", r, 2).plan(epoch=1) for r in range(2)]
    assert set(shares[0].rows).isdisjoint(shares[1].rows)
    assert sorted(np.concatenate([s.rows for s in shares])) == sorted(whole.rows)
    start = [np.cumsum([0] + s.sizes) for s in shares]
    pairs = list(zip(shares, start, strict=True))
    glued = np.concatenate([np.concatenate([s.rows[a[k]:a[k + 1]] for s, a in pairs])
                            for k in range(len(whole.sizes))])
    assert glued.tolist() == whole.rows.tolist()  # replica 0's rows then replica 1's, batch by batch
    for part in ("val", "test"):
        split = [StreamingSource(cfg, part, r, 2).plan(0).rows for r in range(2)]
        assert np.concatenate(split).tolist() == StreamingSource(cfg, part).plan(0).rows.tolist()


def test_plan_is_seeded_and_resumes_where_it_stopped(tree):
    cfg = stream_cfg(tree, augment="flip_crop")
    a, b = (StreamingSource(cfg, "train", 1, 2).plan(epoch=2) for _ in range(2))
    assert a.rows.tolist() == b.rows.tolist() and np.array_equal(a.shift, b.shift)
    assert StreamingSource(cfg, "train").plan(epoch=3).rows.tolist() != a.rows.tolist()
    rest = StreamingSource(cfg, "train", 1, 2).plan(epoch=2, start_batch=2)
    cut = sum(a.sizes[:2])
    assert rest.rows.tolist() == a.rows[cut:].tolist() and rest.sizes == a.sizes[2:]
    assert np.array_equal(rest.flip, a.flip[cut:]) and np.array_equal(rest.shift, a.shift[cut:])


def test_parquet_check_reads_labels_and_metadata_only(tree, tmp_path):
    root = to_parquet(tree, tmp_path / "pq")
    cat = check_dataset(stream_cfg(root, fmt="parquet"), replicas=2)
    assert cat.classes == list(CLASSES) and len(cat.rows["test"]) == 12
    assert len(cat.rows["train"]) + len(cat.rows["val"]) == 36
    plan = StreamingSource(stream_cfg(root, fmt="parquet"), "train").plan(epoch=0)
    assert sorted(plan.rows) == sorted(cat.rows["train"])


# ----------------------------------------------------------------------------- bad inputs


def test_empty_class_folder_is_named(tree, tmp_path):
    root = make_tree(tmp_path / "imgs", per_class=6, test_per_class=2)
    (root / "train" / "extra").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/extra holds no images"):
        check_dataset(Config().replace(data={"name": "folder", "root": str(root), "streaming": True},
                                       model={"image_size": 8, "num_classes": 4, "patch_size": 4},
                                       train={"batch_size": 4}))


def test_parquet_without_label_column_is_named(tree, tmp_path):
    root = to_parquet(tree, tmp_path / "pq", label=False)
    with pytest.raises(DataError, match=r"part-0\.parquet has no 'label' column"):
        check_dataset(stream_cfg(root, fmt="parquet"))


def test_parquet_class_without_rows_is_named(tree, tmp_path):
    root = to_parquet(tree, tmp_path / "pq")
    for f in (root / "train").glob("*.parquet"):  # no row of class 2 ('stripe') left in train
        table = pq.read_table(f)
        pq.write_table(table.filter(pa.array(table.column("label").to_numpy() != 2)), f)
    with pytest.raises(DataError, match=r"train: class 'stripe' \(label 2\) has no rows"):
        check_dataset(stream_cfg(root, fmt="parquet"))


@pytest.mark.parametrize("batch,replicas,words", [
    (40, 1, r"train split has 27 images, fewer than one batch \(train.batch_size=40\)"),
    (5, 16, r"val split has 9 images, fewer than one per replica \(parallel.replicas=16\)"),
])
def test_dataset_smaller_than_a_batch_per_replica(tree, batch, replicas, words):
    with pytest.raises(DataError, match=words):
        check_dataset(stream_cfg(tree, batch=batch), replicas=replicas)


def test_unreadable_image_is_named(tmp_path):
    root = make_tree(tmp_path / "imgs", per_class=6, test_per_class=2)
    bad = root / "train" / "square" / "002.png"
    bad.write_bytes(b"not a png")
    cat = check_dataset(stream_cfg(root, batch=2))  # listing only: the check does not open images
    with pytest.raises(DataError, match=rf"{bad} is not a readable image"):
        channel_stats(cat, 100)


def test_missing_root_and_config_rules(tmp_path):
    with pytest.raises(DataError, match="not found or has no train/ directory"):
        check_dataset(stream_cfg(tmp_path / "nowhere"))
    from layerpar.config import from_dict
    from layerpar.config_rules import ConfigError

    with pytest.raises(ConfigError, match="data.format"):
        from_dict({"data": {"name": "folder", "format": "tfrecord", "streaming": True}})
    with pytest.raises(ConfigError, match="needs data.name=folder"):
        from_dict({"data": {"name": "digits", "streaming": True}})
    with pytest.raises(ConfigError, match="set data.streaming=true"):
        from_dict({"data": {"name": "folder", "format": "parquet"}})


# ----------------------------------------------------------------------------- make_folder


def _idx(path, arr):
    header = b"\x00\x00\x08" + bytes([arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fashion(tmp_path):
    """A 24 + 12 image stand-in for the Fashion-MNIST IDX files."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for stem, n in (("train", 24), ("t10k", 12)):
        _idx(src / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(src / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return src


def test_make_folder_writes_folder_and_parquet_copies(fashion, tmp_path, capsys):
    from layerpar.data.make_folder import class_dirs, main

    out = tmp_path / "fm"
    assert main([str(out), "--source", str(fashion), "--copies", "2", "--limit", "18"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == class_dirs()
    assert len(list(out.glob("train/*/*.png"))) == 36 and len(list(out.glob("test/*/*.png"))) == 3
    from PIL import Image

    a, b = (np.asarray(Image.open(out / "train" / class_dirs()[0] / f"000000-0{c}.png")) for c in range(2))
    assert a.shape == b.shape == (28, 28) and not np.array_equal(a, b)  # copy 01 is augmented
    cfg = Config().replace(data={"name": "folder", "root": str(out), "val_fraction": 0.0},
                           model={"num_classes": 10, "image_size": 28, "patch_size": 4})
    assert load_dataset(cfg).classes == class_dirs()  # the in-memory reader reads it
    pq_out = tmp_path / "fm-pq"
    assert main([str(pq_out), "--source", str(fashion), "--format", "parquet", "--rows-per-file", "10"]) == 0
    assert len(list((pq_out / "train").glob("*.parquet"))) == 3
    cat = check_dataset(Config().replace(data={"name": "folder", "root": str(pq_out), "streaming": True,
                                               "format": "parquet", "val_fraction": 0.0},
                                         model={"num_classes": 10, "image_size": 28, "patch_size": 4},
                                         train={"batch_size": 8}))
    assert cat.classes[0] == "T-shirt/top" and len(cat.rows["train"]) == 24
    assert main([str(out), "--source", str(fashion)]) == 2  # never over a non-empty directory
    assert "exists and is not an empty directory" in capsys.readouterr().err
