"""Multi-rank pieces of a run: process group, topology, sharded model/optimizer, DCP checkpoints.

With WORLD_SIZE > 1 (torchrun / srun) every rank builds the full single-process model with the
same seeds, `parallel.expert.parallelize_experts` keeps its ep rank's experts and installs the
all-to-all dispatcher, and `parallel.data_parallel.ZeroAdamW` (ZeRO-1) owns the optimizer state.
Checkpoints are torch.distributed.checkpoint directories (tensors under their single-process
names and global shapes, so a run resumes at another (dp, ep) layout) plus a small `state.pt`
(step, data position, rank-0 RNG) and the same manifest + atomic rename as single-process ones.
"""
from __future__ import annotations

import datetime
import os
import shutil

import torch
import torch.distributed as dist

from parallel import checkpoint as ckpt
from trainer.config import Config, ConfigError


def init_distributed(cfg: Config):
    """Initialise torch.distributed from the launcher's environment; returns (topology, device)."""
    from parallel.topology import Topology
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("parallel.backend = 'nccl': needs CUDA devices; use parallel.backend=gloo on CPU")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    try:
        topology = Topology.from_config(cfg.parallel, num_experts=cfg.moe.num_experts)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return topology, device


def parallelize(model: torch.nn.Module, cfg: Config, topology):
    """Shard experts over ep and build the ZeRO-1 optimizer. Returns (ZeroAdamW, dispatcher or None)."""
    from parallel.expert import parallelize_experts
    dispatcher = None
    if topology.ep > 1:
        dispatcher = parallelize_experts(model, topology, node_limited=cfg.parallel.node_limited_dispatch)
    return zero_optimizer(model, cfg, topology), dispatcher


def zero_optimizer(model: torch.nn.Module, cfg: Config, topology):
    from parallel.data_parallel import ZeroAdamW
    o = cfg.optim
    return ZeroAdamW(model, topology, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                     grad_clip=o.grad_clip, moment_dtype=torch.bfloat16 if o.bf16_moments else torch.float32)


def all_reduce_mean(values: list[float], topology, kind: str = "dp", device=None) -> list[float]:
    """Mean of a few floats over a group (losses for the log); identity in a world of one.
    `device` must be the rank's CUDA device under NCCL."""
    if topology.size(kind) == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=topology.group(kind))
    return (t / topology.size(kind)).tolist()


def save(root: str, step: int, model, zero, topology, extra: dict, config_yaml: str, keep_last: int) -> str:
    """Collective save: DCP shards from every rank, then rank 0 finalises atomically."""
    from parallel.checkpoint import save_checkpoint
    final = os.path.join(root, f"step_{step:08d}")
    tmp = f"{final}.tmp-dist"
    if topology.rank == 0:
        if os.path.exists(tmp):  # our own earlier attempt; other leftovers go at start-up, under the lock
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    dist.barrier()
    save_checkpoint(os.path.join(tmp, "dcp"), model, zero, topology)
    dist.barrier()
    if topology.rank == 0:
        ckpt.finalize(root, tmp, final, step, extra, config_yaml, keep_last)
    dist.barrier()
    return final


def load(path: str, model, zero, topology) -> dict:
    """Collective load of a distributed checkpoint; returns the small `state.pt` extras."""
    from parallel.checkpoint import load_checkpoint
    if not os.path.isdir(os.path.join(path, "dcp")):
        raise ckpt.CheckpointError(f"{path}: a single-process checkpoint; resume it with one process "
                                   "(multi-rank runs write and read sharded DCP checkpoints)")
    extra = ckpt.read_checkpoint(path)
    load_checkpoint(os.path.join(path, "dcp"), model, zero, topology)
    return extra
