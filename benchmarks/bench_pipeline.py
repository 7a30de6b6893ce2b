"""Pipeline step time: our runtime (1F1B, ZB1P, DualPipe, DualPipeV) vs torch.distributed.pipelining
(Schedule1F1B, ScheduleDualPipeV) on 4 gloo ranks, same toy MLP stages, same micro-batches.

Each stage is `LAYERS` blocks of Linear(D, D) + tanh; all schedules run the same 8 blocks
(4 stages of 2 for 1F1B/ZB1P/DualPipe, 8 stages of 1 for the V schedules). The table shows the
median step time over `--steps` after one warm-up step, and, for ours, the bubble fraction the
simulator predicts with F = I = W.  Run: python benchmarks/bench_pipeline.py [--steps 5]
Note: our F&B pairs run serially here (the overlap needs the EP dispatcher's async handles),
as torch's do; the difference is scheduling and runtime overhead only.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, ".")
from parallel.pipeline.runtime import ModuleChunk, PipelineRuntime, reduce_shared_grads  # noqa: E402
from parallel.pipeline.schedules import build_schedule  # noqa: E402
from parallel.pipeline.simulate import replay  # noqa: E402
from tests.distributed.spawn import run_ranks  # noqa: E402

TOTAL_LAYERS = 8


def blocks(ids, d):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(d, d, bias=False), nn.Tanh()) for _ in ids])


def _ours(rank, world, name, n, d, rows, steps):
    s = build_schedule(name, world, n)
    S = s.placement.num_stages
    per = TOTAL_LAYERS // S
    xs, ts = [torch.randn(rows, d) for _ in range(n)], [torch.randn(rows, d) for _ in range(n)]
    chunks = []
    for c in range(s.placement.chunks_per_rank):
        st = s.placement.stage_of(rank, c)
        chunks.append(ModuleChunk(blocks(range(st * per, (st + 1) * per), d), inputs=xs if st == 0 else None,
                                  loss_fn=(lambda m, y: ((y - ts[m]) ** 2).mean()) if st == S - 1 else None))
    times = []
    for _ in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        PipelineRuntime(s, rank, chunks).run()
        if s.placement.copies == 2:
            reduce_shared_grads(chunks, rank, world)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _torch(rank, world, name, n, d, rows, steps):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV
    dev = torch.device("cpu")
    x, t = torch.randn(n * rows, d), torch.randn(n * rows, d)
    loss_fn = lambda y, tgt: ((y - tgt) ** 2).mean()  # noqa: E731
    if name == "1f1b":
        per = TOTAL_LAYERS // world
        stage = PipelineStage(blocks(range(per), d), rank, world, dev)
        sched = Schedule1F1B(stage, n, loss_fn=loss_fn)
        first, last = rank == 0, rank == world - 1
    else:
        S = 2 * world
        stages = [PipelineStage(blocks(range(TOTAL_LAYERS // S), d), i, S, dev) for i in (rank, S - 1 - rank)]
        sched = ScheduleDualPipeV(stages, n, loss_fn=loss_fn)
        first = last = rank == 0
    times = []
    for _ in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        args = (x,) if first else ()
        sched.step(*args, target=t if last else None)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    common = (a.micro, a.d, a.rows, a.steps)
    rows = []
    for name in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        sec = max(run_ranks(_ours, a.world, name, *common, timeout=600))
        rp = replay(build_schedule(name, a.world, a.micro))
        frac = max(rp.bubble(r) for r in range(a.world)) / rp.makespan
        rows.append((f"ours {name}", sec, f"{100 * frac:.0f}%"))
    for name in ("1f1b", "dualpipev"):
        try:
            sec = max(run_ranks(_torch, a.world, name, *common, timeout=600))
        except RuntimeError as e:
            print(f"torch {name} failed: {str(e).splitlines()[-1]}")
            continue
        rows.append((f"torch {'Schedule1F1B' if name == '1f1b' else 'ScheduleDualPipeV'}", sec, "-"))
    base = {r[0]: r[1] for r in rows}
    print(f"world={a.world} micro={a.micro} d={a.d} rows={a.rows} layers={TOTAL_LAYERS} (gloo, CPU)")
    print(f"{'schedule':<28} {'step ms':>9} {'vs torch 1F1B':>14} {'sim bubble':>11}")
    ref = base.get("torch Schedule1F1B")
    for label, sec, frac in rows:
        rel = f"{sec / ref:.2f}x" if ref else "-"
        print(f"{label:<28} {1000 * sec:>9.1f} {rel:>14} {frac:>11}")


if __name__ == "__main__":
    main()
