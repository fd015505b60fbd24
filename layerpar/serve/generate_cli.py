"""`layerpar generate`: text from a language model checkpoint, in one process or over W workers.

    layerpar generate --checkpoint runs/<run> --prompt "def main(" --max-tokens 64 --greedy
    layerpar generate --checkpoint runs/<run> --prompt "import " --max-tokens 64 --temperature 0.8 \\
        --top-k 40 --seed 1 --stop "\\n\\n"
    layerpar generate --checkpoint runs/<run> --prompt "class " --max-tokens 32 --greedy --workers 2
    layerpar generate --config stdlib_lm --prompt "x = " --max-tokens 8 --greedy   # untrained weights

The prompt is UTF-8 text; the byte tokenizer makes it BOS + its bytes. Decoding is greedy unless
--temperature T > 0 (then seeded sampling: --seed S makes it reproducible; without one a seed is chosen
and printed). It stops at --max-tokens, a --stop string (repeatable; the text ends before it), the
end-of-text token, or the model's context. --workers W spreads the branches over W Ray workers
(runtime/lm_decode.py; 0: this process). The generated text goes to stderr as it is made (--quiet:
not); the last stdout line is ONE JSON object: text, tokens, prompt_tokens, completion_tokens,
stop_reason, token_ms (per token), ms_per_token_p50, num_branches, seed, workers. Bad input (an empty
prompt, one longer than the context, --max-tokens 0 or above serve.max_new_tokens, text that is not
UTF-8, ...) is one sentence and exit 2.
"""

from __future__ import annotations

import argparse
import codecs
import json
import statistics
import sys

from layerpar.config import ConfigError
from layerpar.data.text import ByteTokenizer
from layerpar.serve.generation import GenerationError, Sampling, Scheduler, Token, check_request


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="layerpar generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint directory, or a RUN_DIR (its latest checkpoint)")
    ap.add_argument("--config", help="YAML path or packaged config name (without --checkpoint: fresh, "
                                     "untrained weights)")
    ap.add_argument("--prompt", required=True, help="the text to continue (UTF-8, not empty)")
    ap.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    ap.add_argument("--greedy", action="store_true", help="the most likely token each time (the default "
                                                          "unless --temperature > 0)")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: sample from softmax(logits / T)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    ap.add_argument("--seed", type=int, help="the sampler's seed (reproducible sampling)")
    ap.add_argument("--stop", action="append", default=[], metavar="STR",
                    help="stop when the text contains STR (repeatable)")
    ap.add_argument("--num-branches", type=int, help="decode with the prefix of the first k branches")
    ap.add_argument("--workers", type=int, help="branch workers W (Ray; 0: one process; default "
                                                "parallel.workers of the config)")
    ap.add_argument("--quiet", action="store_true", help="do not echo the text to stderr as it is made")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override, repeatable (e.g. model.dtype=float64)")
    return ap


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise GenerationError(f"the {what} is not valid UTF-8 (character {exc.start})") from None


def request(args) -> Sampling:
    if args.greedy and args.temperature > 0:
        raise GenerationError("--greedy and --temperature > 0 contradict each other: give one")
    if args.workers is not None and args.workers < 0:
        raise GenerationError(f"--workers must be >= 0, got {args.workers}")
    return Sampling(max_tokens=args.max_tokens, temperature=0.0 if args.greedy else args.temperature,
                    top_k=args.top_k, seed=args.seed, num_branches=args.num_branches,
                    stop=tuple(_utf8(s, "--stop string") for s in args.stop))


def run(args) -> tuple[dict, int]:
    """(summary, exit code); raises GenerationError / ConfigError / ... for bad input."""
    from layerpar.serve.lm_source import apply_threads, make_decoder, open_lm

    tok = ByteTokenizer()
    sampling = request(args)
    prompt = tok.encode(_utf8(args.prompt, "prompt"), bos=True)
    if not args.prompt:
        raise GenerationError("the prompt is empty: give at least one character")
    if not args.checkpoint and not args.config:
        raise GenerationError("give --checkpoint RUN (or --config NAME for untrained weights)")
    sets = [*args.set, "serve.generate_slots=1"]
    if args.workers is not None:
        sets.append(f"parallel.workers={args.workers}")
    cfg, model, ckpt_dir, _ = open_lm(args.checkpoint, config=args.config, sets=sets)
    branches = cfg.model.num_branches if cfg.model.kind == "paraformer_lm" else 1
    check_request(prompt, sampling, context=cfg.model.context, vocab=tok.vocab_size, branches=branches,
                  max_tokens=cfg.serve.max_new_tokens)  # before any worker starts
    import ray

    started_ray = cfg.parallel.workers > 0 and not ray.is_initialized()
    apply_threads(cfg)
    decoder = make_decoder(cfg, model)
    sched = Scheduler(decoder, piece=lambda t: tok.decode_bytes([t]), eos=tok.EOS,
                      max_tokens=cfg.serve.max_new_tokens)
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # a character may span tokens
    echo = None if args.quiet else sys.stderr

    def on_event(e):
        if echo is not None and isinstance(e, Token):
            echo.write(utf8.decode(e.piece))
            echo.flush()

    try:
        gen = sched.submit(prompt, sampling, on_event=on_event)
        done = gen.wait(None)
    finally:
        sched.close()
        decoder.close()
        if started_ray:
            ray.shutdown()
    if echo is not None:
        echo.write(utf8.decode(b"", final=True) + "\n")
        echo.flush()
    out = {"text": done.text.decode("utf-8", "replace"), "tokens": done.tokens,
           "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
           "stop_reason": done.reason, "stop_sequence": done.stop_sequence.decode("utf-8", "replace"),
           "token_ms": [round(t, 3) for t in done.token_ms],
           "ms_per_token_p50": round(statistics.median(done.token_ms[1:] or done.token_ms or [0.0]), 3),
           "num_branches": done.branches, "seed": done.seed, "workers": cfg.parallel.workers,
           "greedy": sampling.temperature == 0, "checkpoint": str(ckpt_dir) if ckpt_dir else None}
    if done.code != "OK":
        out["error"] = done.message
        return out, 1
    return out, 0


def generate_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from layerpar.train.checkpoint import CheckpointError

    try:
        out, code = run(args)
    except (GenerationError, ConfigError, CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"error": str(exc)}))
        return 2
    if "error" in out:
        print(f"error: {out['error']}", file=sys.stderr)
    print(json.dumps(out))
    return code
