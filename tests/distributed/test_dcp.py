"""Checkpoints reshard across (dp, ep) layouts: saved by the ZeRO engine at ep=2 (dp=4) after one
ZeRO-1 step, loaded at ep=1 (every rank sees the full tensors) and at ep=4 over 2 emulated nodes;
model and optimizer state (master, moments, step) are identical to what was saved, slice for
slice. The small state.pt comes back as saved."""
import contextlib
import os

import torch

from parallel import checkpoint as ckpt
from parallel.config import ParallelConfig
from parallel.data_parallel import ZeroAdamW
from parallel.engine.zero import ZeroEngine
from parallel.expert import expert_shards, parallelize_experts
from parallel.topology import Topology
from tests.distributed.spawn import run_ranks
from model.batch import make_batch
from trainer.config import Config
from model.transformer import build_model


def _cfg(seed):
    cfg = Config()
    cfg.model.vocab_size = 256
    cfg.train.seed = seed
    return cfg


def _setup(ep, rpn, seed):
    cfg = _cfg(seed)
    topo = Topology.from_config(ParallelConfig(ep=ep, ranks_per_node=rpn))
    model = build_model(cfg)
    dispatcher = parallelize_experts(model, topo)
    opt = ZeroAdamW(model, topo, lr=1e-3, weight_decay=0.1, bucket_mb=0.1)
    return model, opt, ZeroEngine(model, opt, topo, torch.device("cpu"), contextlib.nullcontext, dispatcher)


def _snapshot(model, opt):
    shards = expert_shards(model)
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for name, per in opt.full_state().items():
        state.update({f"optim.{name}.{k}": v for k, v in per.items()})
    offsets = {}
    for key in state:
        name = key.split(".", 1)[1].rsplit(".", 1)[0] if key.startswith("optim.") else key[len("model."):]
        if name in shards:
            offsets[key] = shards[name][0]
    return state, offsets, opt.step_count


def _case(rank, world, root):
    model, opt, engine = _setup(2, 4, seed=0)
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(rank))
    model(make_batch(tokens, None)).loss.backward()
    opt.step()
    saved, saved_off, _ = _snapshot(model, opt)
    path = ckpt.save(root, 1, engine.state_dict(), {"step": 1}, "x: 1\n", 2, engine.topology)
    assert os.path.isfile(os.path.join(path, "dcp", ".metadata"))
    # ep = 1: full tensors everywhere
    model1, opt1, engine1 = _setup(1, 4, seed=1)
    assert ckpt.load(path, engine1) == {"step": 1}
    full, _, step1 = _snapshot(model1, opt1)
    assert step1 == 1
    for key, v in saved.items():
        want = full[key]
        if key in saved_off:
            want = want[saved_off[key]:saved_off[key] + v.shape[0]]
        torch.testing.assert_close(v, want, atol=0, rtol=0, msg=key)
    # ep = 4 over two emulated nodes
    model4, opt4, engine4 = _setup(4, 2, seed=2)
    ckpt.load(path, engine4)
    got, got_off, _ = _snapshot(model4, opt4)
    for key, v in got.items():
        want = full[key]
        if key in got_off:
            want = want[got_off[key]:got_off[key] + v.shape[0]]
        torch.testing.assert_close(v, want, atol=0, rtol=0, msg=key)
    return len(saved_off)


def test_reshard_between_ep2_ep1_ep4(tmp_path):
    n = run_ranks(_case, 4, str(tmp_path / "ckpt"))
    assert n[0] > 0 and len(set(n)) == 1
