"""Worker of benchmarks/bench_fault.py part 3 (run under torchrun): the same processes train the
tiny model in alternating blocks of BLOCK steps with the diagnostics on (heartbeat, traced
collectives, watchdog thread, straggler gather every logging.every steps) and off, and rank 0
writes every step's time with its block's mode to OUT/ab.json. Alternating inside one pair of
processes cancels most of the drift of a shared machine that separate runs suffer from.

    torchrun --standalone --nproc-per-node 2 benchmarks/fault_ab_worker.py OUT DATA BLOCKS BLOCK
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.stream import stream_from_config  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.diagnostics import Monitor  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.metrics import MetricsWriter, read_metrics  # noqa: E402
from trainer.restore import pick_device  # noqa: E402
from trainer.train import build_run, init_distributed  # noqa: E402

TINY = ["data.seq_len=64", "model.max_seq_len=64", "train.micro_batch_size=2", "logging.tensorboard=false",
        "train.device=cpu", "checkpoint.every=0", "eval.every=0", "logging.every=10", "parallel.ep=2"]


def main(out: str, data: str, blocks: int, block: int) -> None:
    cfg = load_config("configs/tiny.yaml", TINY + [f"train.output_dir={out}", f"data.output_dir={data}"])
    device, dtype = pick_device(cfg)
    topology = init_distributed(cfg, device)
    stream = stream_from_config(cfg.data, cfg.dedup, rank=topology.dp_rank, world_size=topology.dp)
    run = build_run(cfg, stream, topology, device, dtype)
    metrics = MetricsWriter(out, 1000, False, enabled=topology.rank == 0)
    modes = {}
    for b in range(2 * blocks):
        on = b % 2 == 0
        run.monitor = (Monitor.start(cfg, topology.rank, topology.world_size, device, 75, run.model) if on
                       else Monitor.off())
        cfg.train.steps = run.step + block
        first = run.step + 1
        train(run, metrics)
        run.monitor.close()
        modes.update({s: "on" if on else "off" for s in range(first, run.step + 1)})
    metrics.close()
    if topology.rank == 0:
        times = {r["step"]: r["step_time"] for r in read_metrics(out)}
        with open(os.path.join(out, "ab.json"), "w") as f:
            json.dump([{"step": s, "mode": modes[s], "step_time": times[s]} for s in sorted(modes)], f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
