"""The planner's all-gather term is what ZeroAdamW allocates: after an optimizer step every bucket
comes back from the fp32 master shards into a flat buffer of the parameters' dtype (padded to its
group), plus a bf16 copy of the shard to send when the parameters are bf16. Counted on real gloo
ranks as the storages the step's in-flight all-gathers hold apart from the fp32 masters, at dp 2
and at dp 4 x ep 2 (expert buckets over edp 2), fp32 and bf16. (The allocator's own count around
the launch is not exact here: gloo's worker thread allocates temporaries of its own while the
gathers run, a varying few percent.) The planner's fullest-rank total counts only the part above
the activations (trainer.plan.memory)."""
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
    zero._launch_gathers()  # what the end of an optimizer step launches
    masters = {b.master.untyped_storage().data_ptr() for b in zero.buckets}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for _, flat, send in zero._pending.values() for t in (flat, send)}
    held = sum(n for ptr, n in storages.items() if ptr not in masters)
    zero.wait_params()
    params = rank_params(param_inventory(cfg), list(range(cfg.model.num_layers)), True, True, cfg)
    cap = int(0.05 * 2 ** 20 / 4)
    return held, gather_bytes(params, ep, world, cfg.optim.weight_decay, 2 if param_dtype == "bf16" else 4, cap=cap)


@pytest.mark.parametrize("param_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("world,ep", [(2, 1), (4, 2)])
def test_step_all_gather_buffers_equal_the_planner(world, ep, param_dtype):
    for rank, (held, planned) in enumerate(run_ranks(_case, world, ep, param_dtype)):
        assert held == planned, (rank, held, planned)
