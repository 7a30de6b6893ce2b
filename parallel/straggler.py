"""Stragglers: every rank's step time split into compute, collective wait and data, gathered
every `logging.every` steps, and the slowest rank named with its ratio to the median.

All ranks of a synchronous step take the same wall time, so the step time alone cannot show a
slow rank: the others hide its slowness as time spent waiting in collectives. What differs is the
busy time, compute + data = step - collective wait. The rank with the largest busy time is the
straggler; its ratio to the median rank's busy time is the figure to watch (Megatron-LM's
straggler detector compares ranks the same way, by their own work rather than the step).
"""
from __future__ import annotations

import statistics

import torch
import torch.distributed as dist

FIELDS = ("step_s", "compute_s", "comm_s", "data_s")


def split(step_s: float, comm_s: float, data_s: float) -> list[float]:
    """[step, compute, collective wait, data] seconds per step; compute is what is left."""
    comm_s, data_s = min(comm_s, step_s), min(data_s, step_s)
    return [step_s, max(step_s - comm_s - data_s, 0.0), comm_s, data_s]


def gather(mine: list[float], device: torch.device, world_size: int) -> list[list[float]]:
    """Every rank's `split` (rank order), by one all-gather of a few floats on the default group."""
    if world_size == 1:
        return [list(mine)]
    t = torch.tensor(mine, dtype=torch.float64, device=device)
    out = torch.empty(world_size * len(mine), dtype=torch.float64, device=device)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, t)
    return out.view(world_size, len(mine)).tolist()


def report(per_rank: list[list[float]], ratio: float) -> tuple[dict, str | None]:
    """metrics.jsonl fields (per-rank lists, slowest rank and its ratio) and, when that ratio is
    above `ratio`, the log line naming the straggler."""
    row = {f"rank_{name}": [r[i] for r in per_rank] for i, name in enumerate(FIELDS)}
    busy = [r[1] + r[3] for r in per_rank]
    slow = max(range(len(busy)), key=busy.__getitem__)
    median = statistics.median(busy)
    row["straggler_rank"], row["straggler_ratio"] = slow, busy[slow] / median if median > 0 else 1.0
    if len(per_rank) < 2 or row["straggler_ratio"] <= ratio:
        return row, None
    s = per_rank[slow]
    line = (f"straggler: rank {slow} of {len(per_rank)} is busy {busy[slow]:.3f} s per step, "
            f"{row['straggler_ratio']:.2f}x the median rank ({median:.3f} s; fault.straggler_ratio = {ratio}): "
            f"compute {s[1]:.3f} s, data {s[3]:.3f} s, waiting in collectives {s[2]:.3f} s; "
            f"the others wait up to {max(r[2] for r in per_rank):.3f} s per step for it")
    return row, line
