"""The planner's bytes per rank follow `train.param_dtype` exactly, and its save term is what a
save stages.

Parameters and gradients are measured on models cast as the trainer casts them
(`parallel.precision.cast_params_`, after ZeroAdamW took its fp32 masters), the gradients after
a real backward under bf16 autocast; the rank of an 8-rank pipeline x expert layout is built in
this process as in tests/unit/test_plan_memory.py. An async save's host staging is the sum of
what `parallel.checkpointer.stage` copies (one process: it writes everything), model buffers (the
router bias, which the planner leaves out) aside.
"""
import pytest
import torch

from model.batch import make_batch
from model.transformer import build_model
from parallel.checkpointer import stage
from parallel.data_parallel import ZeroAdamW
from parallel.engine import build_engine
from parallel.expert import parallelize_experts
from parallel.pipeline.model_stage import build_union_chunks
from parallel.pipeline.schedules import build_schedule
from parallel.precision import DTYPES, cast_params_
from parallel.topology import Topology, plan_layout
from trainer.config import load_config
from trainer.plan.memory import (BUCKET_ELEMENTS, FP32, param_inventory, rank_params, save_bytes,
                                 static_bytes)

TINY = ["model.vocab_size=512", "data.seq_len=32"]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measured(model, zero) -> dict[str, int]:
    return {"weights": _bytes(model.parameters()),
            "grads": _bytes(p.grad for p in model.parameters() if p.grad is not None),
            "master": _bytes(b.master for b in zero.buckets),
            "moments": _bytes([b.exp_avg for b in zero.buckets] + [b.exp_avg_sq for b in zero.buckets])}


@pytest.mark.parametrize("param_dtype", ["fp32", "bf16"])
def test_single_process_param_grad_optimizer_bytes_are_exact(param_dtype):
    cfg = load_config("configs/tiny.yaml", TINY)
    model = build_model(cfg)
    zero = ZeroAdamW(model, Topology(plan_layout(1), 0), weight_decay=cfg.optim.weight_decay)
    cast_params_(model, DTYPES[param_dtype])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(make_batch(torch.randint(0, 512, (2, 32)), None)).loss
    loss.backward()
    assert {p.grad.dtype for p in model.parameters()} == {DTYPES[param_dtype]}
    params = rank_params(param_inventory(cfg), list(range(cfg.model.num_layers)), True, True, cfg)
    want = static_bytes(params, 1, 1, False, cfg.optim.weight_decay, param_bytes=2 if param_dtype == "bf16" else 4)
    assert vars(want) == measured(model, zero)


def test_pipeline_expert_rank_bytes_follow_param_dtype():
    cfg = load_config("configs/tiny.yaml", TINY + ["parallel.pp=2", "parallel.ep=2", "parallel.layout=[1,3]",
                                                   "train.grad_accum=4"])
    sched = build_schedule("1f1b", 2, 4)
    inventory = param_inventory(cfg)
    for rank in (0, 5):
        topo = Topology(plan_layout(8, pp=2, ep=2, ranks_per_node=4), rank)
        model, _ = build_union_chunks(cfg, sched, topo.pp_rank, [], split_w=False)
        if model.moe_modules():
            parallelize_experts(model, topo)
        zero = ZeroAdamW(model, topo, weight_decay=cfg.optim.weight_decay)
        cast_params_(model, torch.bfloat16)
        for p in model.parameters():  # a gradient of the parameter's dtype, as autograd gives
            p.grad = torch.zeros_like(p)
        blocks = [0] if topo.pp_rank == 0 else [1, 2, 3]
        params = rank_params(inventory, blocks, topo.pp_rank == 0, topo.pp_rank == 1, cfg)
        want = static_bytes(params, 2, 4, False, cfg.optim.weight_decay, param_bytes=2)
        assert vars(want) == measured(model, zero), rank


@pytest.mark.parametrize("param_dtype", ["fp32", "bf16"])
def test_async_save_host_staging_is_what_stage_copies(param_dtype):
    cfg = load_config("configs/tiny.yaml", TINY + [f"train.param_dtype={param_dtype}"])
    topo = Topology(plan_layout(1), 0)
    engine = build_engine(cfg, topo, torch.device("cpu"), torch.bfloat16)
    staged = stage(engine.state_dict(), topo)
    names = dict(engine.model.named_buffers())
    buffers = _bytes(t for k, t in engine.model.state_dict().items() if k in names)
    copied = _bytes(v for k, v in staged.items() if k != "optim.step") - buffers
    params = rank_params(param_inventory(cfg), list(range(cfg.model.num_layers)), True, True, cfg)
    param_bytes = 2 if param_dtype == "bf16" else 4
    st = static_bytes(params, 1, 1, False, cfg.optim.weight_decay, param_bytes)
    save = save_bytes(params, 1, 1, st, async_save=True, param_bytes=param_bytes)
    assert save.device == 0 and save.host - FP32 * BUCKET_ELEMENTS == copied
    assert save_bytes(params, 1, 1, st, async_save=False).device == FP32 * BUCKET_ELEMENTS
