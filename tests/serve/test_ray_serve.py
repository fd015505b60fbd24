"""The Ray Serve deployment (layerpar/serve/ray_serve.py) on a local Ray, through Serve's HTTP proxy on
127.0.0.1: answers equal the standalone server's; a SIGKILLed branch worker of a replica costs no
failed request and its group comes back; autoscaling goes 1 -> 2 replicas under load and back; the
project's Serve config validates and builds.

    .venv/bin/python -m pytest -q -s tests/serve/test_ray_serve.py
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("ray.serve")
import requests  # noqa: E402
from ray import serve  # noqa: E402

from layerpar.serve.ray_serve import DEPLOYMENT, build_app  # noqa: E402
from layerpar.serve.server import ServerThread  # noqa: E402
from tests.serve.oip_helpers import accuracy, digits_backend, digits_cfg  # noqa: E402

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
APP = "layerpar"
# Generous bounds for a loaded 2-core machine (as tests/serve/helpers.tiny_cfg).
SLOW = ["parallel.cpus_per_worker=0.5", "parallel.timeout_s=30", "parallel.placement_timeout_s=120",
        "parallel.heartbeat_s=30", "serve.health_interval_s=0.2"]
DEPLOY_S = 400.0  # engine start-ups (actors import torch) on a loaded box; only a hang exceeds it
ROWS = 8  # rows per request
QUIET = {"enable_access_log": False}  # thousands of requests: no line each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def infer_body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}]}


def infer(url: str, x: np.ndarray, timeout_s: float = 120.0) -> requests.Response:
    return requests.post(f"{url}/v2/models/layerpar/infer", json=infer_body(x), timeout=timeout_s)


def logits_of(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def replicas(app: str, state: str = "RUNNING") -> int:
    status = serve.status().applications.get(app)
    if status is None or DEPLOYMENT not in status.deployments:
        return 0
    return status.deployments[DEPLOYMENT].replica_states.get(state, 0)


def poll(condition, what: str, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"{what}: still not true after {timeout_s:g} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The digits Para-Former of the OIP tests (trained a few steps), saved once for this module."""
    backend, x, y = digits_backend()
    return backend.save(tmp_path_factory.mktemp("ray-serve-run"), epoch=1), x, y


@pytest.fixture(scope="module")
def proxy(ray_local):
    """Serve with its HTTP proxy on a free loopback port (no gRPC proxy); shut down after the module."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


HELD_BEFORE: set[str] = set()  # placement groups alive before the module's deployment


@pytest.fixture(scope="module")
def served(proxy, checkpoint):
    """One replica owning a group of 2 branch workers, serving the checkpoint through the proxy."""
    import ray

    path, x, y = checkpoint
    # placement groups other tests of this process hold (the serve tier's session engine, under
    # pytest-xdist), so that the test below counts only the ones this deployment made
    HELD_BEFORE.update(i for i, pg in ray.util.placement_group_table().items() if pg["state"] == "CREATED")
    serve.run(build_app({"checkpoint": str(path), "set": ["parallel.workers=2", *SLOW]}), name=APP,
              route_prefix="/", blocking=False, logging_config=QUIET)
    poll(lambda: replicas(APP) == 1 and requests.get(f"{proxy}/v2/health/ready", timeout=30).ok,
         "the deployment serves", DEPLOY_S)
    yield proxy, x, y
    serve.delete(APP)


def test_answers_equal_the_standalone_server(served):
    url, x, y = served
    with ServerThread(digits_cfg(), digits_backend()[0]) as standalone:
        rows = x[:64]
        for i in range(0, len(rows), ROWS):
            got = logits_of(infer(url, rows[i:i + ROWS]))
            want = logits_of(infer(standalone.server.http_url, rows[i:i + ROWS]))
            # 2 workers sum their branches in another order than one process: float rounding only
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            assert (got.argmax(-1) == want.argmax(-1)).all()
    meta = requests.get(f"{url}/v2/models/layerpar", timeout=30).json()
    assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8] and meta["outputs"][0]["shape"] == [-1, 10]
    assert accuracy(logits_of(infer(url, x[:128])), y[:128]) > 0.5  # trained, not chance (0.1)
    bad = requests.post(f"{url}/v2/models/nope/infer", json=infer_body(x[:1]), timeout=30)
    assert bad.status_code == 404 and "nope" in bad.json()["error"]  # the protocol's statuses, too
    bad = requests.post(f"{url}/v2/models/layerpar/infer", json={"inputs": [{"name": "input"}]}, timeout=30)
    assert bad.status_code == 400 and "shape" in bad.json()["error"]
    for method, path, status in (("GET", "/v2/models/layerpar/infer", 405), ("GET", "/v3", 404)):
        bad = requests.request(method, url + path, timeout=30)  # no such route: the protocol's JSON error
        assert bad.status_code == status and "Open Inference Protocol" in bad.json()["error"]


def test_tritonclient_through_serves_proxy(served):
    """tritonclient.http's defaults (the binary tensor extension) through Serve's ingress."""
    th = pytest.importorskip("tritonclient.http")
    url, x, _ = served
    client = th.InferenceServerClient(url.removeprefix("http://"), connection_timeout=60, network_timeout=120)
    assert client.is_server_ready() and client.is_model_ready("layerpar")
    given = th.InferInput("input", [ROWS, 1, 8, 8], "FP32")
    given.set_data_from_numpy(x[:ROWS])
    answer = client.infer("layerpar", [given], outputs=[th.InferRequestedOutput("logits", binary_data=True)])
    np.testing.assert_allclose(answer.as_numpy("logits"), logits_of(infer(url, x[:ROWS])), rtol=1e-6)
    assert answer.get_response()["parameters"]["branches_used"] == "0,1,2,3"


def test_workers_live_in_the_replicas_placement_group(served):
    import ray

    where = serve.get_deployment_handle(DEPLOYMENT, app_name=APP).placement.remote().result(timeout_s=60)
    assert where["replica"] and where["workers"] == where["replica"]  # Serve's group, not one of its own
    created = [pg for i, pg in ray.util.placement_group_table().items()
               if pg["state"] == "CREATED" and i not in HELD_BEFORE]
    assert [len(pg["bundles"]) for pg in created] == [3]  # the replica + 2 workers: no second group


def test_worker_sigkill_costs_no_failed_request(served):
    url, x, _ = served
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
    before = handle.worker_pids.remote().result(timeout_s=60)
    assert len(before) == 2
    statuses: list[int] = []
    stop = threading.Event()

    def client():  # one bounded client loop; no retries here (the deployment's engine recovers)
        i = 0
        while not stop.is_set() and len(statuses) < 3000:
            statuses.append(infer(url, x[i % 64:i % 64 + 1]).status_code)
            i += 1

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    poll(lambda: len(statuses) >= 5, "the client's first answers", 120)
    os.kill(before[1], signal.SIGKILL)
    killed_at = len(statuses)
    poll(lambda: (handle.worker_pids.remote().result(timeout_s=60) != before
                  and handle.serving.remote().result(timeout_s=60)), "the group comes back", DEPLOY_S)
    poll(lambda: len(statuses) >= killed_at + 20, "answers after the recovery", 300)
    stop.set()
    thread.join(180)
    assert statuses and set(statuses) == {200}, f"failed requests: {[s for s in statuses if s != 200]}"
    after = handle.worker_pids.remote().result(timeout_s=60)
    assert after[0] == before[0] and after[1] != before[1]  # only the killed rank was replaced
    assert replicas(APP) == 1  # the replica itself survived: the engine recovered inside it


def test_autoscaling_one_to_two_and_back(proxy, checkpoint):
    path, x, _ = checkpoint
    serve.delete(APP)  # one route prefix "/" at a time (the module's other app is done with it)
    app = build_app({"checkpoint": str(path), "set": [
        "parallel.workers=1", *SLOW, "serve.ray_min_replicas=1", "serve.ray_max_replicas=2",
        "serve.ray_target_ongoing_requests=1"],
        # Serve's defaults push metrics every 10 s and average them over 30 s: tens of seconds of
        # waiting each way. Pushed every 0.5 s over 2 s, the load (and its end) is seen in seconds.
        "autoscaling": {"upscale_delay_s": 1, "downscale_delay_s": 3, "metrics_interval_s": 0.5,
                        "look_back_period_s": 2}})
    serve.run(app, name="scaling", route_prefix="/", blocking=False, logging_config=QUIET)
    try:
        poll(lambda: replicas("scaling") == 1, "one replica runs", DEPLOY_S)
        stop, failures = threading.Event(), []

        def client():
            while not stop.is_set():
                r = infer(proxy, x[:32])
                if r.status_code != 200:
                    failures.append(r.status_code)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        try:  # 6 clients against a target of 1 ongoing request per replica: Serve adds the second
            poll(lambda: replicas("scaling") == 2, "scaled up to 2 replicas under load", DEPLOY_S)
        finally:
            stop.set()
            for t in threads:
                t.join(180)
        assert not failures, f"failed requests while scaling: {failures}"
        poll(lambda: replicas("scaling") == 1 and not replicas("scaling", "STOPPING"),
             "scaled back to 1 replica without load", DEPLOY_S)
    finally:
        serve.delete("scaling")


def test_serve_config_validates_and_builds():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "launch/configs/serve_app.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    assert config.http_options.host == "127.0.0.1"  # Serve's proxy on loopback unless told otherwise
    assert not raw.get("grpc_options", {}).get("grpc_servicer_functions")  # the gRPC proxy binds all
    (spec,) = config.applications
    assert spec.import_path == "layerpar.serve.ray_serve:app" and spec.route_prefix == "/"
    assert isinstance(build_app(dict(spec.args)), serve.Application)  # the args resolve to a deployment


def test_options_route_and_config_checks():
    from layerpar.config import ConfigError, load_config
    from layerpar.serve.ray_serve import REPLICA_CPUS, deployment_options, replica_config, route

    cfg = replica_config(load_config("tiny", ["parallel.workers=2", "parallel.cpus_per_worker=0.5",
                                              "serve.ray_max_replicas=3"]))
    assert cfg.parallel.placement_group == "current" and cfg.serve.host == "127.0.0.1"
    options = deployment_options(cfg, {"upscale_delay_s": 1})
    assert options["placement_group_bundles"] == [{"CPU": REPLICA_CPUS}, {"CPU": 0.5}, {"CPU": 0.5}]
    assert options["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in options
    fixed = deployment_options(replica_config(load_config("tiny", ["parallel.workers=1"])))
    assert fixed["num_replicas"] == 1 and "autoscaling_config" not in fixed
    assert isinstance(build_app({"config": "tiny", "set": "parallel.workers=1"}), serve.Application)  # CLI
    assert route("POST", "/v2/models/m/versions/1/infer")[1:] == ("infer", {"name": "m", "version": "1"}, 200)
    assert route("GET", "/v2/models/m/infer")[3] == 405 and route("GET", "/nope")[3] == 404
    with pytest.raises(ConfigError, match=r"serve.ray_max_replicas \(1\) must be >= serve.ray_min_replicas"):
        load_config("tiny", ["serve.ray_min_replicas=2"])
    with pytest.raises(ConfigError, match="parallel.placement_group"):
        load_config("tiny", ["parallel.placement_group=mine"])
    with pytest.raises(ValueError, match="parallel.replicas"):
        replica_config(load_config("tiny", ["parallel.workers=1", "parallel.replicas=2"]))


def test_current_placement_group_outside_one_is_one_sentence(ray_local):
    from layerpar.config import load_config
    from layerpar.runtime.placement import PlacementError, current_group_bundles

    cfg = load_config("tiny", ["parallel.workers=1", "parallel.placement_group=current"])
    with pytest.raises(PlacementError, match="runs in no placement group"):
        current_group_bundles(cfg.parallel)  # the driver is in none
