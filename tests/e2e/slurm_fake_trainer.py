"""A stand-in for `trainer.train` that keeps its launch contract, for testing slurm/.

It reads the same config and overrides, joins every torchrun rank in one gloo group (so a
2-node rendezvous is really exercised), "trains" by sleeping `FAKE_STEP_SECONDS` per step,
writes the trainer's log line format and metrics.jsonl on rank 0, and keeps the trainer's
preemption contract: SIGTERM/SIGUSR1 -> finish the step, write `checkpoints/step_XXXXXXXX/`,
exit 75; a restart resumes from the latest such directory. `FAKE_FAIL_RANK=r` makes rank r
crash at step 2 (the failed-rank path). It lets the Slurm mechanics be tested in seconds and
independently of the model code.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from trainer.train import parse_args
from trainer.config import load_config


def latest_step(ckpt_root: str) -> int:
    steps = [int(n[5:]) for n in os.listdir(ckpt_root) if n.startswith("step_")] if os.path.isdir(ckpt_root) else []
    return max(steps, default=0)


def main() -> int:
    args = parse_args()
    cfg = load_config(args.config, args.set)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda s, _f: stop.append(s))
    if world > 1:
        dist.init_process_group("gloo")
    total = torch.tensor([float(rank + 1)])
    if world > 1:
        dist.all_reduce(total)
    out, ckpts = cfg.train.output_dir, os.path.join(cfg.train.output_dir, "checkpoints")
    os.makedirs(out, exist_ok=True)
    step = latest_step(ckpts)
    log = open(os.path.join(out, "train.log"), "a") if rank == 0 else None
    metrics = open(os.path.join(out, "metrics.jsonl"), "a") if rank == 0 else None

    def say(text: str) -> None:
        if log:
            log.write(text + "\n")
            log.flush()
            print(text, flush=True)

    say(f"world {world} rank-sum {int(total.item())}" + (f"; resumed from step {step}" if step else ""))
    pause = float(os.environ.get("FAKE_STEP_SECONDS", "0.2"))
    while step < cfg.train.steps and not stop:
        time.sleep(pause)
        step += 1
        if str(rank) == os.environ.get("FAKE_FAIL_RANK") and step == 2:
            raise RuntimeError(f"fake failure on rank {rank} at step {step}")
        loss = 10.0 / (1 + step)
        say(f"step {step:>6}/{cfg.train.steps} | loss {loss:.4f}")
        if metrics:
            metrics.write(json.dumps({"step": step, "loss": loss, "lm_loss": loss, "maxvio": 0.1}) + "\n")
            metrics.flush()
    if world > 1:
        dist.barrier()
    if rank == 0:
        os.makedirs(os.path.join(ckpts, f"step_{step:08d}"), exist_ok=True)
        say(f"saved checkpoint step {step}" + (f" after signal {stop[0]}" if stop else ""))
    if world > 1:
        dist.destroy_process_group()
    return 75 if stop and step < cfg.train.steps else 0


if __name__ == "__main__":
    sys.exit(main())
