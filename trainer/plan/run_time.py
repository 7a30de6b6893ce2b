"""Time of a whole run on a planned layout, batch-size ramp included.

A run stated in tokens (`train.tokens`, `schedule.phases`; DeepSeek-V3 section 4.2: 14.8T tokens,
the batch ramped from 3,072 to 15,360 sequences over the first 469B) takes steps of several
sizes. `trainer.schedule.segments` gives the run as (micro-batches per dp rank, steps) on the
layout, with the layout's own rounding (a multiple of dp x micro-batch size, at least the
pipeline schedule's smallest count); the step time comes from the planner's time model
(`layouts.timing`: the schedule replayed plus ZeRO-1 traffic) at the smallest and the largest
count, and in between is taken on the line through those two: past the pipeline's fill and
drain, every schedule here adds one steady-state F and B (or one F&B pair) per micro-batch, so
the step time is affine in the count (`exact=True` replays every count instead). The run is the
sum over its steps. GPU-hours = GPUs x that time, the unit of the report's 2.664M H800 GPU-hours for
pre-training (section 1, Table 1).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from trainer.plan.layouts import Cluster, Estimate, timing
from trainer.schedule import Layout, segments

REPORT_GPU_HOURS = 2.664e6   # DeepSeek-V3, Table 1: pre-training on H800


@dataclass
class RunTime:
    steps: int
    tokens: float
    seconds: float
    gpus: int
    micro_counts: dict[int, int]    # micro-batches per dp rank -> steps taken with that many

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.seconds / 3600


def largest_batch(cfg) -> int | None:
    """The largest global batch the config schedules (None when it gives none)."""
    pieces = cfg.schedule.pieces("train.global_batch")
    if pieces is not None:
        return int(max(max(p.a, p.b) for p in pieces))
    return cfg.train.global_batch or None


def step_seconds(cfg, est: Estimate, cl: Cluster, n: int) -> float:
    """The time model's step time of `est`'s layout with `n` micro-batches per dp rank."""
    c = dataclasses.replace(est.cand, num_micro=n)
    return timing(cfg, Estimate(c, est.memory, est.rank, est.budget), cl).step_s


def run_time(cfg, est: Estimate, cl: Cluster, exact: bool = False) -> RunTime:
    """Steps, tokens and seconds of `cfg`'s whole run on `est`'s layout (train.tokens or train.steps)."""
    c = est.cand
    lay = Layout(c.dp, c.micro_batch, c.pp, c.schedule)
    counts: Counter = Counter()
    if cfg.train.tokens:
        for n, k in segments(cfg, lay):
            counts[n] += k
    else:  # a run in steps at the planned batch
        counts[c.num_micro] = cfg.train.steps
    lo, hi = min(counts), max(counts)
    t_lo, t_hi = step_seconds(cfg, est, cl, lo), step_seconds(cfg, est, cl, hi)
    seconds = tokens = 0.0
    for n, k in sorted(counts.items()):
        if exact:
            t = step_seconds(cfg, est, cl, n)
        else:
            t = t_lo if hi == lo else t_lo + (t_hi - t_lo) * (n - lo) / (hi - lo)
        seconds += k * t
        tokens += k * n * c.dp * c.micro_batch * cl.seq_len
    return RunTime(sum(counts.values()), tokens, seconds, cl.gpus, dict(counts))


def describe(rt: RunTime, gpu_name: str) -> str:
    """One line: steps, micro-batch counts, tokens, days and GPU-hours."""
    from trainer.phases import format_tokens
    lo, hi = min(rt.micro_counts), max(rt.micro_counts)
    counts = f"{lo}-{hi} micro-batches" if lo != hi else f"{lo} micro-batches"
    return (f"{rt.steps:,} steps ({counts} per dp rank), {format_tokens(rt.tokens)} tokens in "
            f"{rt.seconds / 86400:,.1f} days on {rt.gpus:,} GPUs = {_hours(rt.gpu_hours)} {gpu_name.upper()} GPU-hours")


def _hours(h: float) -> str:
    return f"{h / 1e6:.3f}M" if h >= 1e5 else f"{h:,.2f}"
