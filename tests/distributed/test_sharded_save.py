"""Sharded checkpoints at dp 2 and dp 4: no rank's save or load allocates more than its ZeRO
shard plus one bucket plus DCP's planning (torch's CPU allocator, through the profiler's memory
events), where the gathered save it replaces needed the full master and moments of every local
parameter. DCP's planning is metadata: rank 0 gathers every rank's pickled plan and sends back the
global one, a few buffers of about the size of the checkpoint's `.metadata` file, which grows with
the number of tensors, not with their size (measured at dp 4: 0.09 MiB per buffer, 2-3 alive at
once on rank 0, which is the whole difference between rank 0's peak and the others'); the
loaded state equals the saved one exactly; an item of a rank's file corrupted on disk is found
by the rank that reads it (its per-item checksum), and the load stops with a clear error."""
import contextlib
import glob
import os

import pytest
import torch

from benchmarks.memtrace import peak_cpu_bytes
from model.batch import make_batch
from model.transformer import build_model
from parallel import checkpoint as ckpt
from parallel.config import ParallelConfig
from parallel.data_parallel import ZeroAdamW
from parallel.engine.zero import ZeroEngine
from parallel.topology import Topology
from tests.distributed.spawn import run_ranks
from trainer.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ("master", "exp_avg", "exp_avg_sq")


def _engine(seed):
    cfg = load_config(None, ["model.vocab_size=256", "model.max_seq_len=16", "data.seq_len=16", "model.num_layers=2",
                             "model.hidden_size=32", "model.dense_ffn_size=32", "moe.expert_ffn_size=16",
                             "attention.num_heads=2", f"train.seed={seed}"])
    topo = Topology.from_config(ParallelConfig())
    model = build_model(cfg)
    zero = ZeroAdamW(model, topo, lr=1e-3, weight_decay=0.1, bucket_mb=0.02, grad_scale=1.0)
    return ZeroEngine(model, zero, topo, torch.device("cpu"), contextlib.nullcontext, None)


def _shard_bytes(zero):
    return sum(getattr(b, k).numel() * getattr(b, k).element_size() for b in zero.buckets
               for k in KEYS)


def _case(rank, world, root):
    engine = _engine(seed=0)
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(rank))
    engine.forward_backward([make_batch(tokens, [[9, 7]])])
    engine.reduce_and_norm()
    engine.apply(1e-3)
    zero = engine.zero
    shard, bucket = _shard_bytes(zero), max(b.numel for b in zero.buckets) * 4
    gathered = 12 * sum(p.numel() for p in engine.model.parameters())  # what full_state() held
    saved = {name: torch.cat([per[k].reshape(-1) for k in KEYS]) for name, per in zero.full_state().items()}
    save_peak, _, path = peak_cpu_bytes(lambda: ckpt.save(root, 1, engine.state_dict(), {"step": 1}, "x: 1\n", 2,
                                                          engine.topology))
    other = _engine(seed=1)
    load_peak, _, state = peak_cpu_bytes(lambda: ckpt.load(path, other))
    planning = 3 * os.path.getsize(os.path.join(path, "dcp", ".metadata"))
    assert state == {"step": 1} and other.zero.step_count == 1
    for name, v in other.zero.full_state().items():
        got = torch.cat([v[k].reshape(-1) for k in KEYS])
        torch.testing.assert_close(got, saved[name], atol=0, rtol=0, msg=name)
    for (name, p), q in zip(engine.model.named_parameters(), other.model.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)
    # corrupt the middle of rank 1's file: the ranks that read that item refuse it, and all stop
    torch.distributed.barrier()
    if rank == 0:
        victim = sorted(glob.glob(os.path.join(path, "dcp", "__1_*.distcp")))[0]
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 2)
            f.write(b"\xff" * 8)
    torch.distributed.barrier()
    with pytest.raises(ckpt.CheckpointError, match="checksum in manifest.json"):
        ckpt.load(path, other)
    return save_peak, load_peak, shard + bucket + planning, gathered


@pytest.mark.parametrize("world", [2, 4])
def test_save_and_load_allocate_at_most_a_shard_and_a_bucket_and_verify_what_they_read(tmp_path, world):
    for save_peak, load_peak, bound, gathered in run_ranks(_case, world, str(tmp_path)):
        print(f"dp {world}: save +{save_peak / 2**20:.2f} MiB, load +{load_peak / 2**20:.2f} MiB; shard + bucket + "
              f"planning {bound / 2**20:.2f} MiB, gathered state {gathered / 2**20:.2f} MiB")
        assert save_peak <= bound and load_peak <= bound
        assert gathered > bound  # the bound excludes the gathered save

