"""Checkpoint save and resume of a ZeRO-1 engine, per rank: what each allocates, how long each part
takes, and how long the step loop is blocked (sync vs async), for the gathered save this project
used before (`ZeroAdamW.full_state()` all-gathered, DCP writes the full tensors, rank 0 hashes
every file; resume: every rank hashes every file and gathers full state as load targets) and the
sharded one (`parallel.checkpoint.save` / `load`: each rank writes and reads its own chunks and
hashes the items as it writes or reads them).

    torchrun --nproc-per-node 4 benchmarks/bench_checkpoint.py --out /tmp/ckpt_bench

Every rank prints one line per measurement; rank 0 prints the table (max over ranks).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from benchmarks.memtrace import peak_cpu_bytes
from data.identity import sha256_file
from model.transformer import build_model
from parallel import checkpoint as ckpt
from parallel.checkpointer import Checkpointer, stage
from parallel.config import ParallelConfig
from parallel.data_parallel import OPT_KEYS, ZeroAdamW
from parallel.engine.zero import ZeroEngine, _ep_mesh, _wrap
from parallel.expert import expert_shards, parallelize_experts
from parallel.topology import Topology
from trainer.config import load_config


def build(args, seed=0):
    cfg = load_config(None, ["model.vocab_size=8192", "model.max_seq_len=64", "data.seq_len=64",
                             f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
                             f"model.dense_ffn_size={4 * args.hidden}", f"moe.expert_ffn_size={args.hidden}",
                             "attention.num_heads=4", "moe.num_experts=8", f"train.seed={seed}"])
    topo = Topology.from_config(ParallelConfig(ep=args.ep), num_experts=cfg.moe.num_experts)
    model = build_model(cfg)
    dispatcher = parallelize_experts(model, topo) if args.ep > 1 else None
    zero = ZeroAdamW(model, topo, lr=1e-3, grad_scale=1.0)
    for b in zero.buckets:  # moments as after some steps (values do not matter for the cost)
        b.exp_avg.normal_()
        b.exp_avg_sq.uniform_()
    return ZeroEngine(model, zero, topo, torch.device("cpu"), contextlib.nullcontext, dispatcher)


def timed(fn):
    dist.barrier()
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def gathered_state(engine):
    """The old save's tensors: model views plus every parameter's master and moments, gathered."""
    shards = expert_shards(engine.model)
    mesh = _ep_mesh(engine.topology, "cpu")
    state = {f"model.{k}": _wrap(v, k, shards, mesh) for k, v in engine.model.state_dict().items()}
    state["optim.step"] = torch.tensor(engine.zero.step_count)
    for name, per in engine.zero.full_state().items():
        for key in OPT_KEYS:
            state[f"optim.{name}.{key}"] = _wrap(per[key], name, shards, mesh)
    return state


def save_before(engine, path):
    parts = {}
    parts["gather"], state = timed(lambda: gathered_state(engine))
    parts["write"], _ = timed(lambda: dcp.save(state, checkpoint_id=os.path.join(path, "dcp")))
    rank0 = engine.topology.rank == 0
    parts["hash (rank 0)"], _ = timed(lambda: [sha256_file(f) for f in glob.glob(f"{path}/dcp/*")] if rank0 else None)
    return parts


def load_before(engine, path):
    parts = {}
    parts["hash (every rank)"], _ = timed(lambda: [sha256_file(f) for f in glob.glob(f"{path}/dcp/*")])
    parts["gather targets"], state = timed(lambda: gathered_state(engine))
    parts["read"], _ = timed(lambda: dcp.load(state, checkpoint_id=os.path.join(path, "dcp")))
    names = [n for b in engine.zero.buckets for n, _, _ in b.params]

    def fill():
        local = {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in state.items()}
        engine.zero.load_full_state({n: {k: local[f"optim.{n}.{k}"] for k in OPT_KEYS} for n in names}, 0)
    parts["scatter into shards"], _ = timed(fill)
    return parts


def save_after(engine, root):
    total, path = timed(lambda: ckpt.save(root, 1, engine.state_dict(), {"step": 1}, "x: 1\n", 2, engine.topology))
    return {"write + hash (each rank its own)": total}, path


def load_after(engine, path):
    parts = {}
    parts["manifest + small files"], _ = timed(lambda: ckpt.read_checkpoint(path))
    parts["read + verify (own items)"], _ = timed(lambda: ckpt.load(path, engine))
    return parts


def loop_blocked(engine, root, async_save):
    saver = Checkpointer(root, "x: 1\n", 2, engine.topology, async_save)
    blocked, _ = timed(lambda: saver.save(2, engine.state_dict(), {"step": 2}))
    waited, _ = timed(saver.wait)
    return blocked, waited


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--skip-before", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = build(args)
    n_local = sum(p.numel() for p in engine.model.parameters())
    shard = sum(getattr(b, k).numel() * 4 for b in engine.zero.buckets for k in OPT_KEYS)
    bucket = max(b.numel for b in engine.zero.buckets) * 4
    rows = {"local params (M)": n_local / 1e6, "ZeRO shard (MiB)": shard / 2**20, "bucket (MiB)": bucket / 2**20}
    if rank == 0 and os.path.exists(args.out):
        shutil.rmtree(args.out)
    dist.barrier()
    if not args.skip_before:
        path = os.path.join(args.out, "before", "step_00000001")
        os.makedirs(path, exist_ok=True)
        peak, _, parts = peak_cpu_bytes(lambda: save_before(engine, path))
        rows["before: save allocates (MiB)"] = peak / 2**20
        rows.update({f"before: save {k} (s)": v for k, v in parts.items()})
        other = build(args, seed=1)
        peak, _, parts = peak_cpu_bytes(lambda: load_before(other, path))
        rows["before: load allocates (MiB)"] = peak / 2**20
        rows.update({f"before: load {k} (s)": v for k, v in parts.items()})
        del other
    peak, _, (parts, path) = peak_cpu_bytes(lambda: save_after(engine, os.path.join(args.out, "after")))
    rows["after: save allocates (MiB)"] = peak / 2**20
    rows.update({f"after: save {k} (s)": v for k, v in parts.items()})
    rows["after: bytes written (MiB)"] = sum(os.path.getsize(f) for f in glob.glob(f"{path}/dcp/__{rank}_*")) / 2**20
    other = build(args, seed=1)
    peak, _, parts = peak_cpu_bytes(lambda: load_after(other, path))
    rows["after: load allocates (MiB)"] = peak / 2**20
    rows.update({f"after: load {k} (s)": v for k, v in parts.items()})
    del other
    for mode in (False, True):
        blocked, waited = loop_blocked(engine, os.path.join(args.out, f"loop_{mode}"), mode)
        name = "async" if mode else "sync"
        rows[f"loop blocked per save, {name} (s)"] = blocked
        if mode:
            rows["async: background write after the save returned (s)"] = waited
            peak, _, staged = peak_cpu_bytes(lambda: stage(engine.state_dict(), engine.topology))
            rows["async: host memory staged (MiB)"] = peak / 2**20
    table = [None] * world
    dist.all_gather_object(table, rows)
    if rank == 0:
        print(f"world {world} (dp {world // args.ep} x ep {args.ep}), hidden {args.hidden}, layers {args.layers}")
        print(f"{'measure':58s} " + " ".join(f"rank {r:>2d}" for r in range(world)))
        for key in rows:
            print(f"{key:58s} " + " ".join(f"{t[key]:7.2f}" for t in table))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
