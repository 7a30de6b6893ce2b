"""Units of work, their completion markers, and one array task's loop over its units.

A preparation lives in its output directory; `work/plan.json` holds everything a task needs
(the data and dedup config, the input shards, the bucket count), so a task on any machine
runs from the directory alone: `run_task(out_dir, stage, task, tasks)` does units
task, task + tasks, task + 2*tasks, ... of the stage. Unit u of a stage writes its files into
`work/<stage>/<u>/` and then, last and atomically, `work/<stage>/<u>.done.json` holding each
file's size and xxh3-64 digest plus the unit's counters. A unit is done only when that marker
parses and every file it lists still has its size and digest, so a killed task (no marker) or
a corrupted output (digest differs) is found and that unit alone is run again; its outputs
are a pure function of the plan, so a redone unit writes the same bytes.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import xxhash

from data.config import DataConfig
from data.dedup.config import DedupConfig
from data.shards import Shard

PLAN = "plan.json"


@dataclass
class Context:
    """What every unit of a preparation needs, loaded from `work/plan.json`."""

    out_dir: str
    data: DataConfig
    dedup: DedupConfig
    shards: list[Shard]
    buckets: int
    sample_fraction: float

    def work(self, *parts: str) -> str:
        return os.path.join(self.out_dir, "work", *parts)


def load_context(out_dir: str) -> Context:
    with open(os.path.join(out_dir, "work", PLAN), encoding="utf-8") as f:
        plan = json.load(f)
    return Context(out_dir, DataConfig(**plan["data"]), DedupConfig(**plan["dedup"]),
                   [Shard(**s) for s in plan["shards"]], int(plan["buckets"]), float(plan["sample_fraction"]))


def unit_dir(ctx: Context, stage: str, unit: int) -> str:
    return ctx.work(stage, f"{unit:06d}")


def _digest(path: str) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_marker(ctx: Context, stage: str, unit: int) -> dict | None:
    """The unit's marker when the unit is complete and intact, else None."""
    path = unit_dir(ctx, stage, unit) + ".done.json"
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    base = unit_dir(ctx, stage, unit)
    for name, (size, digest) in files.items():
        p = os.path.join(base, name)
        if not os.path.isfile(p) or os.path.getsize(p) != size or _digest(p) != digest:
            return None
    return marker


def run_unit(ctx: Context, stage: str, unit: int, fn) -> dict:
    """Run `fn(ctx, unit, dir) -> stats` into a clean unit dir and write its marker; returns stats."""
    base = unit_dir(ctx, stage, unit)
    marker_path = base + ".done.json"
    for stale in [marker_path] + glob.glob(glob.escape(marker_path) + ".*.tmp"):  # a killed run's leftovers
        if os.path.exists(stale):
            os.remove(stale)
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    t0 = time.perf_counter()
    stats = fn(ctx, unit, base)
    stats["seconds"] = round(time.perf_counter() - t0, 4)
    files = {}
    for root, _, names in os.walk(base):
        for name in names:
            p = os.path.join(root, name)
            files[os.path.relpath(p, base)] = [os.path.getsize(p), _digest(p)]
    tmp = f"{marker_path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"files": dict(sorted(files.items())), "stats": stats}, f)
    os.replace(tmp, marker_path)
    return stats


def ensure_unit(ctx: Context, stage: str, unit: int, fn) -> tuple[dict, bool]:
    """(stats, ran): the unit's stats, running it first unless an intact marker exists."""
    marker = read_marker(ctx, stage, unit)
    if marker is not None:
        return marker["stats"], False
    return run_unit(ctx, stage, unit, fn), True


def unit_stats(ctx: Context, stage: str, n_units: int) -> list[dict]:
    """Every unit's counters from its marker (the stage must be complete).

    Reads the markers only: the files' digests are checked where a unit is about to be
    skipped (`ensure_unit`), not here, so a bucket task does not re-read every shard's output.
    """
    out = []
    for u in range(n_units):
        try:
            with open(unit_dir(ctx, stage, u) + ".done.json", encoding="utf-8") as f:
                out.append(json.load(f)["stats"])
        except (OSError, ValueError, KeyError):
            raise RuntimeError(f"{unit_dir(ctx, stage, u)}: stage '{stage}' unit {u} is not complete; "
                               "run the preparation again (finished units are kept)") from None
    return out


def unit_array(ctx, stage: str, unit: int, name: str, mmap: bool = True) -> np.ndarray:
    """An array a unit of `stage` wrote (`name.npy` in its work directory), memory-mapped by default."""
    return np.load(os.path.join(ctx.work(stage, f"{unit:06d}"), f"{name}.npy"),
                   mmap_mode="r" if mmap else None, allow_pickle=False)
