"""The order test files start in: the longest first (loaded by tests/conftest.py).

`make test` runs files on pytest-xdist workers with `--dist loadfile`: a worker takes the next file in
the queue when it is nearly done with its own. xdist's default queue is by test count, most first, so
the slowest files -- one or two tests each (`ray up` over ssh, the chaos drill, `ray job submit`) --
started last and one worker waited for the other at the end. Here the queue is longest first (the
longest-processing-time rule): a long file starts early, the short unit files fill the gaps at the end.

A file's cost, in seconds: COST below (rough figures of the quiet 2-core development machine), else
its test count times its tier's typical test (PER_TEST). It only orders the queue; nothing asserts on
it. Re-read COST from `make test`'s slowest-25 list when a file grows a slow test."""

from __future__ import annotations

COST = {  # seconds, whole file, quiet machine, 2 xdist workers (2026-12-07, 6fe2161)
    "tests/raytrain/test_raytrain_resume.py": 170,
    "tests/raytrain/test_raytrain_parity.py": 160,
    "tests/serve/test_ray_serve.py": 120,
    "tests/cluster/test_ray_submit.py": 135,
    "tests/raytrain/test_raytrain_restart.py": 100,
    "tests/bench/test_scale.py": 100,
    "tests/bench/test_train_sweep.py": 90,
    "tests/cluster/test_multinode.py": 85,
    "tests/cluster/test_train_sweep_address.py": 45,
    "tests/ray/test_engine.py": 60,
    "tests/raytrain/test_raytrain_tune.py": 55,
    "tests/raytrain/test_chaos_train.py": 50,
    "tests/cluster/test_cluster_utils.py": 20,
    "tests/cluster/test_job_submit.py": 45,
    "tests/serve/test_serve_worker_loss.py": 45,
    "tests/faults/test_stall.py": 40,
    "tests/faults/test_worker_loss.py": 40,
    "tests/serve/test_bad_input.py": 40,
    "tests/distributed/test_mesh.py": 20,
    "tests/distributed/test_mesh_timeout.py": 15,
    "tests/unit/test_precision.py": 60,  # a cold inductor cache (a fresh machine): its compile test
    # alone takes 20 s quiet, 40-90 s beside other tests; warm (/tmp/torchinductor_<user>) about 2 s
    "tests/distributed/test_comm.py": 25,
    "tests/raytrain/test_tune_cli.py": 30,
    "tests/raytrain/test_raytrain_folder.py": 26,
    "tests/faults/test_hang.py": 22,
    "tests/faults/test_properties.py": 22,
    "tests/serve/test_serve_promises.py": 22,
    "tests/cluster/test_cluster_configs.py": 5,  # 52 schema checks, no Ray
    "tests/bench/test_train_costmodel.py": 3,  # a fit, no Ray
    "tests/bench/test_netns.py": 5,  # skipped unless root; seconds when it runs
    "tests/faults/test_checkpoint_crash.py": 10,
    "tests/raytrain/test_raytrain_gpu.py": 2,  # skipped without a GPU
}
# seconds per test of a file not in COST, by tier: Ray Train runs, clusters, sweeps, engines, gloo groups
PER_TEST = {"raytrain": 20.0, "cluster": 15.0, "bench": 10.0, "faults": 10.0, "distributed": 8.0,
            "serve": 4.0, "ray": 4.0, "gpu": 1.0, "unit": 0.3}


def cost(path: str, tests: int) -> float:
    if path in COST:
        return COST[path]
    tier = path.split("/")[1] if path.count("/") >= 2 else ""
    return tests * PER_TEST.get(tier, 3.0)


def pytest_configure(config):
    # xdist's --loadscope-reorder (on by default) would sort the queue by test count again
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    """Files longest first; a file's tests stay together and in their order (a stable sort)."""
    counts: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        counts[path] = counts.get(path, 0) + 1
    items.sort(key=lambda item: -cost(p := item.nodeid.split("::", 1)[0], counts[p]))
