"""Scaling studies: the systems under test, the timing harness, the cost model and the report.

    python launch/scale.py                      # default sweep on the embedded default (local Ray)
    python launch/scale.py --preset gpu-one     # N = 1..32 branches fused on one GPU (no Ray)

    harness.py    warm-up, repetitions, p50/p95, spread (and CUDA-event timing)
    systems.py    layerpar (both transports), reference-threads, serial ViT (CPU / GPU / CUDA graph)
    pipeline.py   the serial ViT pipeline-parallel over W processes (torch.distributed.pipelining)
    costmodel.py  T(W) = T_embed + ceil(N/W) t_branch + t_broadcast + t_reduce + t_dispatch + T_head
    presets.py    presets (default, tiny, gpu-one) and the bench.* settings
    scale.py      the sweep and cli_main(argv)
    report.py     results.csv / results.json / headline ratios; plots.py and summary.py: PNGs, report.md

Nothing here imports ray at module level: the GPU preset runs where Ray is not installed.
"""
