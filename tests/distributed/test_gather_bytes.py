"""The optimizer step's all-gathers write the parameters themselves, and the planner's gather term
is what they add on top of the weights. From the first gather on, a bucket's parameters are views
of one flat buffer of their dtype (padded to a multiple of the group), which the all-gather fills:
no second copy of the weights is in flight. What a gather adds is that padding, plus a bf16 copy of
the rank's shard to send when the parameters are bf16 (an fp32 master is sent as it is). Counted on
real gloo ranks at dp 2 and at dp 4 x ep 2 (expert buckets over edp 2), fp32 and bf16, against
`trainer.plan.memory.gather_bytes`; the parameters hold the gathered masters afterwards. (torch's
allocator, through the profiler, is not exact here: gloo's worker thread allocates temporaries of
its own while the gathers run.)"""
import pytest
import torch

from model.transformer import build_model
from parallel.data_parallel import ZeroAdamW
from parallel.expert import parallelize_experts
from parallel.precision import DTYPES, cast_params_
from parallel.config import ParallelConfig
from parallel.topology import Topology
from tests.distributed.spawn import run_ranks
from trainer.config import load_config
from trainer.plan.memory import gather_bytes, param_inventory, rank_params

ARGS = ["model.vocab_size=512", "data.seq_len=32", "model.hidden_size=64", "model.dense_ffn_size=128",
        "moe.expert_ffn_size=32"]


def _case(rank, world, ep, param_dtype):
    cfg = load_config("configs/tiny.yaml", ARGS)
    topo = Topology.from_config(ParallelConfig(ep=ep), num_experts=cfg.moe.num_experts)
    model = build_model(cfg)
    if ep > 1:
        parallelize_experts(model, topo)
    zero = ZeroAdamW(model, topo, weight_decay=cfg.optim.weight_decay, bucket_mb=0.05)
    cast_params_(model, DTYPES[param_dtype])
    params_before = {id(p): p.data_ptr() for p in model.parameters()}
    zero._launch_gathers()  # what the end of an optimizer step launches
    masters = {b.master.untyped_storage().data_ptr() for b in zero.buckets}
    sends = {send.untyped_storage().data_ptr(): send.untyped_storage().nbytes() for _, send in zero._pending.values()}
    padding = sum(b.param_flat.untyped_storage().nbytes() - sum(p.numel() * p.element_size() for _, p, _ in b.params)
                  for b in zero.buckets)
    held = padding + sum(n for ptr, n in sends.items() if ptr not in masters)
    zero.wait_params()
    for b in zero.buckets:  # every parameter is a view of its bucket's buffer, holding the masters' values
        for _, p, off in b.params:
            assert p.untyped_storage().data_ptr() == b.param_flat.untyped_storage().data_ptr()
            assert p.data_ptr() != params_before[id(p)]
        torch.testing.assert_close(b.my_slice(b.param_flat).float(), b.master.to(b.param_flat.dtype).float(),
                                   atol=0, rtol=0)
    params = rank_params(param_inventory(cfg), list(range(cfg.model.num_layers)), True, True, cfg)
    cap = int(0.05 * 2 ** 20 / 4)
    return held, gather_bytes(params, ep, world, cfg.optim.weight_decay, 2 if param_dtype == "bf16" else 4, cap=cap)


@pytest.mark.parametrize("param_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("world,ep", [(2, 1), (4, 2)])
def test_step_all_gather_fills_the_parameters_and_adds_what_the_planner_says(world, ep, param_dtype):
    for rank, (held, planned) in enumerate(run_ranks(_case, world, ep, param_dtype)):
        assert held == planned, (rank, held, planned)
