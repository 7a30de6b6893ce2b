"""NaN/inf in a loss or a gradient: halt names the step and the component, skip drops the step.

Runs the real loop (`trainer.loop.train`) of a tiny model on a synthetic in-memory stream and
injects the non-finite value with hooks at one chosen step: into the MTP module's output (so only
mtp_loss is NaN) or into one parameter's gradient (losses finite, gradient not).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trainer import loop
from trainer.config import load_config
from trainer.metrics import MetricsWriter
from trainer.restore import pick_device
from trainer.train import build_run, init_distributed

CFG = ["model.vocab_size=64", "model.hidden_size=32", "model.num_layers=2", "model.first_k_dense=1",
       "model.dense_ffn_size=32", "model.max_seq_len=16", "attention.num_heads=2", "attention.q_lora_rank=16",
       "attention.kv_lora_rank=8", "attention.qk_nope_head_dim=8", "attention.qk_rope_head_dim=4",
       "attention.v_head_dim=8", "moe.num_experts=4", "moe.expert_ffn_size=8", "moe.topk=2", "moe.n_group=1",
       "moe.topk_group=1", "data.seq_len=16", "train.micro_batch_size=2", "train.device=cpu",
       "logging.tensorboard=false", "checkpoint.every=0", "schedule.warmup_steps=0"]
BAD_STEP = 3  # 1-based step that gets the non-finite value


class FakeStream:
    """Deterministic random documents, two per row, in the stream's take() format."""
    vocab_size = 64

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def take(self, n):
        tokens = self.rng.integers(1, 64, size=(n, 16))
        return tokens, [np.array([9, 7], dtype=np.int32)] * n

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass


def _run(tmp_path, on_nan, steps=6):
    cfg = load_config(None, CFG + [f"train.on_nan={on_nan}", f"train.steps={steps}",
                                   f"train.output_dir={tmp_path}", "train.max_nan_skips=1"])
    device, dtype = pick_device(cfg)
    return build_run(cfg, FakeStream(), init_distributed(cfg, device), device, dtype)


def _at_bad_step(run, fn):
    """Wrap fn so it only acts while the loop computes step BAD_STEP."""
    return lambda *a: fn(*a) if run.step == BAD_STEP - 1 else None


def _nan_into_mtp(run):
    run.model.mtp[0].register_forward_hook(_at_bad_step(run, lambda m, i, out: out * float("nan")))


def _nan_into_grad(run, name, value=float("inf")):
    param = dict(run.model.named_parameters())[name]
    param.register_hook(_at_bad_step(run, lambda g: g * value))


def _train(run, tmp_path):
    metrics = MetricsWriter(str(tmp_path), every=100, tensorboard=False)
    try:
        loop.train(run, metrics)
    finally:
        metrics.close()
    with open(tmp_path / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_halt_names_step_and_loss(tmp_path):
    run = _run(tmp_path, "halt")
    _nan_into_mtp(run)
    with pytest.raises(loop.NonFiniteError, match=rf"step {BAD_STEP}: losses \['mtp_loss'\]"):
        _train(run, tmp_path)
    assert run.step == BAD_STEP - 1  # nothing after the bad step ran


def test_halt_names_the_parameter_with_the_bad_gradient(tmp_path):
    run = _run(tmp_path, "halt")
    _nan_into_grad(run, "layers.1.attn.wo.weight", float("nan"))
    with pytest.raises(loop.NonFiniteError, match=rf"step {BAD_STEP}: gradient of layers\.1\.attn\.wo\.weight"):
        _train(run, tmp_path)


def test_halt_on_inf_gradient_names_step_and_parameter(tmp_path):
    run = _run(tmp_path, "halt")
    _nan_into_grad(run, "layers.1.attn.wo.weight")  # inf: clipping turns only this one into NaN
    with pytest.raises(loop.NonFiniteError, match=rf"step {BAD_STEP}: gradient of layers\.1\.attn\.wo\.weight"):
        _train(run, tmp_path)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_skip_drops_the_step_and_goes_on(tmp_path, where):
    run = _run(tmp_path, "skip")
    if where == "loss":
        _nan_into_mtp(run)
    else:
        _nan_into_grad(run, "layers.0.ffn.w_up.weight")
    entering = {}  # step index -> weights at the first forward of that step

    def snapshot(module, args):
        if run.step not in entering:
            entering[run.step] = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    run.model.register_forward_pre_hook(snapshot)
    rows = _train(run, tmp_path)
    assert [r["skipped"] for r in rows] == [r["step"] == BAD_STEP for r in rows]
    assert run.nan_skips == 1 and run.step == 6
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] != BAD_STEP)
    for k, v in run.model.state_dict().items():
        assert torch.isfinite(v).all(), k
    # the skipped step changed no weight (nor the router biases); the steps around it did
    skipped_in, skipped_out = entering[BAD_STEP - 1], entering[BAD_STEP]
    assert all(torch.equal(skipped_in[k], skipped_out[k]) for k in skipped_in)
    assert not torch.equal(entering[BAD_STEP]["head.weight"], entering[BAD_STEP + 1]["head.weight"])


def test_skip_budget_then_halt(tmp_path):
    run = _run(tmp_path, "skip", steps=8)
    run.model.mtp[0].register_forward_hook(
        lambda m, i, out: out * float("nan") if run.step >= BAD_STEP - 1 else None)
    with pytest.raises(loop.NonFiniteError, match=rf"step {BAD_STEP + 1}: losses"):
        _train(run, tmp_path)
    assert run.nan_skips == 2


def test_report_names_the_parameter_closest_to_the_loss(tmp_path):
    run = _run(tmp_path, "halt")

    def poison_backward(module, args, out):  # NaN flows back into layer 1 and everything before it
        if run.step == BAD_STEP - 1:
            out.register_hook(lambda g: g * float("nan"))
    run.model.layers["1"].register_forward_hook(poison_backward)
    with pytest.raises(loop.NonFiniteError) as err:
        _train(run, tmp_path)
    lead = str(err.value).split("gradient of ")[1].split(" ")[0]
    assert lead.startswith("layers.1.") and "parameters before it" in str(err.value), str(err.value)


def test_skip_budget_message_does_not_suggest_skip(tmp_path):
    run = _run(tmp_path, "skip", steps=8)
    run.model.mtp[0].register_forward_hook(
        lambda m, i, out: out * float("nan") if run.step >= BAD_STEP - 1 else None)
    with pytest.raises(loop.NonFiniteError) as err:
        _train(run, tmp_path)
    assert "on_nan=skip" not in str(err.value) and "train.max_nan_skips = 1" in str(err.value)
