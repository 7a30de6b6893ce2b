"""Memory of one pipeline step per pp rank under `train.recompute` none / selective / full
(DeepSeek-V3 section 3.2.3), on gloo ranks through the trainer's own `build_run`.

Each (schedule, recompute) runs in fresh processes: one warm-up step (optimizer state gets
allocated), then the kernel's peak-RSS mark is reset (`/proc/self/clear_refs`, Linux) and one
more step runs; "step peak" is the peak RSS during that step minus the RSS right before it: the
activations the schedule keeps in flight, gradients and temporaries. Also the step's wall time
(one step, on whatever CPU share the ranks get). Random tokens, fp32, the bench_plan "medium"
model unless `--set` changes it. The ranks run with glibc's mmap threshold fixed at 64 KiB, so
that a freed tensor's pages go back to the kernel and RSS follows the bytes alive.

Run: python benchmarks/bench_recompute_pp.py [--schedules 1f1b zb1p] [--set data.seq_len=256 ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from bench_plan import CONFIGS, RandomStream, layout_config, train_step  # noqa: E402
from parallel.topology import Topology  # noqa: E402
from tests.distributed.spawn import run_ranks  # noqa: E402
from trainer.config import load_config  # noqa: E402

MODES = ("none", "selective", "full")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_rank(rank: int, world: int, cfg) -> dict:
    """Warm-up step, then one step with the peak RSS mark reset; MiB and seconds."""
    from trainer.restore import pick_device
    from trainer.train import build_run
    topo = Topology.from_config(cfg.parallel, world, rank, cfg.moe.num_experts)
    stream = RandomStream(cfg.model.vocab_size, cfg.data.seq_len, seed=1000 + topo.dp_rank)
    run = build_run(cfg, stream, topo, torch.device("cpu"), pick_device(cfg)[1])
    train_step(run, cfg.optim.lr)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    train_step(run, cfg.optim.lr)
    seconds = time.perf_counter() - t0
    return {"pp_rank": topo.pp_rank, "step_peak_mib": (_status_kib("VmHWM") - before) / 1024,
            "rss_mib": before / 1024, "step_s": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", nargs="*", default=["1f1b", "zb1p"])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--micro", type=int, default=4, help="micro-batches per step (train.grad_accum)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides after the medium config's")
    args = ap.parse_args(argv)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the spawned ranks
    path, overrides = CONFIGS["medium"]
    print("| schedule | recompute | pp rank | RSS before step MiB | step peak MiB | vs none | step s |")
    print("|---|---|---|---|---|---|---|")
    for schedule in args.schedules:
        none = {}
        for mode in MODES:
            base = load_config(path, [*overrides, *args.set, f"train.recompute={mode}"])
            cfg = layout_config(base, args.pp, 1, schedule, args.micro, world=args.pp)
            for r in sorted(run_ranks(measure_rank, args.pp, cfg, timeout=1800), key=lambda r: r["pp_rank"]):
                peak = r["step_peak_mib"]
                none.setdefault(r["pp_rank"], peak)
                print(f"| {schedule} | {mode} | {r['pp_rank']} | {r['rss_mib']:,.0f} | {peak:,.0f} | "
                      f"{peak / none[r['pp_rank']] - 1:+.0%} | {r['step_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
