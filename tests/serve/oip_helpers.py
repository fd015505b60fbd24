"""Helpers of the Open Inference Protocol tests: a small Para-Former trained a few steps on digits
(one process, no Ray), its test split, and a self-signed certificate for TLS."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from layerpar.config import load_config
from layerpar.data import load_dataset
from tests.serve.helpers import tiny_cfg

TOKEN = "oip-s3cret"
BEARER = {"authorization": f"Bearer {TOKEN}"}
TRAIN_STEPS = 200  # ~2 s on one core; 87% on the test split (chance: 10%)


def digits_cfg(**serve):
    """The packaged `tiny` Para-Former (4 branches) on the digits data set (8x8, 10 classes), serving
    both protocols on free loopback ports."""
    base = tiny_cfg(http_port=0, **serve)
    cfg = load_config("tiny", ["data.name=digits", "model.num_classes=10", "model.patch_size=2",
                               "model.dim=32", "model.mlp_dim=64", "train.batch_size=64", "train.lr=1e-2",
                               "parallel.workers=0"])
    return cfg.replace(serve=base.to_dict()["serve"])


@functools.cache
def digits_backend():
    """(LocalBackend trained TRAIN_STEPS steps, test images float32 (N, 1, 8, 8), labels (N,)); once a
    process, shared by the gRPC and HTTP tests."""
    from layerpar.train.local import LocalBackend

    cfg = digits_cfg()
    data = load_dataset(cfg)
    backend = LocalBackend(cfg, total_steps=TRAIN_STEPS)
    g = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        idx = torch.randint(0, len(data.train), (64,), generator=g)
        backend.train_step(data.train.x[idx], data.train.y[idx])
    return backend, data.test.x.numpy().astype(np.float32), data.test.y.numpy()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())


def make_cert(directory: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) for 127.0.0.1 / localhost, signed by itself; skips without openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key
