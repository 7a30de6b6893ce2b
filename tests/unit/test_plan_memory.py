"""The planner's static bytes per rank equal the tensors a real rank allocates.

Single process: the tiny model and its ZeRO-1 optimizer at dp = 1. Sharded: rank by rank of an
8-rank layout (pp 2 x dp 4, ep 2, uneven stages, DualPipe's two copies too), each built in this
process exactly as the trainer builds it (union model of the rank's stages, experts sharded over
ep, ZeroAdamW's buckets) on a topology without process groups.
"""
import pytest
import torch

from model.transformer import build_model
from parallel.data_parallel import ZeroAdamW
from parallel.expert import parallelize_experts
from parallel.pipeline.model_stage import build_union_chunks
from parallel.pipeline.schedules import build_schedule
from parallel.topology import Topology, plan_layout
from trainer.config import load_config
from trainer.plan.memory import activation_model, param_inventory, rank_params, static_bytes

TINY = ["model.vocab_size=512"]


def measured(model, zero) -> dict[str, int]:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = [(b.master, b.exp_avg, b.exp_avg_sq) for b in zero.buckets]
    return {"weights": weights, "grads": weights,  # fp32 .grad of every parameter after a backward
            "master": sum(m.numel() * m.element_size() for m, _, _ in opt),
            "moments": sum(a.numel() * a.element_size() + s.numel() * s.element_size() for _, a, s in opt)}


@pytest.mark.parametrize("bf16", [False, True])
def test_single_process_bytes_are_exact(bf16):
    cfg = load_config("configs/tiny.yaml", TINY)
    model = build_model(cfg)
    zero = ZeroAdamW(model, Topology(plan_layout(1), 0), moment_dtype=torch.bfloat16 if bf16 else torch.float32,
                     weight_decay=cfg.optim.weight_decay)
    params = rank_params(param_inventory(cfg), list(range(cfg.model.num_layers)), True, True, cfg)
    assert vars(static_bytes(params, 1, 1, bf16, cfg.optim.weight_decay)) == measured(model, zero)


def test_gradients_are_one_fp32_tensor_per_parameter():
    from model.batch import make_batch
    cfg = load_config("configs/tiny.yaml", TINY + ["data.seq_len=32"])
    model = build_model(cfg)
    model(make_batch(torch.randint(0, 512, (2, 32)), None)).loss.backward()
    got = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    params = rank_params(param_inventory(cfg), list(range(cfg.model.num_layers)), True, True, cfg)
    assert got == static_bytes(params, 1, 1, False, cfg.optim.weight_decay).grads


@pytest.mark.parametrize("schedule, layout", [("1f1b", "[1,3]"), ("dualpipe", "[3,1]"), ("dualpipev", "[1,1,1,1]")])
def test_sharded_ranks_bytes_are_exact(schedule, layout):
    cfg = load_config("configs/tiny.yaml", TINY + ["parallel.pp=2", "parallel.ep=2", f"parallel.schedule={schedule}",
                                                   f"parallel.layout={layout}", "train.grad_accum=4"])
    sched = build_schedule(schedule, 2, 4)
    stages_layout = [[0], [1, 2, 3]] if layout == "[1,3]" else [[0, 1, 2], [3]] if layout == "[3,1]" \
        else [[0], [1], [2], [3]]
    inventory = param_inventory(cfg)
    last = sched.placement.num_stages - 1
    for rank in range(8):
        topo = Topology(plan_layout(8, pp=2, ep=2, ranks_per_node=4), rank)
        model, _ = build_union_chunks(cfg, sched, topo.pp_rank, [], split_w=False)
        if model.moe_modules():  # as parallel.engine.pipeline
            parallelize_experts(model, topo)
        zero = ZeroAdamW(model, topo, weight_decay=cfg.optim.weight_decay)
        stages = [sched.placement.stage_of(topo.pp_rank, c) for c in range(sched.placement.chunks_per_rank)]
        blocks = sorted(i for s in stages for i in stages_layout[s])
        params = rank_params(inventory, blocks, 0 in stages, last in stages, cfg)
        assert vars(static_bytes(params, 2, 4, False, cfg.optim.weight_decay)) == measured(model, zero), rank


def test_activation_model_counts_what_the_code_saves():
    """Elements per token of the tiny blocks (CPU math attention), checked within 1% against the
    counts read off saved-tensor hooks (benchmarks/bench_plan.py measures them end to end)."""
    cfg = load_config("configs/tiny.yaml", TINY)
    am = activation_model(cfg, 256, "math")
    assert am.dense_block[0] == pytest.approx(5572, rel=0.01)
    assert am.moe_block[0] == pytest.approx(6623, rel=0.01)
    flash = activation_model(cfg, 256, "flash")
    assert flash.dense_block[0] < am.dense_block[0]   # no L x L probabilities
