"""Bytes the optimizer step leaves allocated until the next forward: torch's CPU allocator (profiler
memory events) around ZeroEngine.apply at dp 2 on gloo, the configs/tiny.yaml model (8.68M
parameters), fp32 and bf16 parameters, steps 1 and 2. Frees of memory allocated before the window
are not in the profiler's events, so the figure is what the step allocated and still holds,
gloo's own buffers for the in-flight all-gathers included.

    python benchmarks/bench_step_gather.py      (results: benchmarks/RESULTS.md)"""
import contextlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rank_fn(rank, world, param_dtype):
    from benchmarks.memtrace import peak_cpu_bytes
    from model.batch import make_batch
    from model.transformer import build_model
    from parallel.config import ParallelConfig
    from parallel.data_parallel import ZeroAdamW
    from parallel.engine.zero import ZeroEngine
    from parallel.precision import DTYPES, cast_params_
    from parallel.topology import Topology
    from trainer.config import load_config
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["data.seq_len=64", "model.max_seq_len=64"])
    topo = Topology.from_config(ParallelConfig(), num_experts=cfg.moe.num_experts)
    model = build_model(cfg)
    zero = ZeroAdamW(model, topo, lr=1e-3, weight_decay=0.1, grad_scale=1.0)
    cast_params_(model, DTYPES[param_dtype])
    zero.defer_gather(model)
    engine = ZeroEngine(model, zero, topo, torch.device("cpu"), contextlib.nullcontext, None)
    tokens = torch.randint(0, 8192, (2, 64), generator=torch.Generator().manual_seed(rank))
    held = []  # per step
    for _ in range(2):
        engine.forward_backward([make_batch(tokens, None)])
        engine.reduce_and_norm()
        _, now, _ = peak_cpu_bytes(lambda: engine.apply(1e-3))
        held.append(now)
    return held, sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    from tests.distributed.spawn import run_ranks
    print("| param_dtype | rank | held after step 1 B | held after step 2 B |\n|---|---|---|---|")
    for dt in ("fp32", "bf16"):
        for rank, (held, _) in enumerate(run_ranks(rank_fn, 2, dt)):
            print(f"| {dt} | {rank} | {held[0]:,} | {held[1]:,} |")
