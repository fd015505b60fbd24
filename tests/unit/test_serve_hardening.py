"""Serving hardening without Ray or a server (issue 14): overflowing inputs, the token out of the
config, health_auth, bounded metrics labels, the weights-only load, the port checked first.

    .venv/bin/python -m pytest -q tests/unit/test_serve_hardening.py
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch

from layerpar.config import ConfigError, from_dict, load_config, save_config
from layerpar.model.overflow import InputOverflow, check_finite_logits
from layerpar.serve.auth import TOKEN_ENV, is_open, resolve_token
from layerpar.serve.launcher import check_port_free
from layerpar.serve.runner import BackendRunner
from layerpar.serve.server import METHOD_LABELS, method_label
from layerpar.train.checkpoint import CheckpointError, load_checkpoint, load_weights, manifest_config
from layerpar.train.local import LocalBackend

pytestmark = pytest.mark.unit


def overflowing() -> torch.Tensor:
    """Row 0: one pixel at 3e38; row 1: every pixel at 1e30 (both finite); row 2: ordinary."""
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x[0, 0, 2, 3] = 3e38
    x[1] = 1e30
    return x


def trained(cfg) -> LocalBackend:
    """Two steps, so that the checkpoint holds optimizer state (a fresh AdamW has none)."""
    backend = LocalBackend(cfg, total_steps=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        backend.train_step(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
    return backend


# ----------------------------------------------------------------------------- 2: overflow


def test_local_infer_refuses_rows_that_overflow_and_keeps_the_rest(tiny_cfg):
    backend = LocalBackend(tiny_cfg)
    x = overflowing()
    with pytest.raises(InputOverflow, match="overflow the model: row\\(s\\) 0, 1 of 3") as info:
        backend.infer(x)
    assert isinstance(info.value, ValueError) and info.value.rows == [0, 1]
    # the finite row of the same batch is a valid answer: equal to computing it alone
    torch.testing.assert_close(info.value.logits[2:], backend.infer(x[2:]), rtol=0, atol=1e-6)
    good = backend.infer(x[2:])
    assert check_finite_logits(good) is good


def test_runner_hands_back_every_row_instead_of_failing_the_batch(tiny_cfg):
    """The batcher merges requests: an overflowing row must not turn the whole engine call into a
    failure (retried, counted as a backend error, UNAVAILABLE for every batch-mate)."""
    errors = []
    runner = BackendRunner(LocalBackend(tiny_cfg), retries=1, on_error=lambda: errors.append(1))
    logits, _ = runner(overflowing(), None)
    assert logits.shape == (3, 4) and not errors
    assert not np.isfinite(logits[:2]).all(axis=1).any() and np.isfinite(logits[2]).all()


# ----------------------------------------------------------------------------- 6: the token


def test_the_token_is_no_config_value(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=f"serve.token is no longer a config value.*{TOKEN_ENV}"):
        load_config("tiny", ["serve.token=s3cret"])
    old = tiny_cfg.to_dict()
    old["serve"]["token"] = None  # every run file written before: still loads
    cfg = from_dict(old)
    assert "token" not in cfg.to_dict()["serve"]
    assert "token:" not in save_config(cfg, tmp_path).read_text()


def test_a_manifest_with_a_stored_token_loads_without_it(tiny_cfg):
    raw = tiny_cfg.to_dict()
    raw["serve"]["token"] = "leaked"
    cfg = manifest_config({"config": raw})
    assert "leaked" not in json.dumps(cfg.to_dict())


def test_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert resolve_token(None) is None
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert resolve_token(None) == "from-env"
    file = tmp_path / "token"
    file.write_text("from-file\n")
    assert resolve_token(str(file)) == "from-file"
    with pytest.raises(ValueError, match="serve.token_file .* cannot be read"):
        resolve_token(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_token(str(tmp_path / "empty"))


def test_metrics_bind_loopback_unless_told_otherwise(tiny_cfg):
    cfg = tiny_cfg.replace(serve={"host": "0.0.0.0"})
    assert cfg.serve.metrics_host == "127.0.0.1"


# ----------------------------------------------------------------------------- 4, 7: auth and labels


def test_health_auth_is_open_by_default_and_checked():
    cfg = load_config("tiny")
    assert cfg.serve.health_auth == "open"
    with pytest.raises(ConfigError, match="serve.health_auth .* must be one of open, token"):
        load_config("tiny", ["serve.health_auth=maybe"])
    assert is_open("/grpc.health.v1.Health/Check") and is_open("/grpc.health.v1.Health/Watch")
    assert is_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not is_open("/layerpar.v1.Inference/Predict") and not is_open("/layerpar.v1.Inference/ModelInfo")
    assert not is_open("/grpc.health.v1.Healthy/Check")


def test_metrics_labels_are_bounded():
    assert method_label("/layerpar.v1.Inference/Predict") == "Predict"
    assert method_label("/grpc.health.v1.Health/Check") == "Check"
    assert {method_label(f"/made.up.Service{i}/Method{i}") for i in range(50)} == {"unknown"}
    assert method_label("/layerpar.v1.Inference/Predict2") == "unknown"
    # one label per method the server serves (layerpar.v1, health, reflection, the Open Inference
    # Protocol), fixed by the protos: the count cannot grow with what clients send
    assert METHOD_LABELS and all(path.count("/") == 2 for path in METHOD_LABELS)
    assert len(set(METHOD_LABELS.values())) <= 16


# ----------------------------------------------------------------------------- 8: start-up


def test_serving_loads_the_weights_without_the_optimizer_state(tiny_cfg, tmp_path):
    backend = trained(tiny_cfg)
    path = backend.save(tmp_path, epoch=1)
    optim = sorted(path.glob("optim.*.safetensors"))
    assert optim, "the checkpoint should hold optimizer state"
    optim[0].write_bytes(b"\0" * 64)  # damaged: serving must not care
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(path)  # training still refuses it
    ckpt = load_weights(path)
    assert ckpt.optim == {} and set(ckpt.tensors) == set(load_checkpoint(path, with_optim=False).tensors)
    served = LocalBackend(tiny_cfg)
    served.load(path, weights_only=True)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(served.infer(x), backend.infer(x), rtol=0, atol=0)
    (path / "head.safetensors").write_bytes(b"\0" * 64)  # the weights are still verified
    with pytest.raises(CheckpointError, match="head.safetensors: sha256 does not match"):
        LocalBackend(tiny_cfg).load(path, weights_only=True)


def test_a_taken_port_is_one_sentence():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve gRPC on 127.0.0.1:{port}: Address already in use"):
            check_port_free("127.0.0.1", port, "gRPC")
    check_port_free("127.0.0.1", 0, "gRPC")  # any free port: nothing to check
