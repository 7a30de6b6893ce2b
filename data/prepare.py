"""The data pipeline behind `python -m trainer.prepare CONFIG`: build the packed training data.

Stages whose unit of work is an input shard or a hash bucket (see `data.stages`), run by an
executor (`data.executors`: a local process pool, or Slurm job arrays), DeepSeek-V3 report
section 4.1 for cross-dump dedup and document packing:

    sign (per shard) -> buckets (per bucket) -> clusters (1) -> tokenizer (1) -> tokenize (per shard)

CONFIG is the training YAML; only its `data:` and `dedup:` sections are used. Output in
`data.output_dir/<name of the data>/<fingerprint>/`, where the fingerprint hashes every field
that changes the prepared bytes (configs that differ, say in seq_len or shard_mb, never
overwrite each other's data):
  work/plan.json            the input shards and the config every task reads
  work/<stage>/<unit>/      each unit's outputs, work/<stage>/<unit>.done.json its marker
  work/tokenize/<shard>/{train,valid}.bin/.idx (+ .doclens*.npy)  the packed sequences
  tokenizer.json, meta.json (what the stream needs, including the list of shard files),
  report.json (the summary) and last _COMPLETE.json holding the preparation-relevant config
  and each input's identity (size, mtime, sha256; see `data.identity`).
`ensure_prepared` reuses a directory only when that record matches the current config and no
input changed. A preparation run again on the same plan skips every unit whose marker is
intact and redoes the others (a killed task, a corrupted file).

Determinism: shards depend on the inputs and `data.shard_mb`, buckets on `dedup.buckets`,
document ids on the position in the corpus, the tokenizer sample on a fixed hash of those ids,
the valid split on a per-shard seed; nothing depends on the number of tasks, so the bytes
written are identical for any `--tasks`, executor or `data.workers`.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time

from data.config import DataConfig
from data.dedup.config import DedupConfig
from data.identity import changed_inputs, data_name, input_identities
from data.report import summary_text
from data.shards import plan_shards
from data.stages import ORDER, n_units
from data.summary import MARKER, finalize, read_json as _read_json, write_json as _write_json
from data.tasks import PLAN, load_context
from data.tokenize import tokenizer_source

_NOT_PREPARATION = ("workers", "seed", "output_dir", "blend", "weight")
_VERSION = 2
log = logging.getLogger("data")

__all__ = ["MARKER", "ensure_prepared", "finalize", "plan", "prepare", "prepared_dir", "stale_reason",
           "summary_text"]


def preparation_record(data_cfg: DataConfig, dedup_cfg: DedupConfig) -> dict:
    """The config fields that change the prepared bytes (workers, seed, output_dir do not)."""
    data = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in _NOT_PREPARATION}
    return {"version": _VERSION, "data": data, "dedup": dataclasses.asdict(dedup_cfg)}


def prepared_dir(data_cfg: DataConfig, dedup_cfg: DedupConfig) -> str:
    """`data.output_dir/<name of the dumps>/<12 hex digits of the preparation record's sha256>`."""
    record = json.dumps(preparation_record(data_cfg, dedup_cfg), sort_keys=True, default=str)
    return os.path.join(data_cfg.output_dir, data_name(data_cfg.dumps),
                        hashlib.sha256(record.encode()).hexdigest()[:12])


def plan(data_cfg: DataConfig, dedup_cfg: DedupConfig, fresh: bool = False) -> str:
    """Write `work/plan.json` in data_cfg.output_dir (kept, with its finished units, when the config
    and inputs are those it was made for and not `fresh`); returns the output dir."""
    out_dir = data_cfg.output_dir
    work = os.path.join(out_dir, "work")
    if not data_cfg.tokenizer.startswith("bpe:"):
        tokenizer_source(data_cfg.tokenizer)  # a missing tokenizer fails before any work
    record = json.loads(json.dumps(preparation_record(data_cfg, dedup_cfg), default=str))
    old = _read_json(os.path.join(work, PLAN))
    if (not fresh and old is not None and old.get("record") == record
            and not changed_inputs(old.get("inputs", []), data_cfg.dumps)):
        return out_dir
    if os.path.exists(os.path.join(out_dir, MARKER)):
        os.remove(os.path.join(out_dir, MARKER))
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    inputs = input_identities(data_cfg.dumps)  # before reading: an edit made meanwhile is seen next time
    shards = plan_shards(data_cfg.dumps, data_cfg.shard_mb, data_cfg.text_field, data_cfg.bundled_mb)
    total_mb = sum(s.mb for s in shards)
    sample_fraction = min(1.0, 4.0 * data_cfg.tokenizer_sample_mb / total_mb) if total_mb > 0 else 1.0
    _write_json(os.path.join(work, PLAN), {
        "record": record, "inputs": inputs, "data": dataclasses.asdict(data_cfg),
        "dedup": dataclasses.asdict(dedup_cfg), "shards": [s.to_dict() for s in shards],
        "buckets": dedup_cfg.buckets or len(shards), "sample_fraction": sample_fraction})
    return out_dir


def prepare(data_cfg: DataConfig, dedup_cfg: DedupConfig, quiet: bool = False, tasks: int | None = None,
            fresh: bool = False) -> dict:
    """Run every stage into `data_cfg.output_dir` with the local executor; returns the report dict.

    `tasks` processes run the units of each stage (default `data.workers`, 0 = one per CPU up
    to 8); one task runs them in this process.
    """
    from data.executors import LocalExecutor
    t0 = time.perf_counter()
    out_dir = plan(data_cfg, dedup_cfg, fresh)
    tasks = tasks or data_cfg.workers or min(os.cpu_count() or 1, 8)
    executor = LocalExecutor(tasks, quiet=quiet)
    seconds = {stage: executor.run(out_dir, stage) for stage in ORDER}
    return finalize(out_dir, seconds, time.perf_counter() - t0)


def stage_units(out_dir: str) -> dict[str, int]:
    """Units per stage of the plan in `out_dir`."""
    ctx = load_context(out_dir)
    return {stage: n_units(ctx, stage) for stage in ORDER}


def stale_reason(out_dir: str, data_cfg: DataConfig, dedup_cfg: DedupConfig) -> str | None:
    """Why `out_dir` must be prepared (again), or None when it is complete and its inputs unchanged."""
    path = os.path.join(out_dir, MARKER)
    if not os.path.isfile(path):
        return "not prepared yet"
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        config, inputs = recorded["config"], recorded["inputs"]
    except (ValueError, KeyError, TypeError):
        return f"{MARKER} unreadable or from an older version"
    if config != json.loads(json.dumps(preparation_record(data_cfg, dedup_cfg), default=str)):
        return "the data config differs"
    changed = changed_inputs(inputs, data_cfg.dumps)
    return f"input changed: {', '.join(changed)}" if changed else None


def ensure_prepared(data_cfg: DataConfig, dedup_cfg: DedupConfig, quiet: bool = False) -> str:
    """The prepared output dir, preparing it first unless a matching completion record exists.

    Safe to call from every rank at once: a file lock lets one process prepare while the
    others wait, then they all see the record.
    """
    data_cfg = dataclasses.replace(data_cfg, output_dir=prepared_dir(data_cfg, dedup_cfg))
    if stale_reason(data_cfg.output_dir, data_cfg, dedup_cfg) is None:
        return data_cfg.output_dir
    os.makedirs(data_cfg.output_dir, exist_ok=True)
    with open(os.path.join(data_cfg.output_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            reason = stale_reason(data_cfg.output_dir, data_cfg, dedup_cfg)
            if reason is not None:
                if not quiet:
                    log.info("preparing %s (%s)", data_cfg.output_dir, reason)
                report = prepare(data_cfg, dedup_cfg, quiet=quiet)
                if not quiet:
                    print(summary_text(report), file=sys.stderr)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return data_cfg.output_dir
