"""Bad streamed datasets stop `launch/train.py` before anything is written: one error line on stderr,
exit 2, no run directory. The driver finds them without loading the dataset (train/feed.check_stream:
the listing, the Parquet metadata, and the images of the normalisation sample -- here all of them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from layerpar.train.loop import cli_main
from tests.imagefolder import make_tree
from tests.unit.test_streaming_check import to_parquet

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def args(root, out, *sets: str, fmt: str = "folder") -> list[str]:
    base = ["data.name=folder", f"data.root={root}", "data.streaming=true", f"data.format={fmt}",
            "model.num_classes=3", "model.image_size=8", "model.patch_size=4", "train.batch_size=5",
            "train.epochs=1", "parallel.workers=0", *sets]
    return ["--config", "tiny", "--out-dir", str(out), "--quiet", *[a for s in base for a in ("--set", s)]]


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "imgs", per_class=6, test_per_class=2, side=10)


def fails(capsys, argv, match: str) -> None:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert match in err, err


def test_unreadable_image(capsys, tree, tmp_path):
    bad = tree / "train" / "square" / "002.png"
    bad.write_bytes(b"\x89PNG, cut short")
    fails(capsys, args(tree, tmp_path / "out"), f"{bad} is not a readable image")
    assert not (tmp_path / "out").exists()  # nothing written


def test_empty_class_folder(capsys, tree, tmp_path):
    (tree / "train" / "empty").mkdir()
    fails(capsys, args(tree, tmp_path / "out"), f"class folder {tree / 'train' / 'empty'} holds no images")
    assert not (tmp_path / "out").exists()


def test_parquet_without_label_column(capsys, tree, tmp_path):
    pq_root = to_parquet(tree, tmp_path / "pq", label=False)
    fails(capsys, args(pq_root, tmp_path / "out", fmt="parquet"), "has no 'label' column")
    assert not (tmp_path / "out").exists()


def test_smaller_than_one_batch_per_replica_exits_2_from_launch_train(tree, tmp_path):
    """The real command line, in a subprocess: 18 training images, batches of 64 over 2 replicas."""
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"),
                           *args(tree, tmp_path / "out", "train.batch_size=64", "parallel.workers=1",
                                 "parallel.replicas=2")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and err.startswith("error: ") and "fewer than one batch" in err, err
    assert proc.stdout == "" and not (tmp_path / "out").exists()
