"""Benchmark: the FP8 per-expert loop before and after (CPU emulation of blockwise FP8).

`FP8GroupedExperts` runs the routed experts of a layer expert by expert when no grouped FP8
kernel exists (blockwise scaling, TE absent). It used to read every count from the device
(`int(c)`, one host sync per expert) and take each expert's weights as `w[e]`, whose backward
writes a zero tensor the size of the whole [E,F,D] weight per expert (at moe_small: 0.74 GB,
192 times per layer). Now: one `tolist()` per layer and `unbind(0)`, whose backward stacks the
E gradients once. Each variant runs forward+backward of one layer in a fresh process; the table
gives the median step time and the peak resident memory above the set-up (model, inputs), with
glibc's mmap threshold at 64 KiB so that freed tensors leave the resident set.

    python benchmarks/bench_fp8_experts.py [--experts 32] [--hidden 256] [--ffn 256] [--rows 2048] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from parallel.fp8.config import FP8Config  # noqa: E402
from parallel.fp8.emulate import emulated_linear, spec_from_config  # noqa: E402
from parallel.fp8.provider import FP8GroupedExperts  # noqa: E402

VARIANTS = ("before: int(c) + w[e]", "after: tolist + unbind")


def before_forward(ex: FP8GroupedExperts, x_SD: torch.Tensor, counts) -> torch.Tensor:
    """The loop as it was: a host read per expert and per-expert indexing of the stacked weights."""
    counts = [int(c) for c in counts]
    outs = []
    for e, x_e in enumerate(torch.split(x_SD, counts)):
        h = F.silu(ex.linear(x_e, ex.w_gate[e])) * ex.linear(x_e, ex.w_up[e])
        outs.append(ex.linear(h, ex.w_down[e]))
    return torch.cat(outs, dim=0)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(variant: int, experts: int, hidden: int, ffn: int, rows: int, steps: int) -> dict:
    torch.manual_seed(0)
    spec = spec_from_config(FP8Config(enabled=True, backend="emulate", recipe="blockwise"))
    ex = FP8GroupedExperts(experts, hidden, ffn, layer=1, backend="emulate",
                           linear=lambda x, w: emulated_linear(x, w, spec))
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.02)
    counts = torch.bincount(torch.randint(0, experts, (rows,)), minlength=experts)
    x = torch.randn(rows, hidden, requires_grad=True)
    base = _rss_mb()
    times = []
    for _ in range(steps):
        ex.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        y = before_forward(ex, x, counts) if variant == 0 else ex(x, counts)
        y.square().mean().backward()
        times.append(time.perf_counter() - t0)
    return {"variant": VARIANTS[variant], "step_s": statistics.median(times), "peak_mb": _rss_mb() - base,
            "grad_sum": float(ex.w_gate.grad.abs().sum())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variant", type=int, default=None, help=argparse.SUPPRESS)   # child process
    a = p.parse_args(argv)
    sizes = (a.experts, a.hidden, a.ffn, a.rows, a.steps)
    if a.variant is not None:
        print(json.dumps(run_variant(a.variant, *sizes)))
        return
    weight_mb = 3 * a.experts * a.hidden * a.ffn * 4 / 2**20
    print(f"experts {a.experts}, hidden {a.hidden}, ffn {a.ffn}, rows {a.rows}; fp32 weights {weight_mb:.0f} MB; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'variant':<32} {'step s':>8} {'peak MB above set-up':>21}")
    results = []
    for v in range(len(VARIANTS)):
        cmd = [sys.executable, __file__, *(f"--{k}={n}" for k, n in zip(("experts", "hidden", "ffn", "rows", "steps"),
                                                                         sizes)), f"--variant={v}"]
        # freed tensors leave the resident set (else glibc keeps them and the peak says little)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.splitlines()[-1])
        results.append(r)
        print(f"{r['variant']:<32} {r['step_s']:>8.3f} {r['peak_mb']:>21.0f}", flush=True)
    same = all(abs(r["grad_sum"] - results[0]["grad_sum"]) <= 1e-5 * abs(results[0]["grad_sum"]) for r in results)
    print(f"same gradients: {same}")


if __name__ == "__main__":
    main()
