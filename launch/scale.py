"""Scaling study: layerpar against the serial ViT (one device and pipeline-parallel) and the
reference-style single process, swept over workers W x branches N x batch, measured in one run.

    python launch/scale.py                        # default sweep, local Ray, < 5 min on 2 cores
    python launch/scale.py --preset tiny          # seconds (what tests/bench/test_scale.py runs)
    python launch/scale.py --preset gpu-one       # one GPU: N = 1..32 branches fused (no Ray needed)
    python launch/scale.py --preset train         # training: every R x W mesh vs DDP vs one process
    python launch/scale.py --preset lm            # LM decoding: per-token latency by N, W, batch vs the
                                                  # serial GPT (one process, pipelined); last line holds
                                                  # decode_depth_ratio (layerpar/bench/lm_scale.py)
    python launch/scale.py --preset lm-tiny       # the same in seconds (tests/bench/test_scale_lm.py)
    python launch/scale.py --preset train --address auto --set parallel.gpus_per_worker=1 \
        --set bench.devices=[1,2,4,8]             # the training sweep on a GPU cluster (NCCL)
    python launch/scale.py --address auto --set parallel.gpus_per_worker=1 \
        --set bench.workers=[1,2,4,8] --set bench.branches=[8,16,32]   # a GPU cluster

Writes RUN_DIR = <out-dir>/scale-<preset>-<time>/ with results.csv, results.json, report.md and
PNG plots; the last stdout line is one JSON object with run_dir and the headline ratios.
"""

import sys

from layerpar.bench.scale import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
