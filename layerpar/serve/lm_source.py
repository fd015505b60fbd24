"""A causal LM for generation: from a checkpoint (or fresh weights) to a Decoder.

    cfg, model, ckpt_dir, manifest = open_lm("runs/<run>", sets=["parallel.workers=2"])
    decoder = make_decoder(cfg, model)            # LocalDecoder, or W workers (runtime/lm_decode.py)

A checkpoint is an LM when its config's model.kind is `paraformer_lm` or `serial_lm`. Weights come
from `layerpar.train.lm_checkpoint.load_lm`, or with `--config`, straight from the checkpoint's
verified pieces into the configured model (their keys are the state_dict names); never optimizer state.
"""

from __future__ import annotations

from pathlib import Path

from layerpar.config import ConfigError, load_config, with_overrides
from layerpar.config_rules import LM_KINDS


def is_lm(cfg) -> bool:
    return cfg.model.kind in LM_KINDS


def checkpoint_config(checkpoint: str | Path):
    """(config, checkpoint dir, manifest) of a checkpoint or a run directory (its latest)."""
    from layerpar.train.checkpoint import manifest_config, read_manifest, resolve_checkpoint

    ckpt_dir = resolve_checkpoint(checkpoint)
    manifest = read_manifest(ckpt_dir)
    return manifest_config(manifest, ckpt_dir / "manifest.json"), ckpt_dir, manifest


def check_generate_config(cfg) -> None:
    """ConfigError (one sentence) for serve fields only generation reads."""
    s = cfg.serve
    for name in ("max_new_tokens", "generate_slots"):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"serve.{name} must be an integer >= 1, got {value!r}")
    if not s.token_latency_ms >= 0:
        raise ConfigError(f"serve.token_latency_ms must be >= 0, got {s.token_latency_ms!r}")


def open_lm(checkpoint: str | Path | None, *, config: str | None = None, sets: list[str] | () = ()):
    """(cfg, model, ckpt_dir or None, manifest) for generation. ValueError (one sentence) when the
    checkpoint or config is not a language model; CheckpointError / ConfigError as they come."""
    from layerpar.model.lm import build_lm

    ckpt_dir, manifest = None, {}
    if checkpoint is not None:
        cfg, ckpt_dir, manifest = checkpoint_config(checkpoint)
        if config:
            cfg = load_config(config)
    else:
        cfg = load_config(config)
    cfg = with_overrides(cfg, list(sets))
    if not is_lm(cfg):
        where = f"checkpoint {ckpt_dir}" if ckpt_dir else f"config {config or 'default'}"
        raise ValueError(f"the {where} holds a {cfg.model.kind!r} model, not a language model "
                         f"(model.kind paraformer_lm or serial_lm): generation needs one")
    check_generate_config(cfg)
    if ckpt_dir is None:
        return cfg, build_lm(cfg.model, seed=cfg.train.seed).eval(), None, manifest
    if not config:
        from layerpar.train.lm_checkpoint import load_lm
        model, _ = load_lm(ckpt_dir, overrides=list(sets))
        return cfg, model.eval(), ckpt_dir, manifest
    from layerpar.train.checkpoint import CheckpointError, load_weights, model_state

    model = build_lm(cfg.model, seed=cfg.train.seed)
    try:
        model.load_state_dict(model_state(load_weights(ckpt_dir)), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{ckpt_dir}: its weights do not fit the configured model: "
                              f"{first}") from None
    return cfg, model.eval(), ckpt_dir, manifest


def make_decoder(cfg, model):
    """One process (parallel.workers 0) or the model's branches over W Ray workers."""
    from layerpar.model.lm import ParaFormerLM
    from layerpar.runtime.decoder import LocalDecoder

    slots = cfg.serve.generate_slots
    if cfg.parallel.workers == 0:
        return LocalDecoder(model, slots)
    from layerpar.parallel.cluster import connect
    from layerpar.runtime.lm_decode import DistributedDecoder, PipelinedDecoder

    connect(cfg)  # a running Ray is used as it is; else a local one (parallel.address: a cluster)
    if isinstance(model, ParaFormerLM):
        return DistributedDecoder(model, slots, cfg.parallel)
    return PipelinedDecoder(model, slots, cfg.parallel)


def apply_threads(cfg) -> None:
    """The process's torch threads for decoding: serve.threads (0: leave torch's default). One thread
    is the default for a reason: a decode step is small, and on a busy machine a second intra-op
    thread that is not scheduled makes every step wait for it (seen: 3 ms -> 200 ms per step)."""
    threads = int(getattr(cfg.serve, "threads", 0) or 0)
    if threads > 0 and cfg.parallel.workers == 0:
        import torch

        torch.set_num_threads(threads)


def count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def serve_lm_main(cfg, ckpt_dir: Path | None, manifest: dict, token: str | None, sets: list[str]) -> int:
    """`layerpar serve` on a language model: the Generate server until SIGTERM / SIGINT; the last
    stdout line is one JSON object (as for the image server). Exit 2 when the model cannot load."""
    import asyncio
    import json
    import signal
    import sys
    import time

    from layerpar.model.lm import build_lm
    from layerpar.serve.auth import security_warnings
    from layerpar.serve.generate_rpc import GenerationServer
    from layerpar.train.checkpoint import CheckpointError

    try:
        check_generate_config(cfg)
        if ckpt_dir is not None:
            model = open_lm(ckpt_dir, sets=sets)[1]
        else:
            print("warning: no --checkpoint: serving freshly initialised (untrained) weights",
                  file=sys.stderr)
            model = build_lm(cfg.model, seed=cfg.train.seed).eval()
        apply_threads(cfg)
        import ray

        started_ray = cfg.parallel.workers > 0 and not ray.is_initialized()
        decoder = make_decoder(cfg, model)
    except (ConfigError, CheckpointError, OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"error": str(exc)}))
        return 2
    checkpoint_id = f"{ckpt_dir.name}@step{manifest.get('step', '?')}" if ckpt_dir else ""

    async def serve() -> dict:
        for warning in security_warnings(cfg.serve.host, token=token, tls=bool(cfg.serve.tls_cert)):
            print(f"warning: {warning}", file=sys.stderr)
        server = GenerationServer(cfg, decoder, checkpoint_id=checkpoint_id, token=token or "",
                                  rebuild=lambda: make_decoder(cfg, model), params=count_params(model),
                                  workers=cfg.parallel.workers)
        address = await server.start()
        started = time.monotonic()
        print(f"serving layerpar.v1.Inference (Generate: {cfg.model.kind}) on {address}"
              + (f"  metrics {server.metrics_url}" if server.metrics_url else "")
              + ("  (token required)" if token else ""), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print(f"draining: finishing live generations (at most {cfg.serve.drain_timeout_s:g}s)",
              file=sys.stderr, flush=True)
        finished = await server.stop()
        counts = {f"{s.labels['method']}:{s.labels['status']}": int(s.value)
                  for metric in server.metrics.requests.collect() for s in metric.samples
                  if s.name.endswith("_total")}
        return {"address": address, "metrics": server.metrics_url, "model_kind": cfg.model.kind,
                "served_s": round(time.monotonic() - started, 3), "drained": finished,
                "requests": counts, "decode_calls": server.scheduler.steps}

    try:
        summary = asyncio.run(serve())
    except (OSError, RuntimeError) as exc:
        summary = {"error": f"cannot serve on {cfg.serve.host}:{cfg.serve.port}: {exc}"}
        print(f"error: {summary['error']}", file=sys.stderr)
    finally:
        decoder.close()
        if started_ray:
            ray.shutdown()
    summary["checkpoint"] = str(ckpt_dir) if ckpt_dir else None
    print(json.dumps(summary))
    return 0 if "error" not in summary else 1
