"""The engine on local Ray against the single-process model: outputs, checkpoints across layouts (of
a trained checkpoint: the engine does not train), what each worker holds, and bad input.

Parity runs in float64 (the algebra, to 1e-10) and float32 (a tolerance derived from the step size);
tests/parity.py states the rule and why."""

import gc
import warnings

import pytest
import torch

from layerpar.config import ConfigError, load_config
from layerpar.model import ParaFormer
from layerpar.runtime import Engine, PlacementError
from tests.parity import logits_atol

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_thread")]
N = 6


def make_cfg(workers: int, *extra: str, dtype: str = "float32"):
    return load_config(None, [f"model.num_branches={N}", "model.dim=32", "model.heads=2",
                              "model.mlp_dim=64", f"parallel.workers={workers}", "train.lr=1e-3",
                              f"model.dtype={dtype}", *extra])


def batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


# every pair of (workers, transport, dtype) values, in 6 engines instead of the 12 of the full product
# (an engine start is most of a case's cost; a defect of one value pair shows in the row holding it)
@pytest.mark.parametrize("workers,transport,dtype", [
    (1, "collective", "float64"), (1, "object_store", "float32"),
    (2, "collective", "float32"), (2, "object_store", "float64"),
    (3, "collective", "float64"), (3, "object_store", "float32"),
])
def test_infer_matches_single_process(local_ray, workers, transport, dtype):
    cfg = make_cfg(workers, f"parallel.transport={transport}", dtype=dtype)
    reference = ParaFormer(cfg.model, seed=cfg.train.seed).eval()
    x, _ = batch()
    atol = logits_atol(cfg)
    with Engine(cfg) as engine, torch.no_grad():
        got = engine.infer(x)
        assert got.dtype == reference(x).dtype
        torch.testing.assert_close(got, reference(x), atol=atol, rtol=0)
        for k in (1, 4):
            torch.testing.assert_close(engine.infer(x, num_branches=k), reference(x, k), atol=atol,
                                       rtol=0)
        torch.testing.assert_close(engine.prefix_logits(x)[2], reference(x, 3), atol=atol, rtol=0)
        assert set(engine.last_timings) >= {"broadcast", "embed", "compute", "reduce", "head",
                                            "dispatch", "total"}


@pytest.mark.parametrize("transport", ["collective", "object_store"])
def test_large_batches_travel_through_shared_memory(local_ray, transport):
    """Batches above the inline size reach same-node workers through a /dev/shm slot (grown for a
    larger batch, reused for the next call, unlinked at shutdown) and requests through the socket
    fast path, with the same logits; parallel.shared_memory=false sends everything through Ray."""
    cfg = make_cfg(2, f"parallel.transport={transport}")
    reference = ParaFormer(cfg.model, seed=cfg.train.seed).eval()
    with Engine(cfg) as engine, torch.no_grad():
        for n in (400, 5000, 400):  # 100 KB, 1.3 MB (a new, larger slot), 100 KB (a free slot)
            x, _ = batch(n, seed=n)
            torch.testing.assert_close(engine.infer(x), reference(x), atol=1e-5, rtol=0)
            assert engine.transport.fast_path_running  # same node: the socket fast path answered
            torch.testing.assert_close(engine.prefix_logits(x)[2], reference(x, 3), atol=1e-5, rtol=0)
            assert not engine.transport.fast_path_running  # ended: branch_outputs needs the default threads
        paths = engine.transport.slot_paths()
        assert len(paths) == 2 and all(p.exists() for p in paths)
    assert not any(p.exists() for p in paths)
    with Engine(make_cfg(2, "parallel.shared_memory=false")) as engine, torch.no_grad():
        x, _ = batch(400)
        torch.testing.assert_close(engine.infer(x), reference(x), atol=1e-5, rtol=0)
        assert engine.transport.slot_paths() == [] and not engine.transport.fast_path_running  # all via Ray


# float64 (the algebra) at every size and mode; float32 (the tolerance) on the largest group, as in the
# gloo and Ray Train tiers
# Training equals one process: proven where training runs, by the one training loop --
# tests/distributed/test_comm.py (gloo, W = 1..3, joint and progressive, float64) and
# tests/raytrain/test_raytrain_parity.py::test_five_batches_equal_single_process (Ray Train ranks).


def _live_tensors() -> dict[int, torch.Tensor]:
    """Every torch tensor alive in this (the driver's) process."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() touches deprecated torch module attributes
        warnings.simplefilter("ignore")
        return {id(o): o for o in gc.get_objects() if isinstance(o, torch.Tensor)}


def test_workers_hold_only_their_branches(local_ray):
    cfg = make_cfg(3)
    x, _ = batch()
    before = _live_tensors()
    with Engine(cfg) as engine:
        engine.infer(x)  # the driver has run the model once: it still holds no branch weights
        stats = engine.stats()
        new = [t for i, t in _live_tensors().items() if i not in before]
    full = ParaFormer(cfg.model)
    per_branch = sum(p.numel() for p in full.branch(0).parameters())
    replicated = sum(p.numel() for m in (full.embed, full.head) for p in m.parameters())
    assert [s["branch_ids"] for s in stats] == [[0, 1], [2, 3], [4, 5]]
    for s in stats:
        assert s["branches"] == 2 * per_branch
        assert s["replicated"] == replicated
    # The driver process holds no branch parameter: no tensor created while the engine ran has the
    # shape of one (the head's and the embedding's shapes differ), and together they hold less than
    # one branch.
    branch_shapes = {tuple(p.shape) for p in full.branch(0).parameters() if p.dim() == 2}
    assert branch_shapes and not any(tuple(t.shape) in branch_shapes for t in new)
    assert sum(t.numel() for t in new) < per_branch


def test_prefix_model_calls_only_the_owners(local_ray):
    with Engine(make_cfg(3)) as engine:
        x, _ = batch()
        engine.infer(x, num_branches=2)  # branches 0, 1: worker 0 only
        engine.infer(x, num_branches=3)  # branches 0..2: workers 0, 1
        calls = [s["calls"]["infer"] for s in engine.stats()]
    assert calls == [2, 1, 0]


def test_bad_input_is_refused_and_engine_keeps_working(local_ray):
    cfg = make_cfg(2)
    x, _ = batch()
    with Engine(cfg) as engine:
        with pytest.raises(ValueError, match=r"shape \(B, 1, 8, 8\)"):
            engine.infer(torch.zeros(2, 3, 8, 8))
        with pytest.raises(ValueError, match="dtype"):
            engine.infer(x.double())
        with pytest.raises(ValueError, match="num_branches"):
            engine.infer(x, num_branches=N + 1)
        reference = ParaFormer(cfg.model).eval()
        with torch.no_grad():
            torch.testing.assert_close(engine.infer(x), reference(x), atol=1e-5, rtol=0)


def test_more_workers_than_branches_is_a_config_error():
    with pytest.raises(ConfigError, match=r"parallel.workers \(7\) must be <= model.num_branches \(6\)"):
        make_cfg(7)


def test_unplaceable_request_fails_fast_with_a_message(local_ray):
    cfg = make_cfg(2, "parallel.cpus_per_worker=64", "parallel.placement_timeout_s=3")
    with pytest.raises(PlacementError, match=r"could not place 2 workers .*CPU.*64.* within 3s"):
        Engine(cfg)


def test_checkpoint_from_two_workers_loads_with_three_and_in_one_process(local_ray, tmp_path):
    from layerpar.train.local import LocalBackend

    x, y = batch()
    with LocalBackend(make_cfg(0), total_steps=20) as trained:  # moved weights: a trained checkpoint
        for _ in range(2):
            trained.train_step(x, y)
        first = trained.save(tmp_path / "trained", epoch=1)
    with Engine(make_cfg(2), checkpoint=first) as engine:  # written back by two workers
        path = engine.save(tmp_path / "ckpt", epoch=1)
        expected = engine.infer(x)
    with Engine(make_cfg(3), checkpoint=path) as engine:
        torch.testing.assert_close(engine.infer(x), expected, atol=1e-6, rtol=0)
        assert engine.info()["step"] == 2
    with LocalBackend(make_cfg(0), checkpoint=path) as local:
        torch.testing.assert_close(local.infer(x), expected, atol=1e-6, rtol=0)
