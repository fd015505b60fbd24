"""Fused branch stack vs a loop over branches: the cost of K branches on one device.

    python launch/bench_fused.py                          # batch 1, 1 thread, width 64, K = 1,4,8,16
    python launch/bench_fused.py --tokens 50 --reps 500   # Fashion-MNIST's 50 tokens
    python launch/bench_fused.py --dim 192 --heads 3 --mlp-dim 768 --tokens 197 --reps 50

Both paths are the model's own: ParaFormer.branch_outputs(x0, ids, fused=True | False), inference
(no autograd), the same weights. Timings alternate fused and loop call by call, so a busy machine
slows both alike; each number is the median over --reps calls. Target: fused >= 1.8x faster at K = 8
(batch 1, 1 thread, width 64). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from layerpar.config import load_config
from layerpar.model import ParaFormer


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="1,4,8,16", help="branch counts K to compare (comma-separated)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp-dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=1, help="blocks per branch")
    ap.add_argument("--tokens", type=int, default=17, help="tokens incl. CLS (17: digits, 2x2 patches)")
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=50)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    side = int(round((args.tokens - 1) ** 0.5))  # a square grid of 1x1 patches gives the token count
    if side * side + 1 != args.tokens:
        raise SystemExit(f"--tokens ({args.tokens}) must be a square + 1 (CLS), e.g. 17, 50, 65, 197")
    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    print(f"batch {args.batch}, {args.threads} thread(s), width {args.dim}, {args.heads} heads, "
          f"MLP {args.mlp_dim}, depth {args.depth}, {args.tokens} tokens; median of {args.reps} calls")
    print(f"{'K':>4} {'loop ms':>9} {'fused ms':>9} {'speed-up':>9}")
    for k in ks:
        cfg = load_config(None, [f"model.dim={args.dim}", f"model.heads={args.heads}",
                                 f"model.mlp_dim={args.mlp_dim}", f"model.num_branches={k}",
                                 f"model.branch_depth={args.depth}", f"model.image_size={side}",
                                 "model.patch_size=1"])
        model = ParaFormer(cfg.model, seed=0).eval()
        ids = model.branch_ids
        x0 = torch.randn(args.batch, args.tokens, args.dim)  # (B, T, D), the embedded input
        times = {"loop": [], "fused": []}
        with torch.no_grad():
            diff = (model.branch_outputs(x0, ids, fused=True)
                    - model.branch_outputs(x0, ids, fused=False)).abs().max().item()
            for i in range(args.warmup + args.reps):
                for name, fused in (("loop", False), ("fused", True)):  # alternate: same conditions
                    t0 = time.perf_counter()
                    model.branch_outputs(x0, ids, fused=fused)
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - t0)
        loop_ms = statistics.median(times["loop"]) * 1e3
        fused_ms = statistics.median(times["fused"]) * 1e3
        rows.append({"K": k, "loop_ms": round(loop_ms, 4), "fused_ms": round(fused_ms, 4),
                     "speedup": round(loop_ms / fused_ms, 3), "max_abs_diff": diff})
        print(f"{k:>4} {loop_ms:>9.3f} {fused_ms:>9.3f} {loop_ms / fused_ms:>8.2f}x")
    at8 = next((r["speedup"] for r in rows if r["K"] == 8), None)
    print(json.dumps({"benchmark": "fused_branch_stack", "batch": args.batch, "threads": args.threads,
                      "dim": args.dim, "heads": args.heads, "mlp_dim": args.mlp_dim, "depth": args.depth,
                      "tokens": args.tokens, "reps": args.reps, "rows": rows, "speedup_k8": at8,
                      "target_k8": 1.8, "meets_target": at8 is not None and at8 >= 1.8}))


if __name__ == "__main__":
    main()
