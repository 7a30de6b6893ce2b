"""Pipeline step time: our runtime (1F1B, ZB1P, DualPipe, DualPipeV) vs torch.distributed.pipelining
(Schedule1F1B, ScheduleDualPipeV) on 4 gloo ranks, same toy MLP stages, same micro-batches.

Each stage is `LAYERS` blocks of Linear(D, D) + tanh; all schedules run the same 8 blocks
(4 stages of 2 for 1F1B/ZB1P/DualPipe, 8 stages of 1 for the V schedules). All runtimes live
in the same 4 processes and take turns, one step each per round, so load changes hit them
alike; the table shows the median step time over `--steps` rounds after one warm-up round and,
for ours, the bubble fraction the simulator predicts with F = I = W.
Run: python benchmarks/bench_pipeline.py [--steps 7] [--overlap]
In that table the stages have no all-to-all, so F&B pairs run serially (as torch's do); the
difference is scheduling and runtime overhead only.

`--overlap` adds the F&B overlap table: a tiny DeepSeek-V3 (MoE in every block, MTP) on
ep = 2 x pp = 2 (4 gloo ranks), DualPipeV, serial pairs vs overlapped pairs
(parallel.pipeline.overlap). Loopback gloo moves these rows in microseconds, so the table also
runs with an artificial all-to-all latency `--delay-ms`: every row exchange (2-D tensors; the
tiny count exchanges are left alone) completes no earlier than that long after it was issued,
as on a real network; a blocking exchange therefore pays it in full, an asynchronous one only
for the part not hidden behind the other micro-batch's compute.

`--model` runs the model mode instead (pipeline_model.py, pipeline_report.py, pipeline_gantt.py):
tiny-config DeepSeek-V3 stages (8 MoE blocks, MTP), pp = 2 x ep = 2, under our 1F1B, ZB1P,
DualPipe and DualPipeV (F&B overlap off and on) and torch's Schedule1F1B and ScheduleDualPipeV
wrapping the same stage modules, at each `--latency-ms`; losses and gradients are checked
against one whole model first (exit 1 if any differs). It prints the step-time table and, per
latency, the simulator's predicted step time and bubbles against the measured timeline, and
writes the measured and simulated Gantt charts to `--png` (one file per latency).
`--layout 1f1b=6,2 dualpipe=6,2 dualpipev=1,3,3,1` cuts a placement's stages unevenly (block counts
per stage, `parallel.layout`; 1f1b also serves zb1p and torch's Schedule1F1B, dualpipev torch's
ScheduleDualPipeV): the head stage, which also runs the output head and MTP, can get fewer blocks.
Run: python benchmarks/bench_pipeline.py --model [--steps 3] [--latency-ms 0 2 5 20] [--micro 8] [--layout ...]
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
from a2a_latency import LatencyInjector  # noqa: E402

TOTAL_LAYERS = 8


def blocks(ids, d):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(d, d, bias=False), nn.Tanh()) for _ in ids])


def _ours(rank, world, name, n, d, rows):
    """A step function for our runtime on schedule `name` (the runtime is reused: shapes cached)."""
    s = build_schedule(name, world, n)
    S = s.placement.num_stages
    per = TOTAL_LAYERS // S
    xs, ts = [torch.randn(rows, d) for _ in range(n)], [torch.randn(rows, d) for _ in range(n)]
    chunks = []
    for c in range(s.placement.chunks_per_rank):
        st = s.placement.stage_of(rank, c)
        chunks.append(ModuleChunk(blocks(range(st * per, (st + 1) * per), d), inputs=xs if st == 0 else None,
                                  loss_fn=(lambda m, y: ((y - ts[m]) ** 2).mean()) if st == S - 1 else None))
    rt = PipelineRuntime(s, rank, chunks)

    def step():
        rt.run()
        if s.placement.copies == 2:
            reduce_shared_grads(chunks, rank, world)
    return step


def _torch(rank, world, name, n, d, rows):
    """A step function for torch.distributed.pipelining's Schedule1F1B / ScheduleDualPipeV."""
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
    return lambda: sched.step(*((x,) if first else ()), target=t if last else None)


LABELS = {"ours 1f1b": (_ours, "1f1b"), "ours zb1p": (_ours, "zb1p"), "ours dualpipe": (_ours, "dualpipe"),
          "ours dualpipev": (_ours, "dualpipev"), "torch Schedule1F1B": (_torch, "1f1b"),
          "torch ScheduleDualPipeV": (_torch, "dualpipev")}


def _all(rank, world, n, d, rows, steps):
    """Every runtime in the same processes, one step of each per round (load hits all alike)."""
    fns = {label: make(rank, world, name, n, d, rows) for label, (make, name) in LABELS.items()}
    times = {label: [] for label in fns}
    for _ in range(steps + 1):
        for label, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(ts[1:]) for label, ts in times.items()}


def _overlap_rank(rank, world, overlap, delay_ms, n, steps, d):
    from parallel.config import ParallelConfig
    from parallel.expert import parallelize_experts
    from parallel.pipeline.model_stage import ModelChunk, build_union_chunks
    from parallel.pipeline.overlap import OverlapModelChunk, OverlapPairExecutor
    from parallel.pipeline.runtime import PairExecutor
    from parallel.topology import Topology
    from model.batch import make_batch
    from trainer.config import load_config

    lat = LatencyInjector(delay_ms / 1000).install()
    topo = Topology.from_config(ParallelConfig(pp=2, ep=2))
    cfg = load_config(None, ["model.vocab_size=256", "model.max_seq_len=64", "data.seq_len=64",
                             "model.num_layers=4", "model.first_k_dense=0", f"model.hidden_size={d}",
                             f"moe.expert_ffn_size={d // 2}", "attention.num_heads=4"])
    g = torch.Generator().manual_seed(topo.dp_rank)
    batches = [make_batch(torch.randint(0, 256, (4, 64), generator=g), [[64]] * 4) for _ in range(n)]
    s = build_schedule("dualpipev", topo.pp, n)
    model, chunks = build_union_chunks(cfg, s, topo.pp_rank, batches, split_w=True,
                                       chunk_cls=OverlapModelChunk if overlap else ModelChunk)
    parallelize_experts(model, topo)
    pair = OverlapPairExecutor() if overlap else PairExecutor()
    rt = PipelineRuntime(s, topo.pp_rank, chunks, group_ranks=topo.ranks("pp"), pair=pair)
    times, cpu, waits = [], [], []
    for _ in range(steps + 1):
        dist.barrier()
        t0, c0, b0 = time.perf_counter(), time.process_time(), lat.blocked_s
        rt.run()
        cpu.append(time.process_time() - c0)
        waits.append(lat.blocked_s - b0)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return [statistics.median(x[1:]) for x in (times, cpu, waits)]


def overlap_table(a) -> None:
    print(f"\nF&B overlap: tiny DeepSeek-V3 d={a.overlap_d}, ep=2 x pp=2, dualpipev, micro={a.micro}")
    print("step = slowest rank's median step; cpu = its CPU time; blocked = time it sat waiting on row "
          "exchanges (mean over ranks)")
    print(f"{'a2a latency':<12} {'pairs':<11} {'step ms':>8} {'cpu ms':>7} {'blocked ms':>11}")
    for delay in (0.0, *a.delay_ms):
        for ov in (False, True):
            res = run_ranks(_overlap_rank, 4, ov, delay, a.micro, a.steps, a.overlap_d, timeout=600)
            step, cpu = max(r[0] for r in res), max(r[1] for r in res)
            blocked = statistics.mean(r[2] for r in res)
            print(f"{delay:>9.1f} ms {'overlapped' if ov else 'serial':<11} {1000 * step:>8.1f} "
                  f"{1000 * cpu:>7.1f} {1000 * blocked:>11.1f}")


def model_mode(a) -> int:
    """The model mode (see the module docstring); returns 1 if a runtime's losses or gradients differ."""
    from pipeline_model import ModelOpts, model_rank
    from pipeline_report import check_lines, sim_sections, table_lines

    o = ModelOpts(micro=a.micro, rounds=a.steps, latencies_ms=tuple(a.latency_ms), layouts=a.layout)
    results = run_ranks(model_rank, 4, o, timeout=3600)
    checks, ok = check_lines(results, o)
    print(f"model mode: tiny DeepSeek-V3 widths, {o.layers} MoE blocks + MTP, pp=2 x ep=2 (4 gloo ranks, CPU), "
          f"micro={o.micro} of {o.batch}x{o.seq} tokens; median of {o.rounds} rounds after a warm-up, slowest rank; "
          f"one step of each runtime per round")
    print("layout (blocks per stage): " + ", ".join(f"{k} {o.layouts.get(k, 'even')}" for k in LAYOUT_PLACEMENTS))
    print("\n".join(checks + [""] + table_lines(results, o) + sim_sections(results, o, a.png)))
    return 0 if ok else 1


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--overlap", action="store_true", help="also run the F&B overlap table")
    p.add_argument("--only-overlap", action="store_true", help="run only the F&B overlap table")
    p.add_argument("--delay-ms", type=float, nargs="+", default=[5.0, 20.0])
    p.add_argument("--overlap-d", type=int, default=64)
    p.add_argument("--model", action="store_true", help="run the model mode (DeepSeek-V3 stages, ep=2 x pp=2)")
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 2.0, 5.0, 20.0],
                   help="model mode: injected all-to-all latencies")
    p.add_argument("--png", default="runs/bench_pipeline/gantt.png",
                   help="model mode: Gantt charts, one file per latency (<stem>_<ms>ms.png); '' for none")
    p.add_argument("--layout", nargs="+", default=[], metavar="PLACEMENT=COUNTS",
                   help="model mode: block counts per stage of a placement (1f1b, dualpipe: 2 stages; "
                        "dualpipev: 4), e.g. 1f1b=6,2 dualpipev=1,3,3,1; absent: even")
    a = p.parse_args(argv)
    a.layout = _layouts(a.layout)
    for flag in ("latency_ms", "delay_ms"):
        bad = [v for v in getattr(a, flag) if v < 0]
        if bad:
            _fail(f"--{flag.replace('_', '-')} = {bad[0]:g}: an injected latency must be >= 0 ms")
    if a.steps < 1:
        _fail(f"--steps = {a.steps}: must be >= 1")
    return a


LAYOUT_PLACEMENTS = ("1f1b", "dualpipe", "dualpipev")


def _layouts(specs: list[str]) -> dict:
    """--layout PLACEMENT=N,N,... -> {placement: [counts]}, checked against the model mode's blocks."""
    from parallel.pipeline.layout import num_stages, resolve_layout
    from pipeline_model import ModelOpts
    out = {}
    for spec in specs:
        name, _, counts = spec.partition("=")
        if name not in LAYOUT_PLACEMENTS:
            _fail(f"--layout {spec}: placement must be one of {', '.join(LAYOUT_PLACEMENTS)}, e.g. 1f1b=6,2")
        if not all(n.strip().isdigit() for n in counts.split(",")):
            _fail(f"--layout {spec}: give block counts per stage after '=', e.g. {name}=6,2")
        out[name] = [int(n) for n in counts.split(",")]
        try:
            resolve_layout(out[name], ModelOpts().layers, num_stages(name, 2))
        except ValueError as e:
            _fail(f"--layout {spec}: {' '.join(str(e).split())}")
    return out


def _fail(line: str):
    print(f"error: {line}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None):
    a = parse_args(argv)
    if a.model:
        return model_mode(a)
    if a.only_overlap:
        return overlap_table(a)
    res = run_ranks(_all, a.world, a.micro, a.d, a.rows, a.steps, timeout=900)
    sec = {label: max(r[label] for r in res) for label in LABELS}
    print(f"world={a.world} micro={a.micro} d={a.d} rows={a.rows} layers={TOTAL_LAYERS} (gloo, CPU); "
          f"median of {a.steps} rounds, slowest rank; one step of each runtime per round")
    print(f"{'schedule':<26} {'step ms':>8} {'/torch 1F1B':>12} {'/torch DualPipeV':>17} {'sim bubble':>11}")
    for label in LABELS:
        frac = "-"
        if label.startswith("ours"):
            name = LABELS[label][1]
            rp = replay(build_schedule(name, a.world, a.micro))
            frac = f"{100 * max(rp.bubble(r) for r in range(a.world)) / rp.makespan:.0f}%"
        print(f"{label:<26} {1000 * sec[label]:>8.1f} {sec[label] / sec['torch Schedule1F1B']:>11.2f}x "
              f"{sec[label] / sec['torch ScheduleDualPipeV']:>16.2f}x {frac:>11}")
    if a.overlap:
        overlap_table(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
