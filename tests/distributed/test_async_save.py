"""Asynchronous saves at dp 2 x ep 2: the save returns once this rank's part is staged in host
memory; training mutates the live tensors while a background thread writes; the checkpoint holds
the state at the save, exactly (model, ZeRO master and moments, step), and loads at another
layout (ep 1). The next save waits for the previous one; both end up complete and listed."""
import contextlib

import pytest
import torch

from model.batch import make_batch
from parallel import checkpoint as ckpt
from parallel.checkpointer import Checkpointer
from parallel.config import ParallelConfig
from parallel.data_parallel import ZeroAdamW
from parallel.engine.zero import ZeroEngine
from parallel.expert import expert_shards, parallelize_experts
from parallel.topology import Topology
from tests.distributed.spawn import run_ranks
from trainer.config import load_config
from model.transformer import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ("master", "exp_avg", "exp_avg_sq")


def _engine(ep, seed):
    cfg = load_config(None, ["model.vocab_size=128", "model.max_seq_len=16", "data.seq_len=16", "model.num_layers=2",
                             "model.hidden_size=32", "model.dense_ffn_size=32", "moe.expert_ffn_size=16",
                             "attention.num_heads=2", f"train.seed={seed}"])
    topo = Topology.from_config(ParallelConfig(ep=ep, ranks_per_node=1), num_experts=cfg.moe.num_experts)
    model = build_model(cfg)
    dispatcher = parallelize_experts(model, topo) if ep > 1 else None
    zero = ZeroAdamW(model, topo, lr=1e-2, bucket_mb=0.02, grad_scale=1.0)
    return ZeroEngine(model, zero, topo, torch.device("cpu"), contextlib.nullcontext, dispatcher)


def _train_step(engine, rank, step):
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(10 * step + rank))
    engine.forward_backward([make_batch(tokens, [[16], [5, 6]])])
    engine.reduce_and_norm()
    engine.apply(1e-2)


def _full(engine):
    """Model tensors at global shape and the ZeRO state, gathered (collective; expert rows of
    this rank's ep slice at ep 2 and of all experts at ep 1, so `rows` picks the former)."""
    state = {}
    for n, per in engine.zero.full_state().items():
        state[f"optim.{n}"] = torch.stack([per[k] for k in KEYS], 1)  # rows first: experts stay in dim 0
    for k, v in engine.state_dict().items():
        if k.startswith("model."):
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            state[k] = v.detach().clone()
    return state


def _case(rank, world, root):
    engine = _engine(ep=2, seed=0)
    saver = Checkpointer(root, "x: 1\n", 5, engine.topology, async_save=True)
    _train_step(engine, rank, 1)
    at_save, shards = _full(engine), expert_shards(engine.model)
    saver.save(1, engine.state_dict(), {"step": 1})
    _train_step(engine, rank, 2)           # mutates the live tensors while the write may still run
    _train_step(engine, rank, 3)
    saver.save(3, engine.state_dict(), {"step": 3})   # waits for the first
    saver.wait()
    assert [p[-8:] for p in ckpt.list_checkpoints(root)] == ["00000001", "00000003"]
    for ep in (2, 1):
        other = _engine(ep=ep, seed=1)
        assert ckpt.load(f"{root}/step_00000001", other) == {"step": 1}
        got = _full(other)
        assert sorted(got) == sorted(at_save)
        for key, want in at_save.items():
            value = got[key]
            if value.shape != want.shape:  # all experts at ep 1: this rank's rows at ep 2
                first = shards[key[len("optim."):]][0]
                value = value[first:first + want.shape[0]]
            torch.testing.assert_close(value, want, atol=0, rtol=0, msg=f"ep {ep}: {key}")
    return True


def test_async_save_holds_the_state_at_the_save_and_resumes_elsewhere(tmp_path):
    assert run_ranks(_case, 2, str(tmp_path / "ckpt")) == [True, True]
