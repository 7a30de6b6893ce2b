"""All-to-all hidden behind compute on every layout (`parallel.overlap`): step time and time
blocked on all-to-alls, with an injected all-to-all latency (a2a_latency.py), on 4 gloo ranks.

- pp = 1, dp 2 x ep 2 (ep = 2 inside dp = 4): the ZeRO engine with `parallel.overlap: off`
  (serial micro-batches, blocking exchanges), paired micro-batches (F0, F1&B0, ..., B(N-1))
  with the shared experts after the routed ones, and paired + shared experts during dispatch
  (what `parallel.overlap: auto` runs).
- pp 2 x ep 2: 1F1B and ZB1P with overlap off and on (paired steady state).

The model is configs/tiny.yaml (1 dense + 3 MoE blocks, MTP, hidden 256) with a 1,024-token
vocabulary and micro-batches of `--batch` x `--seq` tokens; `--grad-accum` micro-batches a step.
Every engine lives in the same 4 processes and they take turns, one step each per round (load
hits all alike); a step is forward/backward + ZeRO reduce + AdamW. Reported: the slowest rank's
median step and forward/backward time, and the time blocked on row exchanges (mean over ranks).

Simulator: for every runtime-driven engine (paired pp = 1, 1F1B / ZB1P) the forward/backward is
predicted by replaying its schedule (parallel.pipeline.simulate) with per-stage costs measured
at 0 ms (`Costs.from_timeline`, mean over the timed rounds) plus, per forward and per backward of a stage, its exchanges
times the latency; an F&B pair costs its longer half (the injected latency is a delay, not a
shared link, so the two halves' exchanges do not queue behind each other). The shared experts'
overlap inside a lone forward or backward is not modelled.
Run: python benchmarks/bench_overlap.py [--latency-ms 0 2 5 20] [--rounds 3] [--only pp1|pp2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
from a2a_latency import LatencyInjector  # noqa: E402
from model.batch import make_batch  # noqa: E402
from parallel.engine import build_engine  # noqa: E402
from parallel.pipeline.model_stage import model_layout  # noqa: E402
from parallel.pipeline.simulate import Costs, replay  # noqa: E402
from parallel.topology import Topology  # noqa: E402
from tests.distributed.spawn import run_ranks  # noqa: E402
from trainer.config import load_config  # noqa: E402

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
PP1 = ("serial", "paired", "paired + shared")
PP2 = ("1f1b off", "1f1b on", "zb1p off", "zb1p on")


@dataclass
class Opts:
    latencies_ms: tuple = (0.0, 2.0, 5.0, 20.0)
    rounds: int = 3
    grad_accum: int = 4
    batch: int = 2
    seq: int = 64
    parts: tuple = ("pp1", "pp2")


def _cfg(o: Opts, *extra):
    return load_config(TINY, ["model.vocab_size=1024", f"model.max_seq_len={o.seq}",
                                             f"data.seq_len={o.seq}", f"train.grad_accum={o.grad_accum}",
                                             f"train.micro_batch_size={o.batch}", "parallel.ep=2", *extra])


def _engines(o: Opts, part: str) -> dict:
    """label -> (engine, runtime or None); every rank builds them in the same order."""
    out = {}
    for label in (PP1 if part == "pp1" else PP2):
        if part == "pp1":
            cfg = _cfg(o, f"parallel.overlap={'off' if label == 'serial' else 'auto'}")
        else:
            name, mode = label.split()
            cfg = _cfg(o, "parallel.pp=2", f"parallel.schedule={name}", f"parallel.overlap={'auto' if mode == 'on' else 'off'}")
        topo = Topology.from_config(cfg.parallel, num_experts=cfg.moe.num_experts)
        eng = build_engine(cfg, topo, torch.device("cpu"))
        rt = None
        if part == "pp2":
            rt = eng.runtime
        elif eng.paired is not None:
            rt = eng.paired.runtime(o.grad_accum)
            eng.paired.chunk.inner.shared_in_flight = label == "paired + shared"
        if rt is not None:
            rt.record_timeline = True
        out[label] = (cfg, topo, eng, rt)
    return out


def _step(eng, batches) -> float:
    t0 = time.perf_counter()
    eng.forward_backward(batches)
    fb = time.perf_counter() - t0
    eng.reduce_and_norm()
    eng.apply(1e-4)
    return fb


def _rank(rank, world, o: Opts, part: str):
    lat = LatencyInjector().install()
    engines = _engines(o, part)
    cfg, topo = next(iter(engines.values()))[:2]
    g = torch.Generator().manual_seed(topo.dp_rank)
    batches = [make_batch(torch.randint(0, 1024, (o.batch, o.seq), generator=g), [[o.seq]] * o.batch)
               for _ in range(o.grad_accum)]
    res = {}
    for delay in o.latencies_ms:
        lat.delay_s = delay / 1000
        times = {label: ([], [], []) for label in engines}
        timelines = {label: [] for label in engines}  # the timed rounds' actions, one list
        for i in range(o.rounds + 1):
            for label, (_, _, eng, rt) in engines.items():
                dist.barrier()
                t0, b0 = time.perf_counter(), lat.blocked_s
                fb = _step(eng, batches)
                blocked = lat.blocked_s - b0
                dist.barrier()
                for lst, v in zip(times[label], (time.perf_counter() - t0, fb, blocked)):
                    lst.append(v)
                if rt is not None and i > 0:
                    timelines[label] += rt.timeline
        for label, (_, topo_l, _, rt) in engines.items():
            medians = [statistics.median(v[1:]) for v in times[label]]
            res[(delay, label)] = (medians, timelines[label] if rt is not None else None, topo_l.pp_rank)
    lat.uninstall()
    return res


def _exchanges_per_pass(cfg, schedule, stage: int) -> int:
    """Row exchanges of one forward (= one backward) of a stage: dispatch + combine per MoE block
    (one hop: ep = 2 on one node), the MTP module's block on the head stage."""
    blocks = model_layout(cfg, schedule.placement.num_stages)[stage]
    n_moe = sum(i >= cfg.model.first_k_dense for i in blocks)
    if stage == schedule.placement.num_stages - 1:
        n_moe += cfg.mtp.depth
    return 2 * n_moe


def predict(cfg, schedule, timelines: list, ranks: list, latency_s: float) -> float:
    """Replayed forward/backward seconds at `latency_s` from 0 ms timelines (see the module doc)."""
    c0 = Costs.from_timeline(timelines, placement=schedule.placement, ranks=ranks)
    comm = {s: _exchanges_per_pass(cfg, schedule, s) * latency_s for s in range(schedule.placement.num_stages)}
    c = Costs(F=c0.F, I=c0.I, W=c0.W, FB=c0.FB)
    for (s, op), v in c0.stages.items():
        c.stages[(s, op)] = v + (comm[s] if op in ("F", "I") else 0.0)
    for (s, s2), v in c0.pairs.items():
        c.pairs[(s, s2)] = max(v, c.at("F", s), c.at("B", s2))
    return replay(schedule, c).makespan


def table(o: Opts, part: str, results: list) -> list[str]:
    labels = PP1 if part == "pp1" else PP2
    base = {"pp1": lambda lab: "serial", "pp2": lambda lab: lab.split()[0] + " off"}[part]
    head = ("pp = 1, dp 2 x ep 2 (4 gloo ranks), grad_accum %d" if part == "pp1" else
            "pp 2 x ep 2 (4 gloo ranks), grad_accum %d") % o.grad_accum
    lines = [head, f"{'a2a latency':>11} {'run':<16} {'step ms':>8} {'x base':>7} {'fwd-bwd ms':>10} "
                   f"{'blocked ms':>10} {'x base':>7} {'sim fwd-bwd':>11} {'sim/meas':>8}"]
    cfgs = {lab: _cfg_for(o, part, lab) for lab in labels}
    for delay in o.latencies_ms:
        for lab in labels:
            per = [r[(delay, lab)] for r in results]
            step = max(p[0][0] for p in per)
            fb = max(p[0][1] for p in per)
            blocked = statistics.mean(p[0][2] for p in per)
            ref = [r[(delay, base(lab))] for r in results]
            ref_step = max(p[0][0] for p in ref)
            ref_blocked = statistics.mean(p[0][2] for p in ref)
            sim = "-"
            zero = [r[(0.0, lab)] for r in results]
            if zero[0][1] is not None and 0.0 in o.latencies_ms:
                cfg, sched = cfgs[lab]
                tl, ranks = _stage_timelines(zero, sched)
                sim_s = predict(cfg, sched, tl, ranks, delay / 1000)
                sim = f"{1000 * sim_s:>11.1f} {sim_s / fb:>8.2f}"
            rb = f"{blocked / ref_blocked:>7.2f}" if ref_blocked > 0 else f"{'-':>7}"
            lines.append(f"{delay:>8.1f} ms {lab:<16} {1000 * step:>8.1f} {step / ref_step:>7.2f} {1000 * fb:>10.1f} "
                         f"{1000 * blocked:>10.1f} {rb} {sim if sim != '-' else f'{sim:>11}'}")
    return lines


def _stage_timelines(per_rank: list, schedule) -> tuple[list, list]:
    """One timeline per pipeline rank (the dp ranks of a stage ran the same list)."""
    seen, tls, ranks = set(), [], []
    for _, tl, pp_rank in per_rank:
        if pp_rank not in seen:
            seen.add(pp_rank)
            tls.append(tl)
            ranks.append(pp_rank)
    return tls, ranks


def _cfg_for(o: Opts, part: str, label: str):
    """(config, schedule) of a runtime-driven engine, built without processes."""
    from parallel.pipeline.schedules import build_schedule
    if part == "pp1":
        return _cfg(o), build_schedule("1f1b", 1, o.grad_accum, paired=True)
    name, mode = label.split()
    cfg = _cfg(o, "parallel.pp=2", f"parallel.schedule={name}")
    return cfg, build_schedule(name, 2, o.grad_accum, paired=mode == "on")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 2.0, 5.0, 20.0])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--only", choices=("pp1", "pp2"), default=None)
    a = p.parse_args(argv)
    if any(v < 0 for v in a.latency_ms) or a.rounds < 1 or a.grad_accum < 1:
        print("error: --latency-ms must be >= 0, --rounds and --grad-accum >= 1", file=sys.stderr)
        return 2
    o = Opts(tuple(sorted(set([0.0, *a.latency_ms]))), a.rounds, a.grad_accum, a.batch, a.seq,
             (a.only,) if a.only else ("pp1", "pp2"))
    print(f"tiny DeepSeek-V3 (configs/tiny.yaml, vocab 1024), micro-batches of {o.batch}x{o.seq} tokens; "
          f"median of {o.rounds} rounds after a warm-up, slowest rank; blocked = mean over ranks; "
          f"x base = vs the same layout with overlap off")
    for part in o.parts:
        results = run_ranks(_rank, 4, o, part, timeout=3600)
        print("\n".join([""] + table(o, part, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
