"""Config: every packaged YAML loads; bad YAMLs raise one ConfigError that names the field."""

from __future__ import annotations

import pytest

from layerpar.config import Config, ConfigError, config_names, load_config, save_config

pytestmark = pytest.mark.unit

# (YAML text, words the message must contain): each is one mistake a person makes.
BAD_YAMLS = [
    ("model:\n  dimm: 64\n", ["unknown key model.dimm", "allowed keys", "dim"]),
    ("modle:\n  dim: 64\n", ["unknown key modle", "model"]),
    ("model:\n  dim: sixty-four\n", ["model.dim must be int", "'sixty-four'"]),
    ("model:\n  dim: true\n", ["model.dim must be int", "True"]),
    ("train:\n  lr: fast\n", ["train.lr must be float", "'fast'"]),
    ("model:\n  dim: 30\n  heads: 4\n", ["model.dim (30)", "divisible by model.heads (4)"]),
    ("model:\n  image_size: 8\n  patch_size: 3\n", ["model.patch_size (3)", "divide model.image_size (8)"]),
    ("parallel:\n  workers: 9\n", ["parallel.workers (9)", "<= model.num_branches (8)"]),
    ("train:\n  mode: sideways\n", ["train.mode ('sideways')", "joint, progressive"]),
    ("model:\n  style: postnorm\n", ["model.style ('postnorm')", "prenorm, reference"]),
    ("parallel:\n  placement: EVERYWHERE\n", ["parallel.placement", "STRICT_SPREAD"]),
    ("data:\n  name: imagenet\n", ["data.name ('imagenet')", "fashion_mnist"]),
    ("train:\n  epochs: 0\n", ["train.epochs (0)", ">= 1"]),
    ("model:\n  dim: [64\n", ["is not valid YAML", "line 3"]),
    ("- model\n- train\n", ["must hold a mapping of sections", "list"]),
    ("model: 64\n", ["model must be a mapping"]),
    ("serve:\n  tls_cert: a.pem\n", ["serve.tls_cert and serve.tls_key"]),
]


@pytest.mark.parametrize("text,words", BAD_YAMLS, ids=[w[0] for _, w in BAD_YAMLS])
def test_bad_yaml_names_the_field(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message  # one line for people, never a traceback-like dump
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="packaged configs: .*digits"):
        load_config("no_such_config")


@pytest.mark.parametrize("item,words", [
    ("train.epochs", "section.key=value"),
    ("train.epochs=many", "train.epochs must be int"),
    ("train.nope=1", "unknown key train.nope"),
    ("model.dim.x=1", "dim is not a section"),
    ("parallel.replicas=0", "parallel.replicas"),
])
def test_bad_overrides(item, words):
    with pytest.raises(ConfigError, match=words):
        load_config("tiny", [item])


def test_a_mesh_needs_rows_for_every_replica():
    with pytest.raises(ConfigError, match=r"parallel.replicas \(4\) must be <= train.batch_size \(2\)"):
        load_config("tiny", ["parallel.workers=1", "parallel.replicas=4", "train.batch_size=2"])
    assert load_config("tiny", ["parallel.workers=2", "parallel.replicas=2"]).parallel.replicas == 2


@pytest.mark.parametrize("name", ["tiny", "digits", "digits_vit", "fashion_mnist", "fashion_mnist_vit",
                                  "cifar10"])
def test_packaged_configs_load(name):
    assert name in config_names()
    cfg = load_config(name)
    assert isinstance(cfg, Config)


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config("digits", ["train.epochs=3", "train.lr=3e-4", "parallel.workers=0",
                                 "parallel.address=auto"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.parallel.workers) == (3, 3e-4, 0)
    assert cfg.parallel.address == "auto"
    saved = save_config(cfg, tmp_path)
    assert load_config(saved) == cfg  # the run dir's config.yaml reproduces the run
    assert cfg.replace(train={"epochs": 5}).train.epochs == 5
    with pytest.raises(ConfigError, match="model.heads"):
        cfg.replace(model={"heads": 5})


def test_equal_parameter_pairs():
    """The Para-Former and its serial baseline use the same blocks, so the same parameter count."""
    from layerpar.model import build_model

    for para, vit in [("digits", "digits_vit"), ("fashion_mnist", "fashion_mnist_vit")]:
        a, b = load_config(para).model, load_config(vit).model
        assert (a.kind, b.kind) == ("paraformer", "vit")
        count = [sum(p.numel() for p in build_model(m).parameters()) for m in (a, b)]
        assert count[0] == count[1], (para, count)
