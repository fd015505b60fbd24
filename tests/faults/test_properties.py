"""Property-based tests (hypothesis) over bad input: random config values and override strings give a
valid Config or one ConfigError naming the field, never another exception; random engine inputs give
a ValueError with a message, and the engine keeps answering correctly. (Random gRPC Predict requests:
tests/serve/test_bad_input.py.)

    .venv/bin/python -m pytest -q tests/faults/test_properties.py
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerpar.config import (
    BLOCK_STYLES,
    DATASETS,
    DEGRADED,
    MODEL_KINDS,
    PLACEMENTS,
    TRANSPORTS,
    Config,
    ConfigError,
    from_dict,
    load_config,
)

SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}
KEYS = [f"{s}.{f.name}" for s, make in SECTIONS.items() for f in dataclasses.fields(make())]
WORDS = list(MODEL_KINDS + BLOCK_STYLES + DATASETS + TRANSPORTS + PLACEMENTS + DEGRADED) + ["cls", "mean"]

values = st.one_of(
    st.integers(-10, 100), st.integers(), st.floats(), st.booleans(), st.none(),
    st.text(max_size=8), st.sampled_from(WORDS), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + "_x"),
                 st.sampled_from(list(SECTIONS)), st.text(min_size=1, max_size=6))
# values near each field's edges, drawn for a known key: 0, negatives, nan, inf, huge ints, "1e999"
edges = st.one_of(st.sampled_from([0, -1, 1, 2, 3, 0.5, -0.0, 1.0, float("nan"), float("inf"),
                                   -float("inf"), 10**400, "1e999", "3e-4", "", 65536]),
                  st.integers(-3, 70), st.sampled_from(WORDS))
pairs = st.one_of(st.tuples(keys, values), st.tuples(st.sampled_from(KEYS), edges))


def nested(pairs: list[tuple[str, object]]) -> dict:
    raw: dict = {}
    for key, value in pairs:
        section, _, name = key.partition(".")
        if not name:
            raw[section] = value
        elif isinstance(raw.get(section), dict) or section not in raw:
            raw.setdefault(section, {})[name] = value
    return raw


@pytest.mark.unit
@settings(max_examples=400, deadline=None)
@given(st.lists(pairs, min_size=1, max_size=4))
def test_random_config_values_give_a_config_or_an_error_naming_the_field(pairs):
    raw = nested(pairs)
    try:
        cfg = from_dict(raw)
    except ConfigError as exc:
        message = str(exc)
        named = {k for k, _ in pairs} | {k.partition(".")[0] for k, _ in pairs}
        # the field is named as written, or quoted (repr) when it is not a plain identifier
        assert "\n" not in message and any(k in message or repr(k) in message for k in named), message
        return
    assert from_dict(cfg.to_dict()) == cfg  # a valid config round-trips
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float):
                assert math.isfinite(value), f"{section}.{f.name}={value} was accepted"


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.tuples(st.sampled_from(KEYS), st.text(max_size=12)).map("=".join))
def test_random_override_strings_give_a_config_or_a_config_error(item):
    try:
        load_config(None, [item])
    except ConfigError as exc:
        assert str(exc)


# ----------------------------------------------------------------------------- engine inputs

DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool]
good_shapes = st.integers(1, 6).map(lambda b: (b, 1, 8, 8))
any_shapes = st.lists(st.integers(0, 9), max_size=5).map(tuple)
tensors = st.tuples(st.one_of(good_shapes, any_shapes), st.sampled_from(DTYPES), st.integers(0, 99)).map(
    lambda t: (torch.randn(t[0], generator=torch.Generator().manual_seed(t[2])) * 3).to(t[1]))
inputs = st.one_of(tensors, tensors.map(lambda t: t.numpy()), st.none(), st.text(max_size=3),
                   st.lists(st.floats(), max_size=3))
branch_counts = st.one_of(st.none(), st.integers(-2, 6), st.floats(), st.booleans(), st.text(max_size=2))


@pytest.fixture(scope="module")
def engine_and_reference(local_ray):
    from layerpar.model import ParaFormer
    from layerpar.runtime import Engine
    from tests.faults.helpers import fault_cfg

    cfg = fault_cfg(2)
    with Engine(cfg) as engine:
        yield engine, ParaFormer(cfg.model, seed=cfg.train.seed).eval()


@pytest.mark.ray
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=inputs, k=branch_counts)
def test_random_engine_inputs_are_answered_or_refused_and_the_engine_keeps_working(engine_and_reference,
                                                                                  x, k):
    engine, reference = engine_and_reference
    try:
        logits = engine.infer(x, num_branches=k)
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:  # only a float32 (B, 1, 8, 8) tensor and a prefix size in 1..4 (or None) get here
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(logits, reference(x, k), atol=1e-5, rtol=0)
    probe = torch.ones(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(engine.infer(probe), reference(probe), atol=1e-5, rtol=0)
