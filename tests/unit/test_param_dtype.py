"""`train.param_dtype` in one process: the config rules, the local AdamW's fp32 masters, and a
single-process checkpoint resumed across parameter dtypes (its fp32 masters come back whole)."""
import pytest
import torch

from model.batch import make_batch
from parallel import checkpoint as ckpt
from parallel.engine import build_engine
from parallel.topology import Topology, plan_layout
from trainer.config import load_config
from trainer.restore import pick_device

SMALL = ["model.vocab_size=256", "model.max_seq_len=16", "data.seq_len=16", "model.num_layers=2",
         "model.hidden_size=32", "model.dense_ffn_size=32", "moe.expert_ffn_size=16", "attention.num_heads=2"]


def test_bf16_params_need_bf16_compute():
    with pytest.raises(ValueError, match=r"train\.param_dtype = 'bf16'.*train\.dtype = 'fp32'"):
        load_config(None, ["train.param_dtype=bf16", "train.dtype=fp32"])
    with pytest.raises(ValueError, match="param_dtype"):
        load_config(None, ["train.param_dtype=fp16"])
    with pytest.raises(ValueError, match="grad_reduce_dtype"):
        load_config(None, ["optim.grad_reduce_dtype=fp8"])
    cfg = load_config(None, ["train.param_dtype=bf16", "train.device=cpu"])
    assert pick_device(cfg) == (torch.device("cpu"), torch.bfloat16)   # auto: bf16 compute


def _engine(*extra):
    cfg = load_config(None, SMALL + list(extra))
    return build_engine(cfg, Topology(plan_layout(1), 0), torch.device("cpu"), torch.bfloat16)


def _step(engine, seed):
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    engine.forward_backward([make_batch(tokens, None)])
    engine.reduce_and_norm()
    engine.apply(1e-2)


def test_local_bf16_params_step_an_fp32_master(tmp_path):
    engine = _engine("train.param_dtype=bf16")
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    _step(engine, 0)
    for name, p in engine.model.named_parameters():
        master = engine.optimizer.state[p]["master"]
        assert master.dtype == torch.float32 and p.grad is None
        torch.testing.assert_close(p, master.to(torch.bfloat16), rtol=0, atol=0)
    finer = [n for n, p in engine.model.named_parameters() if not torch.equal(engine.optimizer.state[p]["master"],
                                                                              p.float())]
    assert finer  # the masters keep what a bf16 weight rounds away
    # a bf16 checkpoint resumed as fp32: the parameters are its fp32 masters
    path = ckpt.save(str(tmp_path), 1, engine.state_dict(), {"step": 1}, "x: 1\n", 2, engine.topology)
    fp32 = _engine("train.seed=3")
    assert ckpt.load(path, fp32) == {"step": 1}
    for name, p in fp32.model.named_parameters():
        assert p.dtype == torch.float32
        torch.testing.assert_close(p.detach(), engine.optimizer.state[dict(engine.model.named_parameters())[name]]
                                   ["master"], rtol=0, atol=0, msg=name)
    # and back: the fp32 run's checkpoint into a bf16 run, then one more step each, equal
    path = ckpt.save(str(tmp_path), 2, fp32.state_dict(), {"step": 2}, "x: 1\n", 2, fp32.topology)
    again = _engine("train.param_dtype=bf16", "train.seed=4")
    ckpt.load(path, again)
    _step(engine, 1)
    _step(again, 1)
    for (name, a), b in zip(engine.model.named_parameters(), again.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
