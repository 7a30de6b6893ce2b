"""Validation loss: `python -m trainer.evaluate CKPT [--batches N]`, and the pass training runs.

The held-out split (`valid.*`, written by `trainer.prepare` when data.valid_fraction > 0) is
read with the same packing and per-document attention masks as training (`model.batch`). The
evaluation set is the first `eval.batches x train.micro_batch_size` sequences of the split (all
of it when smaller), always the same ones, so numbers from different steps compare. Data-parallel
rank r of W takes sequences r, r + W, ...; ranks left short get empty (all-padding) rows, so every
rank runs the same number of forwards (expert-parallel all-to-alls need it) and empty rows
count nothing. Under pipeline parallelism every pp rank of a replica takes the same rows, each
micro-batch goes forward through the stages in order and the rank of the head stage counts it.
Each rank sums cross-entropy x target tokens in float64 and the sums are added over all ranks
(the other pipeline ranks add zeros), so the result is the same token-weighted mean at any layout:
  val_loss = sum of next-token cross-entropies / target tokens,  val_ppl = exp(val_loss),
  val_mtp_loss = the MTP loss (mean over depths), weighted by each micro-batch's depth-1 targets.
The standalone command reports every prepared dataset of the run (this one and `data.blend`'s)
on its own line, then all of them together.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

import numpy as np
import torch

from trainer.cli import user_errors
from trainer.config import ConfigError

log = logging.getLogger("moepipe")


def valid_dirs(cfg) -> list[str]:
    """Prepared dataset dirs of the run (this one, then data.blend's), each with a validation split."""
    from data.prepare import prepared_dir
    from data.stream import has_split
    dirs = [prepared_dir(cfg.data, cfg.dedup)] + list(cfg.data.blend)
    for d in dirs:
        if not os.path.isfile(os.path.join(d, "meta.json")):
            raise ConfigError(f"prepared data = {d}: not there; run python -m trainer.prepare "
                              "with the run's config (and the same --set)")
        if not has_split(d, "valid"):
            raise ConfigError(f"data.valid_fraction = 0 when {d} was prepared: it has no validation split; "
                              "prepare one with python -m trainer.prepare CONFIG --set data.valid_fraction=0.02 "
                              "and pass the same --set here")
    return dirs


def rank_rows(n_total: int, rank: int, world: int) -> list[int | None]:
    """Sequence indices of this rank (None = an empty row), the same count on every rank."""
    per_rank = -(-n_total // world)
    return [i if (i := rank + world * j) < n_total else None for j in range(per_rank)]


def load_rows(reader, rows: list[int | None], seq_len: int, pad_id: int):
    tokens = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    doc_lens = []
    for r, i in enumerate(rows):
        if i is None:
            doc_lens.append(np.zeros(0, dtype=np.int32))
            continue
        seq, lens = reader.get(i)
        tokens[r, :len(seq)] = seq
        doc_lens.append(lens)
    return tokens, doc_lens


@torch.no_grad()
def split_sums(forward, reader, n_total: int, cfg, device, rank: int = 0, world: int = 1,
               pad_id: int = 0) -> torch.Tensor:
    """float64 [lm CE sum, target tokens, MTP loss x depth-1 targets, depth-1 targets] of this rank.

    `forward(batch)` -> the model's output, or None on a pipeline rank without the head stage
    (which then adds nothing: the head stage's rank counts the micro-batch)."""
    from model.batch import IGNORE, make_batch, mtp_labels
    rows = rank_rows(n_total, rank, world)
    mb = cfg.train.micro_batch_size
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for start in range(0, len(rows), mb):
        tokens, doc_lens = load_rows(reader, rows[start:start + mb], cfg.data.seq_len, pad_id)
        batch = make_batch(tokens, doc_lens, device)
        out = forward(batch)
        if out is None:
            continue
        n = (batch.labels != IGNORE).sum().double()
        n1 = (mtp_labels(batch, 1) != IGNORE).sum().double() if cfg.mtp.depth else n.new_zeros(())
        sums += torch.stack([out.lm_loss.double() * n, n, out.mtp_loss.double() * n1, n1])
    return sums


def finish(sums: torch.Tensor, with_mtp: bool) -> dict:
    lm_sum, n, mtp_sum, n1 = (float(x) for x in sums)
    loss = lm_sum / max(n, 1.0)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(n)}
    out["val_mtp_loss"] = mtp_sum / max(n1, 1.0) if with_mtp else None
    return out


def open_split(directory: str):
    from data.stream import open_split as open_data_split
    from data.stream import read_meta
    return open_data_split(directory, "valid"), int(read_meta(directory)["pad_id"])


def validate(run) -> dict:
    """The in-training pass over this run's held-out split (every rank calls it; rank 0 logs it)."""
    cfg, t0 = run.cfg, time.perf_counter()
    reader, pad_id = open_split(run.stream.dirs[0])  # the run's prepared data, resolved once at start
    n_total = min(len(reader), cfg.eval.batches * cfg.train.micro_batch_size)
    engine = run.engine
    topo = engine.topology
    sums = split_sums(engine.eval_forward, reader, n_total, cfg, engine.device, topo.dp_rank, topo.dp, pad_id)
    if topo.world_size > 1:  # over dp replicas, and from each pipeline's head-stage rank to the others
        torch.distributed.all_reduce(sums)
    out = finish(sums, cfg.mtp.depth > 0)
    out["val_seconds"] = time.perf_counter() - t0
    return out


def describe_validation(cfg, directory: str) -> str | None:
    """What the in-training validation covers, for the start of the log (None when it is off)."""
    from data.stream import has_split
    if not cfg.eval.every or not has_split(directory, "valid"):
        return None
    total = len(open_split(directory)[0])
    n = min(total, cfg.eval.batches * cfg.train.micro_batch_size)
    return (f"validation: every {cfg.eval.every} steps on the first {n} of the held-out split's {total} sequences "
            f"(eval.batches = {cfg.eval.batches} x train.micro_batch_size); python -m trainer.evaluate "
            "reports the whole split")


def maybe_validate(run, total_steps: int | None = None) -> dict:
    """Validation metrics when this step is due (every eval.every steps and the last of
    `total_steps`, default train.steps), else {}."""
    cfg = run.cfg
    last = cfg.train.steps if total_steps is None else total_steps
    due = cfg.eval.every and (run.step % cfg.eval.every == 0 or run.step == last)
    if not due:
        return {}
    if cfg.data.valid_fraction == 0:
        log.warning("step %d: no validation: data.valid_fraction = 0 (no held-out split); set it > 0 to validate",
                    run.step)
        return {}
    from data.stream import has_split
    if not has_split(run.stream.dirs[0], "valid"):
        log.warning("step %d: no validation: data.valid_fraction = %s of this corpus rounds to 0 sequences; "
                    "raise it", run.step, cfg.data.valid_fraction)
        return {}
    out = validate(run)
    run.engine.reset_comm_stats()  # the validation all-to-alls are not the training step's traffic
    return out


def evaluate(path: str, config: str | None = None, overrides: list[str] | None = None,
             batches: int | None = None) -> list[tuple[str, dict]]:
    """(dataset dir, metrics) per prepared dataset of the checkpoint's run, then ("all", total)."""
    from parallel.engine.base import eval_forward, forward_context
    from trainer.restore import load_model, pick_device
    cfg, model = load_model(path, config, overrides)
    dirs = valid_dirs(cfg)
    device, autocast_dtype = pick_device(cfg)
    model.to(device)
    rows, total = [], None
    for d in dirs:
        reader, pad_id = open_split(d)
        n = len(reader) if batches is None else min(len(reader), batches * cfg.train.micro_batch_size)
        make_context = forward_context(device, autocast_dtype, None)
        sums = split_sums(lambda batch: eval_forward(model, batch, make_context), reader, n, cfg, device,
                          pad_id=pad_id)
        rows.append((d, finish(sums, cfg.mtp.depth > 0)))
        total = sums if total is None else total + sums
    if len(dirs) > 1:
        rows.append(("all", finish(total, cfg.mtp.depth > 0)))
    return rows


@user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint directory (step_XXXXXXXX/) or DCP directory")
    p.add_argument("--batches", type=int, default=None,
                   help="micro-batches of train.micro_batch_size per dataset (default: the whole split)")
    p.add_argument("--config", default=None, help="config YAML (default: config.yaml of the checkpoint)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="overrides of that config")
    args = p.parse_args(argv)
    if args.batches is not None and args.batches < 1:
        raise ConfigError(f"--batches = {args.batches}: must be >= 1; give a positive count or leave it out")
    rows = evaluate(args.checkpoint, args.config, args.set, args.batches)
    print("the whole held-out split of each dataset" if args.batches is None else
          f"the first {args.batches} micro-batches of each held-out split (as training's eval.batches)")
    print("| dataset | tokens | loss | perplexity | MTP loss |\n|---|---|---|---|---|")
    for name, m in rows:
        mtp = f"{m['val_mtp_loss']:.4f}" if m["val_mtp_loss"] is not None else "-"
        print(f"| {name} | {m['val_tokens']:,} | {m['val_loss']:.4f} | {m['val_ppl']:.2f} | {mtp} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
