"""Per-rank parameter + gradient + optimizer bytes with `train.param_dtype` fp32 vs bf16, measured
on real gloo ranks against the planner's prediction (which must be exact).

Every layout runs as 4 spawned ranks through the trainer's own `build_run` and one optimizer
step (`benchmarks/bench_plan.measure_rank`: bytes of every parameter, of every `.grad` after the
backward, of the ZeRO-1 buckets' fp32 masters and moments); the prediction is
`trainer.plan.memory.static_bytes` for the same rank (`benchmarks/bench_plan.predict`). bf16
parameters run under bf16 autocast (the CPU emulation of the GPU path).

Run: python benchmarks/bench_param_dtype.py [--layouts 1,1,1f1b,2 2,2,dualpipev,4]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

sys.path.insert(0, ".")
from benchmarks.bench_plan import CONFIGS, WORLD, cpu_cluster, layout_config, measure_rank, predict  # noqa: E402
from tests.distributed.spawn import run_ranks  # noqa: E402
from trainer.config import load_config  # noqa: E402

KEYS = ("weights", "grads", "master", "moments")
HEAD = ("| param_dtype | pp x dp x ep | schedule | pp rank | weights B | grads B | master B | moments B | "
        "total B | planner B | |")


def rows(dtype: str, pp: int, ep: int, schedule: str, n: int, base) -> list[str]:
    cfg = layout_config(base, pp, ep, schedule, n)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, param_dtype=dtype,
                                                             dtype="bf16" if dtype == "bf16" else "fp32"))
    measured = run_ranks(measure_rank, WORLD, cfg, 0, timeout=600)
    pred = predict(cfg, pp, ep, schedule, n, cpu_cluster(cfg, 1e9, 1.0, 1.0))["ranks"]
    out = []
    for r in range(pp):
        same = [m for m in measured if m["pp_rank"] == r]
        assert all(m[k] == same[0][k] for m in same for k in KEYS), f"dp/ep ranks of pp rank {r} differ"
        m, p = same[0], pred[r]
        got, want = sum(m[k] for k in KEYS), sum(p[k] for k in KEYS)
        exact = all(m[k] == p[k] for k in KEYS)
        out.append(f"| {dtype} | {pp} x {WORLD // pp} x {ep} | {schedule} | {r} | "
                   + " | ".join(f"{m[k]:,}" for k in KEYS) + f" | {got:,} | {want:,} | "
                   f"{'exact' if exact else 'DIFFERS'} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="*", default=["1,1,1f1b,2", "1,4,1f1b,2", "2,2,dualpipev,4"],
                    help="pp,ep,schedule,micro-batches (dp = 4 / pp)")
    args = ap.parse_args(argv)
    path, overrides = CONFIGS["tiny"]
    base = load_config(path, overrides)
    table = [HEAD, "|" + "---|" * (HEAD.count("|") - 1)]
    for spec in args.layouts:
        pp, ep, schedule, n = spec.split(",")
        for dtype in ("fp32", "bf16"):
            table += rows(dtype, int(pp), int(ep), schedule, int(n), base)
            print(table[-1], file=sys.stderr, flush=True)
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
