"""One frozen config tree (model, data, train, parallel, serve) loaded from YAML.

    cfg = load_config("digits", overrides=["train.epochs=5", "parallel.workers=2"])

Unknown keys, wrong types and impossible values raise one ``ConfigError`` naming the field, the value
and what is allowed. ``--config`` accepts a path or the name of a YAML shipped in ``layerpar/configs``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from layerpar.config_rules import (  # noqa: F401 - re-exported: the rules live beside the tree
    BLOCK_STYLES,
    DATASETS,
    DEGRADED,
    DTYPES,
    MODEL_KINDS,
    PLACEMENTS,
    POOLS,
    TRAIN_MODES,
    TRANSPORTS,
    ConfigError,
    check_type,
    validate,
)


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "paraformer"
    """`paraformer` (sum of parallel branches) or `vit` (the same blocks stacked serially); language
    models (data.name=text): `paraformer_lm` (causal branches summed) or `serial_lm` (the GPT of the
    same blocks stacked, its baseline). The LMs use dim, heads, mlp_dim, num_branches, branch_depth,
    context and dtype; their vocabulary is the byte tokenizer's (259)."""
    context: int = 256
    """Language models: tokens per training window and the longest sequence the model reads (its
    learned position table has this many rows)."""
    image_size: int = 8
    """Side of the square input image in pixels."""
    in_channels: int = 1
    """Channels of the input image."""
    patch_size: int = 2
    """Side of a square patch; must divide image_size."""
    num_classes: int = 10
    """Number of output classes."""
    dim: int = 64
    """Token width D."""
    heads: int = 4
    """Attention heads; must divide dim (unless head_dim is set)."""
    head_dim: int = 0
    """Width of one attention head; 0 means dim / heads. The authors' code keeps 64 whatever dim is,
    so an imported model may attend in heads * head_dim != dim."""
    mlp_dim: int = 128
    """Hidden width of each block's MLP."""
    num_branches: int = 8
    """Para-Former branches N. A ViT stacks num_branches * branch_depth blocks serially."""
    branch_depth: int = 1
    """Transformer blocks in each branch."""
    style: str = "prenorm"
    """`prenorm`: h + F(LN(h)); `reference`: LN(h) + F(LN(h)) as in the authors' code."""
    pool: str = "cls"
    """Head input: the CLS row (`cls`) or the token mean (`mean`)."""
    qkv_bias: bool = False
    """Bias on the fused q/k/v projection. Off by default, as in the authors' code: the key bias has
    exactly zero gradient (softmax ignores a constant shift), so AdamW turns its rounding noise into
    full-size steps and runs stop being reproducible across worker layouts."""
    dropout: float = 0.0
    """Dropout inside blocks; 0 keeps distributed runs bit-comparable with single-process ones."""
    dtype: str = "float32"
    """Parameter and compute dtype: `float32`, or `float64` to prove the distributed algebra equal to
    the single-process one at ~1e-16 rounding (the parity tests use it). Inputs stay float32 on the
    wire and are cast by the embedding; checkpoints load into either dtype."""
    compile: bool = False
    """torch.compile the fused branch stack (the branches' forward, where the compute is) wherever a
    shard or worker builds the model; opt-in: the first steps pay the compile time (seconds to
    minutes) and a C compiler is needed. Off: eager, bit-for-bit as before."""

    @property
    def attn_dim(self) -> int:
        """Width of the attention (q, k, v each): heads * head_dim."""
        return self.heads * self.head_dim if self.head_dim else self.dim

    @property
    def num_blocks(self) -> int:
        return self.num_branches * self.branch_depth


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    """digits (ships with scikit-learn), fashion_mnist, cifar10, cifar100 (local files), synthetic,
    folder (your own images: data.root/train/<class>/*.png|jpg and data.root/test/<class>/...), text
    (language models: the Python standard library's .py files, or every file under data.root, split
    by file into train/val/test by data.seed; layerpar/data/text.py)."""
    root: str | None = None
    """Directory with the dataset files; None means the dataset's default location."""
    seed: int = 0
    """Seed of the fixed train/val/test split (digits, synthetic) and of the train shuffle."""
    val_fraction: float = 0.1
    """Share of the training split held out for validation."""
    synthetic_size: int = 512
    """Samples in the synthetic dataset."""
    eval_windows: int = 0
    """data.name=text: validate and test on this many windows of model.context tokens, evenly spaced
    over each split (0 = every window); a fixed sample keeps per-epoch validation cheap."""
    limit_train: int = 0
    """Use only a seeded random n of the training samples, every class in proportion (0 = all);
    for quick runs."""
    augment: str = "none"
    """Training batches only: `none`, `flip` (mirror left-right, p = 1/2), `flip_crop` (flip, then
    shift by up to 2 pixels each way)."""
    streaming: bool = False
    """Read data.root with Ray Data as it trains (layerpar/data/streaming.py) instead of decoding the
    whole dataset into every rank's memory (data.name must be folder): each replica group's leader
    reads its share of every batch and broadcasts it to its branch ranks (train/feed.py). False (the
    default): small datasets decode in seconds and train faster from memory."""
    format: str = "folder"
    """With data.streaming: `folder` (ROOT/train/<class>/*.png|jpg, as data.name=folder) or `parquet`
    (ROOT/train/*.parquet and ROOT/test/*.parquet with columns `image` (encoded bytes) and `label`).
    """
    read_parallelism: int = 0
    """With data.streaming: Ray Data decode tasks running at once, per replica group's leader (0 = Ray
    Data's own choice); each takes a CPU of the cluster."""
    stats_images: int = 4096
    """With data.streaming: training images decoded (an evenly spaced sample) for the per-channel
    normalisation mean and std; at least the training split's size gives the in-memory path's
    constants exactly. The driver takes them once, before the run starts."""


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "joint"
    """`joint` (one loss on all branches) or `progressive` (a step per prefix, then a joint step)."""
    epochs: int = 40
    """Passes over the training split."""
    batch_size: int = 64
    """Samples per step."""
    lr: float = 2e-3
    """Peak learning rate of AdamW."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    warmup_fraction: float = 0.1
    """Share of all optimizer steps spent in linear warm-up."""
    weight_decay: float = 0.05
    """AdamW weight decay on matrices (not on biases, norms, embeddings)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss."""
    seed: int = 0
    """Seed of the weight initialisation."""
    threads: int = 0
    """torch threads in a single-process run (0 = torch's default)."""
    out_dir: str = "runs"
    """Directory under which each run's directory is created."""
    storage: str | None = None
    """Where a distributed run (parallel.workers >= 1) keeps its checkpoints: any path or URI Ray
    Train accepts (`/mnt/nfs/runs`, `s3://bucket/runs`); they go to STORAGE/<run name>/checkpoints.
    None: the run directory's parent, so they land in RUN_DIR/checkpoints."""
    checkpoint_every: int = 1
    """Write a checkpoint every n epochs (and always at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    max_failures: int = 0
    """Worker failures a distributed run survives by restarting from its last checkpoint."""
    save_timeout_s: float = 600.0
    """How long the ranks of a distributed run wait for rank 0 to publish a checkpoint (a slow object
    store) before the run fails; the save's own bound, separate from parallel.timeout_s."""
    max_minutes: float = 0.0
    """Stop training after this many minutes (0 = no limit); the run still evaluates and saves."""
    frozen_branches: int = 0
    """Keep branches 0..n-1, the embedding and the head fixed and train only the branches after them
    (expansion); progressive steps then start at prefix n+1. 0 trains everything."""
    precision: str = "float32"
    """Compute precision of training, evaluation and serving: `float32`, or mixed precision
    `bfloat16` (CPU or GPU) / `float16` (GPU only, with a gradient scaler) under torch.autocast.
    Master weights and optimizer state stay in model.dtype (float32), and the branch rows are
    reduced between ranks in float32."""


@dataclass(frozen=True)
class ParallelConfig:
    workers: int = 0
    """Branch workers W (Ray actors); 0 trains and infers in this process."""
    replicas: int = 1
    """Replica groups R: R groups of W workers each (R x W devices). Serving: each group answers whole
    batches; the server sends each batch to an idle, healthy group. Training: a (replica, branch) mesh
    of R x W Ray Train ranks; each replica trains on its share of every batch (data parallel across
    replicas, branch parallel within one)."""
    transport: str = "collective"
    """`collective` (torch.distributed inside the worker group) or `object_store` (Ray reduces)."""
    placement: str = "PACK"
    """Ray placement strategy of the workers' bundles: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD."""
    placement_group: str = "own"
    """Where the workers' bundles come from: `own` (each engine reserves a placement group) or
    `current` (bundles 1..W of the placement group the engine is created in: a Ray Serve replica's,
    whose bundle 0 holds the replica itself; layerpar/serve/ray_serve.py)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved for each worker."""
    gpus_per_worker: float = 0.0
    """GPUs reserved for each worker; > 0 uses CUDA and NCCL."""
    threads_per_worker: int = 1
    """torch threads inside each worker."""
    pin_cpus: bool = True
    """CPU training ranks on one node each run on their own cores (threads_per_worker each) when the
    node has enough; no effect on GPU ranks or when the cores are too few (layerpar/parallel/affinity.py)."""
    timeout_s: float = 120.0
    """Training's timeout: the process group's collective timeout (gloo/NCCL) and the longest wait for
    a training step, a load, a save or a state read before the engine treats a worker as lost.
    Inference calls use call_timeout_s."""
    call_timeout_s: float = 30.0
    """Longest wait for one inference call (every worker's reply shares this one deadline) before the
    engine treats its workers as lost and recovers; catches a worker whose process answers heartbeats
    but whose call never returns. Serving answers or fails within it plus the recovery time."""
    heartbeat_s: float = 3.0
    """A worker whose side thread leaves a ping unanswered this long counts as stopped (SIGSTOP, a
    frozen host) and is restarted; while a call waits on a worker it pings it every heartbeat_s / 3."""
    placement_timeout_s: float = 30.0
    """Longest wait for the cluster to place every worker."""
    address: str | None = None
    """Ray cluster address (`auto`, `ray://host:10001`); None starts a local Ray instance."""
    shared_memory: bool = True
    """Inference batches reach workers on the driver's node through /dev/shm, not the object store."""


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Address the gRPC server binds; loopback unless told otherwise."""
    port: int = 50051
    """gRPC port (0 picks a free one)."""
    metrics_port: int = 0
    """Prometheus metrics HTTP port (0 picks a free one, -1 disables)."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint binds; loopback unless told otherwise (independent of host)."""
    http_port: int = -1
    """Open Inference Protocol REST port (/v2/..., on `host`; 0 picks a free one, -1: off). The
    protocol's gRPC service is always on `port`, beside layerpar.v1."""
    model_name: str = "layerpar"
    """The model's name in the Open Inference Protocol (/v2/models/<model_name>)."""
    threads: int = 1
    """torch threads of the serving process's own engine (a one-process server, parallel.workers 0;
    replica groups' workers use parallel.threads_per_worker). 1 (measured: about the throughput of 2
    at two-thirds of the CPU per request, docs/SERVING.md); 0 keeps the run's train.threads."""
    max_batch: int = 64
    """Largest merged batch one engine call runs."""
    max_wait_ms: float = 0.0
    """Longest an idle replica waits for more requests to fill a batch. 0 (the default): dispatch on
    idle: an idle replica takes whatever is queued at once; while every replica is busy, requests
    accumulate up to max_batch. A bound, never a fixed delay: a full batch goes at once."""
    latency_slo_ms: float = 0.0
    """Latency target per request (0: off). When the full model would miss it (queueing plus compute,
    estimated from the server's recent calls), the answer comes from the largest prefix of branches
    that meets it; the reply's branches_used says which. A request's min_branches is always honoured."""
    min_branches: int = 0
    """The fewest branches a latency target may answer with (0: no floor; N: never a prefix). An
    explicit num_branches in a request is honoured as asked."""
    min_prefix_accuracy: float = 0.0
    """With a latency target: answer only with prefixes whose validation accuracy in the run that
    trained the checkpoint is at least this (0: no floor). The server refuses to start when no
    prefix meets it, and serves only the full model when the run's accuracies are not known."""
    max_queue: int = 256
    """Requests waiting beyond this are refused with RESOURCE_EXHAUSTED."""
    max_request_rows: int = 256
    """Largest batch one request may carry."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message sent or received."""
    degraded: str = "wait"
    """On a lost worker: `wait` for recovery, or `allow` answers from the surviving branches."""
    token_file: str | None = None
    """File holding the bearer token that calls must send (else env LAYERPAR_SERVE_TOKEN; neither:
    no token). The token itself is never a config value: configs reach workers, config.yaml and
    checkpoint manifests."""
    health_auth: str = "open"
    """With a token: `open` leaves health and reflection callable without it (Kubernetes' gRPC probes
    send no metadata), `token` requires it there too. Predict and ModelInfo always require it."""
    tls_cert: str | None = None
    """PEM certificate for TLS (with tls_key)."""
    tls_key: str | None = None
    """PEM private key for TLS (with tls_cert)."""
    retries: int = 1
    """Retries of a failed engine call before its requests get UNAVAILABLE (inference is idempotent)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: longest wait for in-flight requests to finish before the server stops."""
    health_interval_s: float = 1.0
    """How often the health service asks the engine whether its workers are up."""
    min_live_fraction: float = 1.0
    """Health says SERVING only while at least this share of the workers is alive (1.0: all of them)."""
    max_new_tokens: int = 1024
    """Generate (language models): the most tokens one request may ask for (max_tokens above it is
    INVALID_ARGUMENT); a generation also stops when the model's context is full."""
    generate_slots: int = 8
    """Generate: sequences that decode together (key/value cache slots; continuous batching). More
    requests wait in a queue of serve.max_queue."""
    token_latency_ms: float = 0.0
    """Generate: per-token latency target in ms (0: off). When a decode step of the full model would
    miss it, a new generation decodes with the largest prefix of branches that meets it (at least
    serve.min_branches); a request's token_deadline_ms replaces it."""
    ray_min_replicas: int = 1
    """Ray Serve deployment (layerpar/serve/ray_serve.py): fewest replicas, each one branch group."""
    ray_max_replicas: int = 1
    """Ray Serve deployment: most replicas autoscaling may start (= ray_min_replicas: no autoscaling)."""
    ray_target_ongoing_requests: float = 8.0
    """Ray Serve autoscaling: requests in flight per replica it aims at (more: add a replica)."""
    ray_max_ongoing_requests: int = 64
    """Ray Serve: most requests one replica takes at once (its batcher merges them)."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some fields changed: ``cfg.replace(train={"epochs": 1})``; validated."""
        raw = self.to_dict()
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return from_dict(raw)


# ----------------------------------------------------------------------------- building


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys to values, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(map(str, set(raw) - set(fields)))
    if unknown:
        where = f"{prefix}." if prefix else ""
        key = unknown[0] if unknown[0].isidentifier() else repr(unknown[0])  # keep it on one line
        raise ConfigError(f"unknown key {where}{key}; allowed keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        full = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, full)
        else:
            kwargs[name] = check_type(full, value, hints[name])
    return cls(**kwargs)


def _without_token(raw: Any) -> Any:
    """serve.token left the config (it was copied to workers, config.yaml and manifests): the null
    one older run files hold is dropped; a set one is refused, so no server runs open by surprise."""
    serve = raw.get("serve") if isinstance(raw, dict) else None
    if not isinstance(serve, dict) or "token" not in serve:
        return raw
    if serve["token"] is not None:
        raise ConfigError("serve.token is no longer a config value (configs are copied to workers and "
                          "into run files): export LAYERPAR_SERVE_TOKEN or set serve.token_file instead")
    return {**raw, "serve": {k: v for k, v in serve.items() if k != "token"}}


def from_dict(raw: dict[str, Any]) -> Config:
    cfg = _build(Config, _without_token(raw), "")
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- loading


def config_names() -> list[str]:
    """Names of the YAML configs shipped inside the package (usable as ``--config NAME``)."""
    folder = resources.files("layerpar") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_source(source: str | Path) -> tuple[str, str]:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path.read_text(), str(path)
    packaged = resources.files("layerpar") / "configs" / f"{source}.yaml"
    if packaged.is_file():
        return packaged.read_text(), f"layerpar/configs/{source}.yaml"
    raise ConfigError(
        f"config {str(source)!r} is neither a YAML file nor a packaged config; "
        f"packaged configs: {', '.join(config_names())}"
    )


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and where (PyYAML's own text spans several lines)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003); values are parsed as YAML scalars."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({_yaml_problem(exc)})") from None
    return key.strip().split("."), parsed


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML (path or packaged name; None = all defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if source is not None:
        text, where = _read_source(source)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must hold a mapping of sections, got {type(raw).__name__}")
    return from_dict(_apply_overrides(raw, overrides))


def _apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for item in overrides or []:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def with_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """cfg with `section.key=value` overrides applied and validated, as for a YAML file."""
    return from_dict(_apply_overrides(cfg.to_dict(), overrides))


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config as ``config.yaml`` into the run directory."""
    path = Path(run_dir) / "config.yaml"
    path.write_text(cfg.to_yaml())
    return path
