"""The Para-Former lifecycle: importing the authors' weights, compression to a prefix model, expansion.

    .venv/bin/python -m pytest -q tests/unit/test_lifecycle.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from layerpar.config import load_config
from layerpar.lifecycle import LifecycleError, compress, expand, import_reference
from layerpar.model import ParaFormer
from layerpar.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    model_state,
    save_checkpoint,
    split_pieces,
)

pytestmark = pytest.mark.unit

# ----------------------------------------------------------------------------- the reference model
# The authors' ParaFormer (DUAT-Maker/Shallow-Paraformer, models/ParaFormer.py) re-stated in plain
# torch from its key names and forward pass: built here, independently of layerpar's model code.


def reference_state(*, branches=3, depth=2, dim=24, dim_head=8, mlp=32, patch=2, channels=1, image=8,
                    classes=5, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=g)

    heads, inner = 3, 3 * dim_head  # Attention(dim, heads=3, dim_head): inner_dim = dim_head * heads
    (ih, iw), (ph, pw) = (t if isinstance(t, tuple) else (t, t) for t in (image, patch))  # pair()
    patch_dim, tokens = channels * ph * pw, (ih // ph) * (iw // pw) + 1
    sd = {
        "to_patch_embedding.1.weight": rnd(dim, patch_dim), "to_patch_embedding.1.bias": rnd(dim),
        "pos_embedding": rnd(1, tokens, dim, scale=1.0), "cls_token": rnd(1, 1, dim, scale=1.0),
        "mlp_head.0.weight": rnd(dim, mean=1.0), "mlp_head.0.bias": rnd(dim),
        "mlp_head.1.weight": rnd(classes, dim), "mlp_head.1.bias": rnd(classes),
    }
    for b in range(branches):
        for d in range(depth):
            br = f"paraformerbranches.branches.{b}."
            a, f = f"{br}{2 * d}.", f"{br}{2 * d + 1}."
            sd.update({
                a + "norm.weight": rnd(dim, mean=1.0), a + "norm.bias": rnd(dim),
                a + "fn.to_qkv.weight": rnd(inner * heads, dim),  # Linear(dim, inner_dim * heads, bias=False)
                a + "fn.to_out.0.weight": rnd(dim, inner), a + "fn.to_out.0.bias": rnd(dim),
                f + "norm.weight": rnd(dim, mean=1.0), f + "norm.bias": rnd(dim),
                f + "fn.net.0.weight": rnd(mlp, dim), f + "fn.net.0.bias": rnd(mlp),
                f + "fn.net.3.weight": rnd(dim, mlp), f + "fn.net.3.bias": rnd(dim),
            })
    return sd


def reference_forward(sd, img, *, patch, pool="cls", heads=3) -> torch.Tensor:
    """The reference forward, step by step in its own arithmetic."""
    b, c, height, width = img.shape
    # Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)'), spelled out patch by patch
    rows = []
    for i in range(height // patch):
        for j in range(width // patch):
            cell = img[:, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]  # (b, c, p1, p2)
            rows.append(cell.permute(0, 2, 3, 1).reshape(b, -1))  # (p1 p2 c)
    x = torch.stack(rows, dim=1) @ sd["to_patch_embedding.1.weight"].T + sd["to_patch_embedding.1.bias"]
    n = x.shape[1]
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1)
    x = x + sd["pos_embedding"][:, : n + 1]

    def ln(h, key):
        return F.layer_norm(h, h.shape[-1:], sd[key + "norm.weight"], sd[key + "norm.bias"])

    def attention(h, key):  # PreNorm(Attention): to_out(attn(LN(h))) + LN(h)
        h = ln(h, key)
        q, k, v = (h @ sd[key + "fn.to_qkv.weight"].T).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        dots = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        out = (dots.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, h.shape[1], -1)
        return out @ sd[key + "fn.to_out.0.weight"].T + sd[key + "fn.to_out.0.bias"] + h

    def feed_forward(h, key):  # PreNorm(FeedForward): net(LN(h)) + LN(h)
        h = ln(h, key)
        hidden = F.gelu(h @ sd[key + "fn.net.0.weight"].T + sd[key + "fn.net.0.bias"])
        return hidden @ sd[key + "fn.net.3.weight"].T + sd[key + "fn.net.3.bias"] + h

    branch_ids = sorted({int(k.split(".")[2]) for k in sd if k.startswith("paraformerbranches.")})
    outputs = []
    for br in branch_ids:
        h, sub = x, 0
        while f"paraformerbranches.branches.{br}.{sub}.norm.weight" in sd:
            key = f"paraformerbranches.branches.{br}.{sub}."
            h = attention(h, key) if sub % 2 == 0 else feed_forward(h, key)
            sub += 1
        outputs.append(h)
    x = torch.sum(torch.stack(outputs), dim=0)  # the sum over branches, then pooling
    x = x.mean(dim=1) if pool == "mean" else x[:, 0]
    x = F.layer_norm(x, x.shape[-1:], sd["mlp_head.0.weight"], sd["mlp_head.0.bias"])
    return x @ sd["mlp_head.1.weight"].T + sd["mlp_head.1.bias"]


def load_model(run_dir) -> ParaFormer:
    ckpt = load_checkpoint(run_dir)
    model = ParaFormer(ckpt.config.model)
    model.load_state_dict(model_state(ckpt), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("shape", [
    dict(),                                              # dim 24 = 3 heads x 8
    dict(dim=20, dim_head=6, channels=3, patch=4, image=12, branches=2, depth=1),  # heads*dim_head != dim
])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_import_matches_reference_forward(tmp_path, shape, pool):
    sd = reference_state(**shape)
    torch.save(sd, tmp_path / "ref.pt")
    report = import_reference(tmp_path / "ref.pt", tmp_path / "run", overrides=[f"model.pool={pool}"])
    m = report["model"]
    assert (m["heads"], m["branch_depth"], m["num_branches"]) == (3, shape.get("depth", 2),
                                                                  shape.get("branches", 3))
    assert (m["style"], m["qkv_bias"]) == ("reference", False)
    assert m["in_channels"] == shape.get("channels", 1) and m["image_size"] == shape.get("image", 8)

    model = load_model(tmp_path / "run")
    img = torch.randn(4, m["in_channels"], m["image_size"], m["image_size"],
                      generator=torch.Generator().manual_seed(1))
    expected = reference_forward(sd, img, patch=m["patch_size"], pool=pool)
    with torch.no_grad():
        for fused in (True, False):
            torch.testing.assert_close(model(img, fused=fused), expected, atol=1e-5, rtol=0)
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_import_unwraps_checkpoint_dicts(tmp_path):
    sd = reference_state(branches=1, depth=1)
    wrapped = {"net": {"module." + k: v for k, v in sd.items()}, "acc": 91.5, "epoch": 300}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    report = import_reference(tmp_path / "ckpt.pt", tmp_path / "run", num_classes=5)
    assert report["model"]["num_branches"] == 1 and report["params"] == sum(t.numel() for t in sd.values())


def test_import_rejects_mismatched_state_dict(tmp_path):
    sd = reference_state(branches=2, depth=1)
    del sd["paraformerbranches.branches.1.1.fn.net.3.bias"]
    sd["paraformerbranches.branches.1.1.fn.extra.weight"] = torch.zeros(3)
    sd["stray"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(LifecycleError) as err:
        import_reference(tmp_path / "bad.pt", tmp_path / "run")
    msg = str(err.value)
    assert "missing keys: paraformerbranches.branches.1.1.fn.net.3.bias" in msg
    assert "unexpected keys:" in msg and "stray" in msg and "fn.extra.weight" in msg
    assert not (tmp_path / "run").exists()

    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pt")  # not the layout at all
    with pytest.raises(LifecycleError, match=r"missing keys: .*cls_token.*unexpected keys: foo.weight"):
        import_reference(tmp_path / "other.pt", tmp_path / "run")


def test_import_rejects_inconsistent_heads_and_shapes(tmp_path):
    sd = reference_state(branches=1, depth=1)
    sd["paraformerbranches.branches.0.0.fn.to_qkv.weight"] = torch.zeros(4 * 24, 24)  # 4 "heads"
    torch.save(sd, tmp_path / "heads.pt")
    with pytest.raises(LifecycleError, match="3 heads"):
        import_reference(tmp_path / "heads.pt", tmp_path / "run")
    sd = reference_state(branches=1, depth=1)
    sd["mlp_head.0.weight"] = torch.ones(7)
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(LifecycleError, match=r"mlp_head.0.weight has shape \(7,\)"):
        import_reference(tmp_path / "shape.pt", tmp_path / "run2")
    torch.save(reference_state(branches=1, depth=1), tmp_path / "good.pt")
    with pytest.raises(LifecycleError, match="predicts 5 classes"):
        import_reference(tmp_path / "good.pt", tmp_path / "run3", num_classes=10)


def test_import_refuses_pickled_code(tmp_path):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # a pickled module object
    with pytest.raises(LifecycleError, match="weights_only=True"):
        import_reference(tmp_path / "module.pt", tmp_path / "run")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The console script in its own process: exit code, stdout and stderr as a person sees them."""
    return subprocess.run([sys.executable, "-m", "layerpar.cli", "import-reference", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_import_empty_file_is_one_sentence_exit_2(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    proc = run_cli(tmp_path / "empty.pt", "--out", tmp_path / "run")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "is empty (0 bytes)" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_import_report_states_the_pool_it_assumed(tmp_path):
    sd = reference_state(branches=2, depth=1)
    torch.save(sd, tmp_path / "mean.pt")  # trained with pool="mean": nothing in the tensors says so
    report = import_reference(tmp_path / "mean.pt", tmp_path / "guessed")
    assert report["pool"] == "cls"
    note = report["assumed"]["pool"]
    assert "layerpar's default" in note and "cannot be inferred" in note
    assert "--set model.pool=mean" in note

    report = import_reference(tmp_path / "mean.pt", tmp_path / "named", overrides=["model.pool=mean"])
    assert report["pool"] == "mean" and "from --set model.pool=mean" in report["assumed"]["pool"]
    img = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the named pool gives the authors' logits; the guess does not
        torch.testing.assert_close(load_model(tmp_path / "named")(img),
                                   reference_forward(sd, img, patch=2, pool="mean"), atol=1e-5, rtol=0)
        assert not torch.allclose(load_model(tmp_path / "guessed")(img),
                                  reference_forward(sd, img, patch=2, pool="mean"), atol=1e-3)
    assert import_reference(tmp_path / "mean.pt", tmp_path / "cfg", config="digits")["pool"] == "mean"


def test_import_takes_the_common_reading_and_names_the_other(tmp_path):
    # 64 values per patch = 1 channel in 8x8 = 4 channels in 4x4: grey is the common reading, taken
    # and said; RGBA takes a flag
    sd = reference_state(channels=4, patch=4, image=32, branches=1, depth=1)
    torch.save(sd, tmp_path / "rgba.pt")
    report = import_reference(tmp_path / "rgba.pt", tmp_path / "grey")
    m, said = report["model"], report["assumed"]["geometry"]
    assert (m["in_channels"], m["patch_size"], m["image_size"]) == (1, 8, 64)  # the same 8x8 grid
    assert "the common reading: grey" in said
    assert "4 channels in 4x4 patches (32x32 images) also fits the same tensors: pass --channels 4" in said

    proc = run_cli(tmp_path / "rgba.pt", "--out", tmp_path / "run", "--channels", "4")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)["model"]
    assert (m["in_channels"], m["image_size"], m["patch_size"]) == (4, 32, 4)
    img = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "run")(img), reference_forward(sd, img, patch=4),
                                   atol=1e-5, rtol=0)
    for hint in (["model.in_channels=4"], ["model.image_size=32"], ["model.patch_size=4"]):
        assert import_reference(tmp_path / "rgba.pt", tmp_path / hint[0], overrides=hint)["model"][
            "in_channels"] == 4
    with pytest.raises(LifecycleError, match=r"--channels 4 and data.name=digits \(1 channel\) disagree"):
        import_reference(tmp_path / "rgba.pt", tmp_path / "r2", in_channels=4, overrides=["data.name=digits"])
    with pytest.raises(LifecycleError, match="--channels 3 does not fit the weights"):
        import_reference(tmp_path / "rgba.pt", tmp_path / "r3", in_channels=3)


def test_import_the_authors_fashion_mnist_geometry_unaided(tmp_path):
    # their Fashion-MNIST run: grey 224 px in 16x16 patches (256 values = also 4 channels in 8x8)
    sd = reference_state(channels=1, patch=16, image=224, branches=1, depth=1, dim=12, dim_head=4, mlp=16)
    torch.save(sd, tmp_path / "fmnist.pt")
    proc = run_cli(tmp_path / "fmnist.pt", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    m = report["model"]
    assert (m["in_channels"], m["patch_size"], m["image_size"]) == (1, 16, 224)
    # the assumption is said, as the pool one is: in the report and on stderr
    assert "4 channels in 8x8 patches (112x112 images) also fits" in report["assumed"]["geometry"]
    assert "note: 1 channel(s), 16x16 patches, 224x224 images, from the tensors (the common reading: grey" \
        in proc.stderr
    img = torch.randn(2, 1, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "run")(img), reference_forward(sd, img, patch=16),
                                   atol=1e-5, rtol=0)


def test_import_refuses_what_no_common_reading_explains(tmp_path):
    # 2 channels in 4x4 patches: 32 values, neither a square nor three times one
    torch.save(reference_state(channels=2, patch=4, image=16, branches=1, depth=1), tmp_path / "two.pt")
    with pytest.raises(LifecycleError, match="no square patch of side >= 2 with 1 or 3 channels"):
        import_reference(tmp_path / "two.pt", tmp_path / "run")
    assert import_reference(tmp_path / "two.pt", tmp_path / "run", in_channels=2)["model"]["patch_size"] == 4


def test_import_grey_patches_read_from_a_named_dataset(tmp_path):
    torch.save(reference_state(channels=1, patch=4, image=16, branches=1, depth=1), tmp_path / "g.pt")
    report = import_reference(tmp_path / "g.pt", tmp_path / "unaided")  # grey 4x4, or RGBA 2x2
    assert (report["model"]["in_channels"], report["model"]["patch_size"]) == (1, 4)
    assert "4 channels in 2x2 patches" in report["assumed"]["geometry"]
    report = import_reference(tmp_path / "g.pt", tmp_path / "run", overrides=["data.name=fashion_mnist"])
    assert (report["model"]["in_channels"], report["model"]["patch_size"]) == (1, 4)
    assert "data.name=fashion_mnist" in report["assumed"]["geometry"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_import_refuses_weights_that_are_not_finite(tmp_path, bad):
    sd = reference_state(branches=2, depth=1)
    sd["paraformerbranches.branches.1.1.fn.net.0.weight"][3, 5] = bad
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(LifecycleError) as err:
        import_reference(tmp_path / "bad.pt", tmp_path / "run")
    msg = str(err.value)
    assert "paraformerbranches.branches.1.1.fn.net.0.weight holds 1 of 768 values that are not finite" in msg
    assert ("1 NaN, 0 infinite" if bad != bad else "0 NaN, 1 infinite") in msg
    assert not (tmp_path / "run").exists()


class _Shell:
    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


def test_import_names_a_blocked_pickled_callable(tmp_path):
    import pickle

    torch.save({**reference_state(branches=1, depth=1), "extra": _Shell()}, tmp_path / "evil.pt")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Shell(), protocol=4))  # a bare pickle
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(LifecycleError, match="holds a pickled callable os.system, which weights-only"):
            import_reference(tmp_path / name, tmp_path / "run")
        proc = run_cli(tmp_path / name, "--out", tmp_path / "run")
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert "this must never run" not in proc.stdout + proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert "refused: the file holds a pickled callable os.system, which weights-only loading blocks" \
            in proc.stderr, proc.stderr
        assert "corrupt" not in proc.stderr and "weights_only=False unless" in proc.stderr


@pytest.mark.parametrize("shape", [
    dict(image=(16, 8), patch=2),              # non-square image: a 8x4 grid
    dict(image=16, patch=(2, 4)),              # non-square patch: an 8x4 grid
    dict(image=(8, 16), patch=(1, 2)),         # square 8x8 grid, 2 values per patch
    dict(image=(16, 32), patch=(2, 4), channels=3),  # square grid, 24 = 3 * 2 * 4 values per patch
])
def test_import_refuses_non_square_models(tmp_path, shape):
    torch.save(reference_state(branches=1, depth=1, **shape), tmp_path / "ns.pt")
    with pytest.raises(LifecycleError, match="square") as err:
        import_reference(tmp_path / "ns.pt", tmp_path / "run")
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


def test_import_bad_files_say_what_they_are(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 16)
    with pytest.raises(LifecycleError, match="not a readable torch.save file") as err:
        import_reference(tmp_path / "garbage.pt", tmp_path / "run")
    assert "weights_only=False" not in str(err.value) and "will likely succeed" not in str(err.value)
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    with pytest.raises(LifecycleError, match="pickled Python objects") as err:
        import_reference(tmp_path / "module.pt", tmp_path / "run")
    assert "weights_only=False" not in str(err.value)
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(LifecycleError, match="is a directory"):
        import_reference(tmp_path / "dir.pt", tmp_path / "run")


# ----------------------------------------------------------------------------- compress


def write_random_run(path, overrides=()) -> tuple[ParaFormer, object]:
    cfg = load_config("tiny", ["model.num_branches=4", *overrides])
    model = ParaFormer(cfg.model, seed=3).eval()
    path.mkdir()
    save_checkpoint(path, split_pieces(model.state_dict()), config=cfg, step=7, epoch=1)
    return model, cfg


def test_compress_gives_the_prefix_model_exactly(tmp_path):
    source, cfg = write_random_run(tmp_path / "run", ["model.style=reference", "model.branch_depth=2"])
    report = compress(tmp_path / "run", branches=2, out=tmp_path / "k2", evaluate=False)
    small = load_model(tmp_path / "k2")
    assert small.branch_ids == [0, 1] and small.cfg.num_branches == 2
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(small(x), source(x, num_branches=2))
    ckpt = latest_checkpoint(tmp_path / "k2")
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == ["branch_000.safetensors", "branch_001.safetensors", "embed.safetensors",
                     "head.safetensors", "manifest.json"]
    assert report["params"] == sum(p.numel() for p in small.parameters()) < report["source_params"]
    assert 0 < report["bytes"] < report["source_weight_bytes"] + 10_000
    with pytest.raises(LifecycleError, match="must be in 1..4"):
        compress(tmp_path / "run", branches=5, out=tmp_path / "k5", evaluate=False)
    with pytest.raises(LifecycleError, match="already holds a checkpoint"):
        compress(tmp_path / "run", branches=1, out=tmp_path / "k2", evaluate=False)


def test_compress_reports_the_accuracy_kept(tmp_path):
    write_random_run(tmp_path / "run")
    report = compress(tmp_path / "run", branches=3, out=tmp_path / "k3")
    assert report["accuracy"] == report["source_prefix_accuracy"][2]  # the same model, the same data
    assert report["source_accuracy"] == report["source_prefix_accuracy"][-1]
    assert report["samples"] > 0 and report["dataset"] == "synthetic"
    json.dumps(report)


# ----------------------------------------------------------------------------- expand


def test_expand_keeps_earlier_prefixes_and_accuracy_on_digits(tmp_path):
    from layerpar.train.loop import run_training

    cfg = load_config("digits", [
        "parallel.workers=0", "model.dim=32", "model.heads=2", "model.mlp_dim=64",
        "model.num_branches=2", "model.patch_size=4", "train.epochs=3", "train.threads=1",
        "train.batch_size=64", "train.lr=0.003",
    ])
    trained = run_training(cfg, run_dir=tmp_path / "run", progress=False)
    source = load_model(tmp_path / "run")

    report = expand(tmp_path / "run", add=2, out=tmp_path / "grown", progress=False,
                    overrides=["train.epochs=3"])
    grown = load_model(tmp_path / "grown")
    assert grown.branch_ids == [0, 1, 2, 3] and report["old_weights_unchanged"] is True
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for k in (1, 2):  # every earlier prefix model: bit for bit
            assert torch.equal(grown(x, num_branches=k), source(x, num_branches=k))
        assert not torch.equal(grown(x), source(x))
    assert report["prefix_accuracy"][:2] == trained["prefix_accuracy"]
    assert report["source_accuracy"] == trained["test_accuracy"]
    assert report["accuracy"] >= trained["test_accuracy"], report
