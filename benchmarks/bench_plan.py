"""Calibration of the planner (trainer.plan) against real gloo ranks on this machine.

For a model config and a list of parallel layouts (pp x dp x ep, schedule, micro-batches), every
layout runs as 4 real ranks (spawned processes) through the trainer's own `build_run`,
`forward_backward` and `optimizer_step`. Per rank it measures:

- weights, gradients, optimizer state: tensor bytes of the real objects (every parameter, every
  `.grad` after the backward, ZeRO-1 buckets' fp32 master and AdamW moments);
- activations: bytes autograd saves, read with `torch.autograd.graph.saved_tensors_hooks` during
  one step; a tensor counts once per storage (views and tensors saved by two ops share it), and
  parameters are not activations. "per micro-batch" is the sum over the step divided by the
  micro-batch count (one forward of every stage the rank holds); "peak" is the most bytes alive
  at once (a saved tensor dies when autograd frees its graph), the schedule's in-flight count;
- step time: median over the timed steps of the slowest rank (barrier before each step).

Predictions come from the planner's models (trainer.plan.memory, trainer.plan.timing,
trainer.plan.layouts) for the same layout with fp32 activations and PyTorch's math attention (the
CPU path), and a CPU row for the hardware table: the effective FLOP/s of one process running
forward + backward of the same model and micro-batch (calibrated again right before each layout,
so that it sees the same load; printed per layout), times the share of a core each rank gets
(cores / ranks), and the gloo all-reduce bandwidth of 4 ranks as both link bandwidths
(efficiencies 1). Weights, gradients and optimizer state must equal exactly;
activations should agree within 20%; times are shown side by side.

Run: python benchmarks/bench_plan.py [--configs tiny medium] [--steps 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import weakref

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, ".")
from parallel.pipeline.layout import num_stages, resolve_layout  # noqa: E402
from parallel.pipeline.schedules import build_schedule  # noqa: E402
from parallel.topology import Topology  # noqa: E402
from tests.distributed.spawn import run_ranks  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.plan.flops import flops_per_token  # noqa: E402
from trainer.plan.hardware import GPU, Efficiency  # noqa: E402
from trainer.plan.layouts import Candidate, Cluster, Estimate, live_points, timing  # noqa: E402
from trainer.plan.memory import (activation_model, param_inventory, rank_params,  # noqa: E402
                                 stage_activation_bytes, static_bytes)

WORLD = 4
CONFIGS = {
    "tiny": ("configs/tiny.yaml", ["data.seq_len=64", "model.max_seq_len=64", "train.micro_batch_size=2"]),
    "medium": ("configs/tiny.yaml", ["model.hidden_size=512", "model.num_layers=8", "model.dense_ffn_size=1024",
                                     "model.vocab_size=4096", "attention.num_heads=8", "attention.q_lora_rank=128",
                                     "attention.kv_lora_rank=64", "moe.num_experts=16", "moe.expert_ffn_size=256",
                                     "moe.n_group=4", "data.seq_len=64", "model.max_seq_len=64",
                                     "train.micro_batch_size=2"]),
}
# (pp, ep, schedule, micro-batches per step); dp = WORLD / pp
LAYOUTS = [(1, 1, "1f1b", 2), (1, 4, "1f1b", 2), (2, 1, "1f1b", 4), (2, 2, "zb1p", 4),
           (2, 2, "dualpipe", 4), (2, 2, "dualpipev", 4), (4, 1, "1f1b", 4), (4, 1, "zb1p", 4)]


def layout_config(cfg, pp: int, ep: int, schedule: str, n: int, world: int = WORLD):
    par = dataclasses.replace(cfg.parallel, pp=pp, dp=world // pp, ep=ep, schedule=schedule, layout=[])
    dtype = "bf16" if cfg.train.param_dtype == "bf16" else "fp32"  # bf16 parameters need bf16 compute
    train = dataclasses.replace(cfg.train, grad_accum=n, device="cpu", dtype=dtype)
    out = dataclasses.replace(cfg, parallel=par, train=train)
    out.validate()
    return out


class RandomStream:
    """The trainer's stream interface over random tokens (one full-length document per row)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.rng = np.random.default_rng(seed)

    def take(self, n: int):
        return self.rng.integers(0, self.vocab_size, (n, self.seq_len)), None


# ----------------------------------------------------------------------------- measurement


class SavedBytes:
    """Counts the storages autograd saves while active: bytes added, bytes alive and their peak."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, int] = {}
        self.added = self.live = self.peak = 0

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.skip or t.device.type == "meta":
            return t
        if self.refs.get(ptr, 0) == 0:
            n = t.untyped_storage().nbytes()
            self.added += n
            self.live += n
            self.peak = max(self.peak, self.live)
        self.refs[ptr] = self.refs.get(ptr, 0) + 1
        holder = _Holder(t)
        weakref.finalize(holder, self._release, ptr, t.untyped_storage().nbytes())
        return holder

    def _release(self, ptr: int, nbytes: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.live -= nbytes

    @staticmethod
    def unpack(x):
        return x.t if isinstance(x, _Holder) else x

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Holder:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def train_step(run, lr: float, saved: SavedBytes | None = None) -> int:
    """One optimizer step through the trainer; returns the gradient bytes seen before the update."""
    from trainer.loop import optimizer_step, take_batches
    batches = take_batches(run, run.cfg.train.grad_accum)
    with saved.hooks() if saved is not None else _nothing():
        m = run.engine.forward_backward(batches)
    grads = _nbytes(p.grad for p in run.model.parameters())
    optimizer_step(run, run.engine.reduce_metrics(m), lr, run.cfg.moe.bias_update_speed)
    return grads


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def measure_rank(rank: int, world: int, cfg, steps: int) -> dict:
    """Build one rank as the trainer does, run 1 + `steps` steps, return its bytes and times."""
    from trainer.restore import pick_device
    from trainer.train import build_run
    topo = Topology.from_config(cfg.parallel, world, rank, cfg.moe.num_experts)
    stream = RandomStream(cfg.model.vocab_size, cfg.data.seq_len, seed=1000 + topo.dp_rank)
    run = build_run(cfg, stream, topo, torch.device("cpu"), pick_device(cfg)[1])
    model, zero = run.model, run.engine.zero
    saved = SavedBytes(model.parameters())
    grads = train_step(run, cfg.optim.lr, saved)
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        train_step(run, cfg.optim.lr)
        times.append(time.perf_counter() - t0)
    buckets = zero.buckets
    return {"pp_rank": topo.pp_rank, "weights": _nbytes(model.parameters()), "grads": grads,
            "master": _nbytes(b.master for b in buckets),
            "moments": _nbytes(b.exp_avg for b in buckets) + _nbytes(b.exp_avg_sq for b in buckets),
            "act_micro": saved.added / cfg.train.grad_accum, "act_peak": saved.peak, "times": times}


def link_bandwidth(rank: int, world: int, mib: int = 16, repeats: int = 5) -> float:
    """gloo all-reduce bus bandwidth in GB/s (2 (n-1) / n of the buffer per rank per call)."""
    x = torch.ones(mib * 2 ** 18)
    dist.all_reduce(x)
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        best = min(best, time.perf_counter() - t0)
    return 2 * (world - 1) / world * x.numel() * 4 / best / 1e9


def cpu_flops(cfg, repeats: int = 5) -> float:
    """Effective FLOP/s of this process: forward + backward of one micro-batch of the full model."""
    from model.batch import make_batch
    from model.transformer import build_model
    torch.manual_seed(0)
    model = build_model(cfg)
    mb, L = cfg.train.micro_batch_size, cfg.data.seq_len
    batch = make_batch(torch.randint(0, cfg.model.vocab_size, (mb, L)), None)
    model(batch).loss.backward()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(batch).loss.backward()
        times.append(time.perf_counter() - t0)
    return flops_per_token(cfg, L) * mb * L / statistics.median(times)


# ----------------------------------------------------------------------------- predictions


def predict(cfg, pp: int, ep: int, schedule: str, n: int, cluster: Cluster) -> dict:
    """The planner's bytes per pp rank and step time of one layout (fp32, math attention)."""
    dp, L, mb = cluster.gpus // pp, cfg.data.seq_len, cfg.train.micro_batch_size
    sched = build_schedule(schedule, pp, n)
    place = sched.placement
    S = num_stages(schedule, pp)
    layout = resolve_layout(cfg.parallel.layout, cfg.model.num_layers, S)
    inventory, am = param_inventory(cfg), activation_model(cfg, L, "math")
    per_rank = []
    for r in range(pp):
        stages = [place.stage_of(r, c) for c in range(place.chunks_per_rank)]
        blocks = sorted(i for s in stages for i in layout[s])
        st = static_bytes(rank_params(inventory, blocks, 0 in stages, S - 1 in stages, cfg), ep, dp,
                          cfg.optim.bf16_moments, cfg.optim.weight_decay, 2 if cfg.train.param_dtype == "bf16" else 4)
        acts = [stage_activation_bytes(cfg, am, layout[s], s == S - 1, mb * L, 4, False, "none") for s in stages]
        peak = max(sum(a * k for a, k in zip(acts, point)) for point in live_points(sched.compute[r]))
        forwards = [sum(op == "F" and ch == c for a in sched.compute[r] for op, _, ch in a.parts())
                    for c in range(len(stages))]   # DualPipe: half the micro-batches per copy
        per_rank.append({**vars(st), "act_micro": sum(a * k for a, k in zip(acts, forwards)) / n,
                         "act_peak": peak})
    cand = Candidate(pp, dp, ep, schedule, mb, n, "none", False, cfg.optim.bf16_moments,
                     tuple(map(tuple, layout)))
    est = timing(cfg, Estimate(cand, {}, 0, 0.0), cluster)
    return {"ranks": per_rank, "step_s": est.step_s}


def cpu_cluster(cfg, flops: float, share: float, link_gbps: float, world: int = WORLD) -> Cluster:
    gpu = GPU("cpu", peak_bf16=flops * share / 1e12, peak_fp8=flops * share / 1e12, memory_gib=128,
              nvlink_gbps=link_gbps, net_gbps=link_gbps)
    eff = Efficiency(gemm=1.0, attention=1.0, nvlink=1.0, net=1.0, reserved_gib=0.0)
    return Cluster(world, world, gpu, cfg.data.seq_len, cfg.train.micro_batch_size * cfg.train.grad_accum, eff)


# ----------------------------------------------------------------------------- table


HEAD = ("| config | pp x dp x ep | schedule | n | pp rank | weights B | grads B | master B | moments B | static "
        "| act/micro meas KiB | pred KiB | err | act peak meas KiB | pred KiB | GFLOP/s | step s meas | pred |")


def rows(name: str, pp: int, ep: int, schedule: str, n: int, measured: list[dict], pred: dict, flops: float,
         world: int = WORLD) -> list[str]:
    """One row per pp rank (the dp / ep ranks of one pp rank hold the same bytes: checked)."""
    step = statistics.median(max(ts) for ts in zip(*(m["times"] for m in measured)))
    out = []
    for r in range(pp):
        same = [m for m in measured if m["pp_rank"] == r]
        keys = ("weights", "grads", "master", "moments")
        assert all(m[k] == same[0][k] for m in same for k in keys), f"dp/ep ranks of pp rank {r} differ"
        m, p = same[0], pred["ranks"][r]
        exact = all(m[k] == p[k] for k in keys)
        meas_act = max(x["act_micro"] for x in same)
        meas_peak = max(x["act_peak"] for x in same)
        err = p["act_micro"] / meas_act - 1
        out.append(f"| {name} | {pp} x {world // pp} x {ep} | {schedule} | {n} | {r} | {m['weights']:,} | "
                   f"{m['grads']:,} | {m['master']:,} | {m['moments']:,} | {'exact' if exact else 'DIFFERS'} | "
                   f"{meas_act / 1024:,.0f} | {p['act_micro'] / 1024:,.0f} | {100 * err:+.1f}% | "
                   f"{meas_peak / 1024:,.0f} | {p['act_peak'] / 1024:,.0f} | "
                   f"{flops / 1e9 if r == 0 else '':{'.2f' if r == 0 else ''}} | "
                   f"{step if r == 0 else '':{'.2f' if r == 0 else ''}} | "
                   f"{pred['step_s'] if r == 0 else '':{'.2f' if r == 0 else ''}} |")
        if not exact:
            out.append(f"|  | predicted | | | | {p['weights']:,} | {p['grads']:,} | {p['master']:,} | "
                       f"{p['moments']:,} | | | | | | | | | |")
    return out


def bench(name: str, path: str, overrides: list[str], layouts, steps: int, world: int = WORLD,
          link_gbps: float | None = None) -> tuple[list[str], dict]:
    base = load_config(path, overrides)
    torch.set_num_threads(1)
    single = layout_config(base, 1, 1, "1f1b", 1, world=1)
    if link_gbps is None:
        link_gbps = statistics.median(run_ranks(link_bandwidth, world))
    share = min(1.0, (os.cpu_count() or 1) / world)
    consts = {"flops": [], "share": share, "link_gbps": link_gbps}
    out = []
    for pp, ep, schedule, n in layouts:
        cfg = layout_config(base, pp, ep, schedule, n, world)
        flops = cpu_flops(single)   # right before the layout: the same load as its ranks see
        consts["flops"].append(flops)
        measured = run_ranks(measure_rank, world, cfg, steps, timeout=600)
        pred = predict(cfg, pp, ep, schedule, n, cpu_cluster(cfg, flops, share, link_gbps, world))
        out += rows(name, pp, ep, schedule, n, measured, pred, flops, world)
        print(out[-1] if pp == 1 else "\n".join(out[-pp:]), file=sys.stderr, flush=True)
    return out, consts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one measured warm-up step")
    args = ap.parse_args(argv)
    consts, table = [], [HEAD, "|" + "---|" * (HEAD.count("|") - 1)]
    for name in args.configs:
        path, overrides = CONFIGS[name]
        got, c = bench(name, path, overrides, LAYOUTS, args.steps)
        fl = sorted(c["flops"])
        consts.append(f"{name}: CPU {statistics.median(fl) / 1e9:.2f} GFLOP/s effective in one process (one thread; "
                      f"{fl[0] / 1e9:.2f} to {fl[-1] / 1e9:.2f} over the layouts), "
                      f"x {c['share']:g} core share per rank at {WORLD} ranks; gloo all-reduce "
                      f"{c['link_gbps']:.2f} GB/s")
        table += got
    print("\n".join(consts + [""] + table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
