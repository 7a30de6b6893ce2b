"""Benchmark: AdamW step time, per-tensor reference vs PyTorch's multi-tensor kernels.

Two shapes of optimizer state: the ZeRO-1 flat shards (a few large fp32 buffers, as
`parallel/data_parallel.py` holds them) and the single-process optimizer's per-parameter
tensors (the tiny config's ~100 parameters). "before" runs `adamw_update_` once per tensor (what
both optimizers did); "after" runs `adamw_step_`: the fused AdamW kernel for fp32 moments,
foreach ops for bf16 moments. The table gives the median step time.

    python benchmarks/bench_adamw.py [--shard-mb 64] [--buckets 4] [--steps 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from parallel.adamw import adamw_step_, adamw_update_  # noqa: E402


def _state(sizes: list[int], moment_dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=g) for n in sizes]
    grads = [torch.randn(n, generator=g) for n in sizes]
    return params, grads, [torch.zeros(n, dtype=moment_dtype) for n in sizes], \
        [torch.zeros(n, dtype=moment_dtype) for n in sizes]


def time_steps(sizes: list[int], moment_dtype: torch.dtype, fast: bool, steps: int) -> float:
    params, grads, m, v = _state(sizes, moment_dtype)
    wds = [0.1] * len(sizes)
    times = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        if fast:
            adamw_step_(params, grads, m, v, wds, step, 1e-3, 0.9, 0.95, 1e-8)
        else:
            for p, g, a, b, wd in zip(params, grads, m, v, wds):
                adamw_update_(p, g, a, b, step, 1e-3, 0.9, 0.95, 1e-8, wd)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def tiny_param_sizes() -> list[int]:
    from model.transformer import build_model
    from trainer.config import load_config
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"), [])
    return [p.numel() for p in build_model(cfg).parameters()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shard-mb", type=float, default=64.0, help="fp32 MB of each ZeRO flat shard")
    p.add_argument("--buckets", type=int, default=4)
    p.add_argument("--steps", type=int, default=7)
    a = p.parse_args(argv)
    cases = {f"ZeRO flat shards {a.buckets} x {a.shard_mb:g} MB": [int(a.shard_mb * 2**20 / 4)] * a.buckets}
    sizes = tiny_param_sizes()
    cases[f"tiny model, {len(sizes)} tensors, {sum(sizes) / 1e6:.1f}M"] = sizes
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'state':<36} {'moments':>8} {'before ms':>10} {'after ms':>9} {'speed-up':>9}")
    for name, shape in cases.items():
        for dtype in (torch.float32, torch.bfloat16):
            before = time_steps(shape, dtype, False, a.steps)
            after = time_steps(shape, dtype, True, a.steps)
            print(f"{name:<36} {str(dtype).split('.')[-1]:>8} {before * 1e3:>10.1f} {after * 1e3:>9.1f} "
                  f"{before / after:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
