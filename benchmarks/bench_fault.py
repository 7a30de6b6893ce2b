"""Cost and speed of the hang watchdog and straggler report (issue 26).

  python benchmarks/bench_fault.py            # all three parts, a table each

1. Per call: a 1-float all_reduce on a one-rank gloo group, plain and traced by
   `parallel.heartbeat.traced_collectives`, alternated in blocks; the difference is the cost the
   tracing adds to every collective. Also the cost of one `Heartbeat.set_phase`.
2. Per step: the tiny config on 2 torchrun ranks (dp 2 x ep 2) for STEPS steps; the heartbeat file
   of rank 0 gives its collectives per step (two heartbeat counts per collective), metrics.jsonl
   the step time; overhead = (collectives x per-call cost + phases x per-phase cost + the straggler
   all-gather every logging.every steps) / step time.
3. End to end, A/B inside one pair of processes (benchmarks/fault_ab_worker.py): blocks of steps
   with the diagnostics on and off, alternated; median step time of each mode (the first block
   of each mode, warm-up, left out). On a shared 2-core machine this is noisy; part 2 is the
   precise figure.
4. Time to exit: SIGSTOP / SIGKILL of rank 2 of 4 (dp 4 x ep 2, fault.hang_seconds = 5) entering
   step 3: seconds from the injection to torchrun's exit, and the diagnosis line.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
STEPS = 20
AB_BLOCKS, AB_BLOCK = 6, 5
TINY = ["data.seq_len=64", "model.max_seq_len=64", "train.micro_batch_size=2", "logging.tensorboard=false",
        "train.device=cpu", "checkpoint.every=0", "eval.every=0", "logging.every=10"]


def per_call(calls: int = 20000, blocks: int = 6) -> tuple[float, float]:
    import torch
    import torch.distributed as dist

    from parallel.heartbeat import Heartbeat, traced_collectives
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        t, beat = torch.ones(1), Heartbeat(0, 1)

        def run() -> float:
            t0 = time.perf_counter()
            for _ in range(calls):
                dist.all_reduce(t)
            return (time.perf_counter() - t0) / calls

        plain, traced = [], []
        for _ in range(blocks):
            plain.append(run())
            with traced_collectives(beat):
                traced.append(run())
        dist.destroy_process_group()
    t0 = time.perf_counter()
    for i in range(calls):
        beat.set_phase("data" if i % 2 else "forward_backward")
    phase = (time.perf_counter() - t0) / calls
    return statistics.median(traced) - statistics.median(plain), phase


def torchrun(nproc: int, out: str, data: str, extra: list[str], env: dict | None = None) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "trainer.train", "configs/tiny.yaml", "--set", *TINY, f"train.output_dir={out}",
           f"data.output_dir={data}", *extra]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(env or {})))
    return p.returncode, p.stdout + p.stderr


def step_times(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["step_time"] for r in map(json.loads, f) if r["step"] >= 3]


def main() -> None:
    call_s, phase_s = per_call()
    print("| per call | seconds |\n|---|---|")
    print(f"| tracing added to one collective | {call_s * 1e6:.2f} us |\n| one Heartbeat.set_phase | "
          f"{phase_s * 1e6:.2f} us |")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        out = os.path.join(tmp, "on")
        rc, text = torchrun(2, out, data, [f"train.steps={STEPS}", "parallel.ep=2"])
        assert rc == 0, text[-3000:]
        with open(os.path.join(out, "hang", "beats", "rank_0.json")) as f:
            beat = json.load(f)
        step = statistics.median(step_times(out))
        per_step_collectives = beat["count"] / beat["step"] / 2  # upper bound: phases count too
        cost = per_step_collectives * call_s + 5 * phase_s + 2 * call_s / 10
        print(f"\n| per step (tiny, 2 ranks dp 2 x ep 2) | value |\n|---|---|")
        print(f"| collectives per step (at most) | {per_step_collectives:.0f} |\n| median step time | {step * 1e3:.1f} ms |")
        print(f"| heartbeat + tracing + straggler gather per step | {cost * 1e6:.0f} us = {100 * cost / step:.3f} % |")
        ab = os.path.join(tmp, "ab")
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            os.path.join(ROOT, "benchmarks", "fault_ab_worker.py"), ab, data, str(AB_BLOCKS),
                            str(AB_BLOCK)], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
        assert p.returncode == 0, p.stderr[-3000:]
        with open(os.path.join(ab, "ab.json")) as f:
            rows = [r for r in json.load(f) if r["step"] > 2 * AB_BLOCK]  # first block of each mode: warm-up
        print(f"\n| A/B in one pair of processes, {AB_BLOCKS - 1} blocks of {AB_BLOCK} steps per mode | median step "
              f"| mean step |\n|---|---|---|")
        for mode in ("on", "off"):
            xs = [r["step_time"] for r in rows if r["mode"] == mode]
            print(f"| diagnostics {mode} | {statistics.median(xs) * 1e3:.1f} ms | {statistics.mean(xs) * 1e3:.1f} ms |")
        print("\n| fault (rank 2 of 4, hang_seconds 5) | injection to job exit | diagnosis |\n|---|---|---|")
        for kind in ("stop", "kill"):
            out = os.path.join(tmp, kind)
            rc, text = torchrun(4, out, data, ["train.steps=6", "parallel.ep=2", "fault.hang_seconds=5"],
                                {"MOEPIPE_FAULT": f"{kind}:2:3"})
            ended = time.time()
            hh, mm, ss = map(int, re.search(r"(\d\d):(\d\d):(\d\d) MOEPIPE_FAULT", text).groups())
            now = time.localtime(ended)
            injected = time.mktime((now.tm_year, now.tm_mon, now.tm_mday, hh, mm, ss, 0, 0, -1))
            with open(os.path.join(out, "hang", "diagnosis.txt")) as f:
                line = f.read().strip()
            print(f"| {kind} (exit {rc}) | {ended - injected:.0f} s | {line} |")


if __name__ == "__main__":
    main()
