"""The rules a config must satisfy: allowed values of the enumerated fields and the checks across
fields. Every failure is one ConfigError naming the field, its value and what is allowed."""

from __future__ import annotations

import math
import re
import types
import typing
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the tree imports these rules, not the other way round
    from layerpar.config import Config, DataConfig, ModelConfig, ParallelConfig, ServeConfig, TrainConfig


class ConfigError(ValueError):
    """A config value is unknown, mistyped or impossible; the message names the field."""


# Allowed values of the enumerated fields, checked in validate().
MODEL_KINDS = ("paraformer", "vit", "paraformer_lm", "serial_lm")
LM_KINDS = ("paraformer_lm", "serial_lm")
BLOCK_STYLES = ("prenorm", "reference")
POOLS = ("cls", "mean")
DTYPES = ("float32", "float64")
PRECISIONS = ("float32", "bfloat16", "float16")
AUGMENTS = ("none", "flip", "flip_crop")
DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "synthetic", "folder", "text")
DATA_FORMATS = ("folder", "parquet")
TRAIN_MODES = ("joint", "progressive")
TRANSPORTS = ("collective", "object_store")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
PLACEMENT_GROUPS = ("own", "current")
DEGRADED = ("wait", "allow")
HEALTH_AUTH = ("open", "token")


def check_type(name: str, value: Any, annotation: Any) -> Any:
    """Return value converted to the annotated type, or raise ConfigError naming the field."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        # a str too: YAML 1.1 reads `3e-4` (no dot) as a string
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):
                number = None
            if number is not None and not math.isfinite(number):  # nan, inf, 1e999
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            if number is not None:
                return number
    elif annotation is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{name} must be {annotation.__name__}, got {value!r} ({type(value).__name__})")


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} ({value!r}) must be one of {', '.join(map(str, allowed))}")


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{name} ({value!r}) must be >= {low}")


def validate(cfg: Config) -> None:
    """Raise ConfigError for impossible combinations; the message names the field and the fix.
    The sections are checked in order (model, data, train, parallel, serve): the first bad field
    of the earliest section is the one reported."""
    _validate_model(cfg.model)
    _validate_data(cfg.data)
    _validate_lm(cfg)
    _validate_train(cfg.train, cfg.model)
    _validate_parallel(cfg.parallel, cfg.model)
    if cfg.train.precision == "float16" and cfg.parallel.gpus_per_worker <= 0:
        raise ConfigError("train.precision=float16 needs a GPU (parallel.gpus_per_worker >= 1): CPU autocast "
                          "has no float16 gradient scaling; use bfloat16 on CPU")
    if cfg.parallel.replicas > cfg.train.batch_size:
        raise ConfigError(f"parallel.replicas ({cfg.parallel.replicas}) must be <= train.batch_size "
                          f"({cfg.train.batch_size}): each replica trains on its share of every batch")
    _validate_serve(cfg.serve)
    if cfg.serve.min_branches > cfg.model.num_branches:
        raise ConfigError(f"serve.min_branches ({cfg.serve.min_branches}) must be <= model.num_branches "
                          f"({cfg.model.num_branches})")


def _validate_model(m: ModelConfig) -> None:
    _one_of("model.kind", m.kind, MODEL_KINDS)
    _one_of("model.style", m.style, BLOCK_STYLES)
    _one_of("model.pool", m.pool, POOLS)
    _one_of("model.dtype", m.dtype, DTYPES)
    for name in ("image_size", "in_channels", "patch_size", "dim", "heads", "mlp_dim",
                 "num_branches", "branch_depth"):
        _at_least(f"model.{name}", getattr(m, name), 1)
    _at_least("model.num_classes", m.num_classes, 2)
    _at_least("model.head_dim", m.head_dim, 0)
    if not m.head_dim and m.dim % m.heads:
        raise ConfigError(f"model.dim ({m.dim}) must be divisible by model.heads ({m.heads})")
    if m.image_size % m.patch_size:
        raise ConfigError(
            f"model.patch_size ({m.patch_size}) must divide model.image_size ({m.image_size})"
        )
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout ({m.dropout}) must be in [0, 1)")


def _validate_data(d: DataConfig) -> None:
    _one_of("data.name", d.name, DATASETS)
    _one_of("data.augment", d.augment, AUGMENTS)
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction ({d.val_fraction}) must be in [0, 1)")
    _at_least("data.synthetic_size", d.synthetic_size, 10)
    _at_least("data.limit_train", d.limit_train, 0)
    _one_of("data.format", d.format, DATA_FORMATS)
    _at_least("data.read_parallelism", d.read_parallelism, 0)
    _at_least("data.stats_images", d.stats_images, 1)
    if d.streaming and d.name != "folder":
        raise ConfigError(f"data.streaming reads data.root as image folders or Parquet files; it needs "
                          f"data.name=folder, not {d.name!r}")
    if d.format != "folder" and not d.streaming:
        raise ConfigError(f"data.format={d.format} is read by the streaming source only; set "
                          "data.streaming=true")


def _validate_lm(cfg: Config) -> None:
    """A language model reads text, and text is read only by a language model."""
    m, d = cfg.model, cfg.data
    lm = m.kind in LM_KINDS
    if lm != (d.name == "text"):
        raise ConfigError(f"model.kind={m.kind} cannot train on data.name={d.name}: the language models "
                          f"({', '.join(LM_KINDS)}) read data.name=text, and text needs one of them")
    _at_least("data.eval_windows", d.eval_windows, 0)
    if not lm:
        return
    if not 2 <= m.context <= 65536:
        raise ConfigError(f"model.context ({m.context}) must be in 2..65536 tokens")
    if m.head_dim and m.head_dim * m.heads != m.dim:
        raise ConfigError(f"model.head_dim ({m.head_dim}) must be 0 or dim / heads for a language model")
    if m.dropout:
        raise ConfigError(f"model.dropout ({m.dropout}) must be 0 for a language model (not built yet)")
    if d.augment != "none":
        raise ConfigError(f"data.augment ({d.augment}) must be none for text")


def _validate_train(t: TrainConfig, m: ModelConfig) -> None:
    _one_of("train.mode", t.mode, TRAIN_MODES)
    _at_least("train.epochs", t.epochs, 1)
    _at_least("train.batch_size", t.batch_size, 1)
    if t.lr <= 0:
        raise ConfigError(f"train.lr ({t.lr}) must be > 0")
    _at_least("train.min_lr", t.min_lr, 0.0)
    if not 0.0 <= t.warmup_fraction < 1.0:
        raise ConfigError(f"train.warmup_fraction ({t.warmup_fraction}) must be in [0, 1)")
    for name in ("weight_decay", "grad_clip", "label_smoothing", "threads", "max_failures",
                 "max_minutes"):
        _at_least(f"train.{name}", getattr(t, name), 0)
    _at_least("train.frozen_branches", t.frozen_branches, 0)
    if t.frozen_branches and (m.kind != "paraformer" or t.frozen_branches >= m.num_branches):
        raise ConfigError(
            f"train.frozen_branches ({t.frozen_branches}) must be < model.num_branches "
            f"({m.num_branches}) of a paraformer: at least one branch has to train"
        )
    _at_least("train.checkpoint_every", t.checkpoint_every, 1)
    _at_least("train.keep_checkpoints", t.keep_checkpoints, 1)
    if t.save_timeout_s <= 0:
        raise ConfigError(f"train.save_timeout_s ({t.save_timeout_s}) must be > 0")
    _one_of("train.precision", t.precision, PRECISIONS)
    if t.precision != "float32" and m.dtype != "float32":
        raise ConfigError(f"train.precision={t.precision} is mixed precision over float32 master weights; "
                          f"it needs model.dtype=float32, not {m.dtype}")


def _validate_parallel(p: ParallelConfig, m: ModelConfig) -> None:
    _at_least("parallel.workers", p.workers, 0)
    if p.workers > m.num_branches:
        raise ConfigError(
            f"parallel.workers ({p.workers}) must be <= model.num_branches ({m.num_branches}): "
            "every worker owns at least one branch"
        )
    if p.workers and m.kind not in ("paraformer", "paraformer_lm"):
        raise ConfigError(f"parallel.workers ({p.workers}) needs model.kind 'paraformer' or 'paraformer_lm', "
                          f"got {m.kind!r}")
    _at_least("parallel.replicas", p.replicas, 1)
    if p.replicas > 1 and p.workers < 1:
        raise ConfigError(f"parallel.replicas ({p.replicas}) needs parallel.workers >= 1: each replica "
                          "group is W Ray branch workers")
    _one_of("parallel.transport", p.transport, TRANSPORTS)
    _one_of("parallel.placement", p.placement, PLACEMENTS)
    _one_of("parallel.placement_group", p.placement_group, PLACEMENT_GROUPS)
    _at_least("parallel.cpus_per_worker", p.cpus_per_worker, 0)
    _at_least("parallel.gpus_per_worker", p.gpus_per_worker, 0)
    _at_least("parallel.threads_per_worker", p.threads_per_worker, 1)
    if p.timeout_s <= 0 or p.placement_timeout_s <= 0:
        raise ConfigError("parallel.timeout_s and parallel.placement_timeout_s must be > 0")
    for name in ("call_timeout_s", "heartbeat_s"):
        if getattr(p, name) <= 0:
            raise ConfigError(f"parallel.{name} ({getattr(p, name)!r}) must be > 0")


def _validate_serve(s: ServeConfig) -> None:
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"serve.port ({s.port}) must be in 0..65535")
    if not -1 <= s.metrics_port <= 65535:
        raise ConfigError(f"serve.metrics_port ({s.metrics_port}) must be in -1..65535")
    if not -1 <= s.http_port <= 65535:
        raise ConfigError(f"serve.http_port ({s.http_port}) must be in -1..65535")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.model_name):
        raise ConfigError(f"serve.model_name ({s.model_name!r}) must be letters, digits, '_', '.' or '-' "
                          "(it is a URL path segment)")
    for name in ("max_batch", "max_queue", "max_request_rows", "max_message_bytes"):
        _at_least(f"serve.{name}", getattr(s, name), 1)
    _at_least("serve.max_wait_ms", s.max_wait_ms, 0)
    _at_least("serve.threads", s.threads, 0)
    _at_least("serve.latency_slo_ms", s.latency_slo_ms, 0)
    _at_least("serve.min_branches", s.min_branches, 0)
    if not 0.0 <= s.min_prefix_accuracy <= 1.0:
        raise ConfigError(f"serve.min_prefix_accuracy ({s.min_prefix_accuracy}) must be in [0, 1]")
    _one_of("serve.degraded", s.degraded, DEGRADED)
    _one_of("serve.health_auth", s.health_auth, HEALTH_AUTH)
    _at_least("serve.retries", s.retries, 0)
    if s.drain_timeout_s < 0 or s.health_interval_s <= 0:
        raise ConfigError("serve.drain_timeout_s must be >= 0 and serve.health_interval_s must be > 0")
    if not 0.0 <= s.min_live_fraction <= 1.0:
        raise ConfigError(f"serve.min_live_fraction ({s.min_live_fraction}) must be in [0, 1]")
    if (s.tls_cert is None) != (s.tls_key is None):
        raise ConfigError("serve.tls_cert and serve.tls_key must be given together")
    _at_least("serve.ray_min_replicas", s.ray_min_replicas, 1)
    if s.ray_max_replicas < s.ray_min_replicas:
        raise ConfigError(f"serve.ray_max_replicas ({s.ray_max_replicas}) must be >= serve.ray_min_replicas "
                          f"({s.ray_min_replicas})")
    if s.ray_target_ongoing_requests <= 0:
        raise ConfigError(f"serve.ray_target_ongoing_requests ({s.ray_target_ongoing_requests}) must be > 0")
    _at_least("serve.ray_max_ongoing_requests", s.ray_max_ongoing_requests, 1)
