"""Expert parallelism on real gloo ranks: the all-to-all dispatcher (one and two stages) gives
the LocalDispatcher's outputs and gradients, a token crosses to each remote node once, and an
MoE layer of the tiny model sharded over ep ranks matches the unsharded layer.

Tolerances: fp32 throughout; only the summation order of the K expert outputs (and of gradient
contributions) differs from the single-process reference, so atol = rtol = 1e-5.
"""
import dataclasses
import types

import pytest
import torch

from parallel.config import ParallelConfig
from parallel.expert import AllToAllDispatcher, parallelize_experts
from parallel.topology import Topology
from tests.distributed.spawn import run_ranks
from trainer.config import Config
from model.experts import LocalDispatcher
from model.moe import MoE
from model.experts import GroupedExperts
from model.provider import LayerProvider

TOL = dict(atol=1e-5, rtol=1e-5)
E, D, F, K, T = 8, 16, 12, 3, 24


def _global_inputs(world):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(world * T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(world * T)])
    w = torch.rand(world * T, K, generator=g)
    out_grad = torch.randn(world * T, D, generator=g)
    experts = GroupedExperts(E, D, F, layer=0)
    for p in experts.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return x, ids, w, out_grad, experts


def _run(dispatcher, experts, x, ids, w, out_grad):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    x_SD, counts, state = dispatcher.dispatch(x, ids, w)
    y = dispatcher.combine(experts(x_SD, counts), state)
    (y * out_grad).sum().backward()
    return y.detach(), x.grad, w.grad


def _dispatcher_case(rank, world, ep, rpn, node_limited):
    topo = Topology.from_config(ParallelConfig(ep=ep, ranks_per_node=rpn))
    x, ids, w, g, experts = _global_inputs(world)
    mine = slice(rank * T, (rank + 1) * T)
    y_ref, gx_ref, gw_ref = _run(LocalDispatcher(E), experts, x[mine], ids[mine], w[mine], g[mine])
    grads_ref = {n: p.grad.clone() for n, p in experts.named_parameters()}
    disp = AllToAllDispatcher(E, topo, node_limited)
    local = GroupedExperts(disp.num_local_experts, D, F, layer=0)
    off, n = disp.expert_offset, disp.num_local_experts
    for name, p in local.named_parameters():
        p.data.copy_(getattr(experts, name).detach()[off:off + n])
    y, gx, gw = _run(disp, local, x[mine], ids[mine], w[mine], g[mine])
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(gx, gx_ref, **TOL)
    torch.testing.assert_close(gw, gw_ref, **TOL)
    # expert grads on this rank = sum over the ep group's tokens; reference: sum the ref grads
    for name, p in local.named_parameters():
        ref = grads_ref[name].clone()
        torch.distributed.all_reduce(ref, group=topo.group("ep"))
        torch.testing.assert_close(p.grad, ref[off:off + n], **TOL)
    return dataclasses.asdict(disp.stats), ids[mine].tolist()


def _expected_rows(ids_rows, rank, ep, rpn, per_node):
    """Rows that leave `rank` across / within nodes, implied by the routing alone."""
    e_loc = E // ep
    cross = intra = 0
    for ids in ids_rows:
        dest_ranks = {i // e_loc for i in ids}
        nodes = {d // rpn for d in dest_ranks}
        if per_node:
            cross += len(nodes - {rank // rpn})
        else:
            cross += sum(1 for d in dest_ranks if d // rpn != rank // rpn)
            intra += sum(1 for d in dest_ranks if d // rpn == rank // rpn and d != rank)
    return cross, intra


def _moe_layer_case(rank, world, ep, rpn):
    cfg = Config()
    topo = Topology.from_config(ParallelConfig(ep=ep, ranks_per_node=rpn))
    torch.manual_seed(0)
    ref = MoE(LayerProvider(), LocalDispatcher(E), cfg.model.hidden_size, cfg.moe, layer=1, moe_index=0)
    for p in ref.parameters():
        p.data.normal_(0, 0.05)
    sharded = MoE(LayerProvider(), LocalDispatcher(E), cfg.model.hidden_size, cfg.moe, layer=1, moe_index=0)
    sharded.load_state_dict(ref.state_dict())
    parallelize_experts(torch.nn.ModuleDict({"moe": sharded}), topo, node_limited=True)
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(2, 16, cfg.model.hidden_size, generator=g)
    outs = []
    for layer in (ref, sharded):
        ctx = types.SimpleNamespace(valid=torch.ones(2, 16, dtype=torch.bool),
                                    expert_counts=torch.zeros(1, E), balance_losses=[])
        xx = x.clone().requires_grad_()
        y = layer(xx, ctx)
        (y.square().sum() + sum(ctx.balance_losses)).backward()
        outs.append((y.detach(), xx.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], **TOL)
    torch.testing.assert_close(outs[1][1], outs[0][1], **TOL)
    off, n = sharded.experts.expert_offset, sharded.experts.num_experts
    for name, p in sharded.named_parameters():
        ref_grad = dict(ref.named_parameters())[name].grad.clone()
        if name.startswith("experts."):  # an expert's grad gathers the tokens of the whole ep group
            torch.distributed.all_reduce(ref_grad, group=topo.group("ep"))
            ref_grad = ref_grad[off:off + n]
        torch.testing.assert_close(p.grad, ref_grad, **TOL)
    return n


def _all_cases(rank, world):
    """Every case in one spawn of 4 ranks (process start-up dominates on 2 cores)."""
    return {
        "one_stage_ep4": _dispatcher_case(rank, world, 4, 2, False),
        "two_stage_ep4": _dispatcher_case(rank, world, 4, 2, True),
        "ep2_dp2": _dispatcher_case(rank, world, 2, 4, True),
        "moe_ep2": _moe_layer_case(rank, world, 2, 4),
        "moe_ep4_two_nodes": _moe_layer_case(rank, world, 4, 2),
    }


@pytest.fixture(scope="module")
def results():
    return run_ranks(_all_cases, 4)


def test_one_stage_matches_local_dispatcher_and_counts_rows(results):
    for rank, out in enumerate(results):
        stats, ids = out["one_stage_ep4"]
        cross, intra = _expected_rows(ids, rank, 4, 2, per_node=False)
        assert (stats["cross_node_rows"], stats["intra_node_rows"]) == (cross, intra)


def test_two_stage_sends_once_per_remote_node(results):
    for rank, out in enumerate(results):
        stats, ids = out["two_stage_ep4"]
        cross, _ = _expected_rows(ids, rank, 4, 2, per_node=True)
        naive_cross, _ = _expected_rows(ids, rank, 4, 2, per_node=False)
        assert stats["cross_node_rows"] == cross
        assert cross < naive_cross  # K=3 of 8 experts on 2 nodes: many tokens hit 2 ranks of one node
        assert stats["intra_node_bytes"] > 0


def test_ep2_with_dp2_matches_local_dispatcher(results):
    assert all(out["ep2_dp2"][0]["cross_node_rows"] == 0 for out in results)  # ep group inside a node


def test_moe_layer_ep2_and_ep4_two_nodes_match_single_process(results):
    assert [out["moe_ep2"] for out in results] == [4] * 4
    assert [out["moe_ep4_two_nodes"] for out in results] == [2] * 4
