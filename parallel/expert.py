"""Expert parallelism: all-to-all dispatch/combine, node-limited two-stage routing, expert sharding.

DeepSeek-V3 (arXiv 2412.19437, sections 2.1.2 and 3.2.2) spreads the routed experts of every MoE
layer over the expert-parallel (ep) ranks: ep rank j holds experts [j*E_loc, (j+1)*E_loc). A
layer sends each token to the ranks of its K experts, runs the local experts as grouped work and
returns the outputs, weighted by the gate, with the inverse exchange. No token is dropped.

Rows move in *hops* (one uneven all-to-all each). A row is sent once to every member of the
hop's group that holds at least one of its experts, carrying its gate weights and its expert ids
(the ids of experts elsewhere masked to -1):
  * one stage: one hop over the ep group, a row per (token, destination rank);
  * two stages (node-limited): a hop over `ep_inter` (my local index on every node) sends a
    token once per destination *node*, however many of its experts live there; a hop over
    `ep_intra` then fans it out to the ranks of that node. With experts grouped by node and each
    token limited to topk_group nodes, cross-node traffic scales with the nodes reached, not K.
At the expert rank the received rows are expanded to (row, slot) pairs sorted by local expert.
Combine weights each expert output by its gate at the expert rank, sums per received row and
walks the hops backwards, summing what comes back per sent row. Every step is autograd-aware:
gradients reach x and the gate weights. `dispatch_steps` / `combine_steps` are step generators
(`parallel.steps`): each yields a `PendingExchange` right after issuing it and, once resumed,
finishes it with the given `finish` (by default `PendingExchange.finish`; the pipeline's overlap
runtime passes one that cuts the autograd graph there). `dispatch_async` / `combine_async`
return a handle whose first all-to-all is already in flight.

Legend: T tokens, K experts per token, D hidden, R rows at a hop, M (row, member) pairs,
S (row, slot) pairs for local experts, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel.expert_comm import CommStats, PendingExchange, exchange_counts
from parallel.steps import Started


@dataclass
class Hop:
    """One all-to-all over `group`: `member_of_expert[e]` = the member that row copies for e go to."""

    group: object
    size: int
    me: int
    member_of_expert: Tensor
    cross: list[bool]


@dataclass
class _HopTrail:
    hop: Hop
    row_M: Tensor
    rows_before: int
    send_counts: list[int]
    recv_counts: list[int]


@dataclass
class DispatchState:
    trail: list[_HopTrail]
    row_S: Tensor
    k_S: Tensor
    weights_RK: Tensor
    rows: int
    extra: dict = field(default_factory=dict)


CommHandle = Started  # a dispatch or combine whose first exchange is issued; `wait()` returns the result


def finish_exchange(pending: PendingExchange) -> list[Tensor]:
    """The default way a step generator finishes an exchange: wait, result wired into autograd."""
    return pending.finish()


def member_loads(ids_RK: Tensor, member_of_expert: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """(dest_RK, n_RP): the member each (row, slot) goes to (`size` for masked slots) and how many
    of a row's experts each member holds."""
    valid = ids_RK >= 0
    dest_RK = torch.where(valid, member_of_expert[ids_RK.clamp(min=0).long()], size).long()
    n_RP = torch.zeros(ids_RK.shape[0], size + 1, dtype=torch.int64, device=ids_RK.device)
    n_RP.scatter_add_(1, dest_RK, torch.ones_like(dest_RK))
    return dest_RK, n_RP[:, :size]


def first_true(flags: Tensor, n: int) -> Tensor:
    """Flat indices of the first `n` True entries of `flags`, in order: `nonzero` without its
    host sync, since the caller already knows how many there are."""
    return torch.argsort((~flags.reshape(-1)).to(torch.int8), stable=True)[:n]


def route_pairs(ids_RK: Tensor, dest_RK: Tensor, hit_RP: Tensor, pairs: int) -> tuple[Tensor, Tensor, Tensor]:
    """(member_M, row_M, ids_MK): one pair per (row, member holding >= 1 of its experts), by member.

    `pairs` = hit_RP.sum() (known on the host from the count exchange). ids_MK keeps the row's
    expert ids that live on that member and masks the others with -1.
    """
    R = ids_RK.shape[0]
    flat_M = first_true(hit_RP.t(), pairs)
    member_M, row_M = flat_M // R, flat_M % R
    ids_MK = torch.where(dest_RK[row_M] == member_M[:, None], ids_RK[row_M], -1)
    return member_M, row_M, ids_MK


def build_hops(num_experts: int, topology, node_limited: bool, force_exchange: bool = False) -> list[Hop]:
    """The hops of one dispatch for this rank; hops over a group of one are left out unless
    `force_exchange` (a world of one driven through the all-to-all, as a device check)."""
    ep, G, N = topology.ep, topology.ep_intra_size, topology.ep_nodes
    e_loc = num_experts // ep
    rank_of_E = torch.arange(num_experts) // e_loc
    my_node, my_local = topology.ep_rank // G, topology.ep_rank % G
    if not node_limited or N == 1 or G == 1:
        hop = Hop(topology.group("ep"), ep, topology.ep_rank, rank_of_E, [j // G != my_node for j in range(ep)])
        return [hop] if ep > 1 or (force_exchange and hop.group is not None) else []
    inter = Hop(topology.group("ep_inter"), N, my_node, rank_of_E // G, [n != my_node for n in range(N)])
    intra = Hop(topology.group("ep_intra"), G, my_local, rank_of_E % G, [False] * G)
    return [inter, intra]


class AllToAllDispatcher:
    """The expert-parallel Dispatcher (protocol in model/experts.py); one instance per model."""

    def __init__(self, num_experts: int, topology, node_limited: bool = True, force_exchange: bool = False):
        if num_experts % topology.ep:
            raise ValueError(f"moe.num_experts = {num_experts}: must be divisible by parallel.ep ({topology.ep})")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // topology.ep
        self.expert_offset = topology.ep_rank * self.num_local_experts
        self.hops = build_hops(num_experts, topology, node_limited, force_exchange)
        self.stats = CommStats()

    # ---- contract
    def dispatch(self, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor):
        return self.dispatch_async(x_TD, topk_ids_TK, topk_weights_TK).wait()

    def combine(self, y_SD: Tensor, state: DispatchState) -> Tensor:
        return self.combine_async(y_SD, state).wait()

    def dispatch_async(self, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor) -> CommHandle:
        return CommHandle(self.dispatch_steps(x_TD, topk_ids_TK, topk_weights_TK))

    def combine_async(self, y_SD: Tensor, state: DispatchState) -> CommHandle:
        return CommHandle(self.combine_steps(y_SD, state))

    # ---- the steps; each `yield` is a point where an exchange is in flight
    def dispatch_steps(self, x_RD: Tensor, ids_RK: Tensor, w_RK: Tensor, finish=finish_exchange):
        """Step generator of `dispatch`; yields each exchange right after issuing it.

        One host sync per hop (the count exchange); the counts per local expert stay on the device."""
        ids_RK, w_RK = ids_RK.to(torch.int32), w_RK.float()
        K, D = ids_RK.shape[1], x_RD.shape[1]
        row_bytes = D * x_RD.element_size() + K * (w_RK.element_size() + ids_RK.element_size())
        trail, slots = [], ids_RK.numel()
        for hop in self.hops:
            dest_RK, n_RP = member_loads(ids_RK, hop.member_of_expert.to(ids_RK.device), hop.size)
            hit_RP = n_RP > 0
            sent, recv = exchange_counts(torch.stack([hit_RP.sum(0), n_RP.sum(0)], dim=1), hop.group)
            send_rows, recv_rows = [c[0] for c in sent], [c[0] for c in recv]
            slots = sum(c[1] for c in recv)        # (row, slot) pairs that arrive, if this is the last hop
            member_M, row_M, ids_MK = route_pairs(ids_RK, dest_RK, hit_RP, sum(send_rows))
            self.stats.add(send_rows, row_bytes, hop.cross, hop.me, rows=True)
            pending = PendingExchange([x_RD[row_M], w_RK[row_M], ids_MK], send_rows, recv_rows, hop.group)
            yield pending
            rows_before = x_RD.shape[0]
            x_RD, w_RK, ids_RK = finish(pending)
            trail.append(_HopTrail(hop, row_M, rows_before, send_rows, recv_rows))
        flat_S = first_true(ids_RK >= 0, slots)
        row_S, k_S = flat_S // K, flat_S % K
        local_S = ids_RK[row_S, k_S].long() - self.expert_offset
        torch._assert_async(((local_S >= 0) & (local_S < self.num_local_experts)).all(), "a row reached the wrong rank")
        order = torch.argsort(local_S, stable=True)
        row_S, k_S = row_S[order], k_S[order]
        # a scatter-add, not bincount: CUDA bincount reads the max id on the host
        counts_E = torch.zeros(self.num_local_experts, dtype=torch.int64, device=local_S.device)
        counts_E.index_add_(0, local_S, torch.ones_like(local_S))
        state = DispatchState(trail, row_S, k_S, w_RK, x_RD.shape[0])
        return x_RD[row_S], counts_E, state

    def combine_steps(self, y_SD: Tensor, state: DispatchState, finish=finish_exchange):
        """Step generator of `combine`; yields each exchange right after issuing it."""
        w_S = state.weights_RK[state.row_S, state.k_S].to(y_SD.dtype)
        y_RD = y_SD.new_zeros(state.rows, y_SD.shape[1]).index_add(0, state.row_S, y_SD * w_S[:, None])
        row_bytes = y_SD.shape[1] * y_SD.element_size()
        for t in reversed(state.trail):
            self.stats.add(t.recv_counts, row_bytes, t.hop.cross, t.hop.me, rows=False)
            pending = PendingExchange([y_RD], t.recv_counts, t.send_counts, t.hop.group)
            yield pending
            (y_MD,) = finish(pending)
            y_RD = y_MD.new_zeros(t.rows_before, y_MD.shape[1]).index_add(0, t.row_M, y_MD)
        return y_RD


# --------------------------------------------------------------------------- model surgery


def _moe_modules(model: nn.Module):
    from model.moe import MoE  # the model layer sits below parallel/: import is downward
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def _shard_experts(experts: nn.Module, num_experts: int, offset: int, n_local: int) -> None:
    """Keep rows [offset, offset + n_local) of every parameter stacked over all experts."""
    if getattr(experts, "num_experts", num_experts) == n_local and getattr(experts, "expert_offset", 0) == offset:
        return
    for pname, p in list(experts.named_parameters(recurse=False)):
        if p.shape[0] == num_experts:
            setattr(experts, pname, nn.Parameter(p.detach()[offset:offset + n_local].clone(),
                                                 requires_grad=p.requires_grad))
    experts.num_experts, experts.expert_offset = n_local, offset


def parallelize_experts(model: nn.Module, topology, node_limited: bool = True,
                        force_exchange: bool = False) -> AllToAllDispatcher:
    """Keep only this ep rank's experts in every MoE layer and install the all-to-all dispatcher.

    Parameter names are unchanged (`layers.3.moe.experts.w_gate` now holds rows
    [expert_offset, expert_offset + E_loc) of the full tensor), see `expert_shards`.
    """
    moes = _moe_modules(model)
    if not moes:
        raise ValueError("parallelize_experts: the model has no MoE layer (model.first_k_dense = num_layers?)")
    num_experts = moes[0][1].moe.num_experts
    dispatcher = AllToAllDispatcher(num_experts, topology, node_limited, force_exchange)
    for _, moe in moes:
        _shard_experts(moe.experts, num_experts, dispatcher.expert_offset, dispatcher.num_local_experts)
        moe.set_dispatcher(dispatcher)
    return dispatcher


def expert_shards(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{parameter name: (offset of local expert 0, global number of experts)} for expert params."""
    out = {}
    for name, moe in _moe_modules(model):
        n_global = moe.moe.num_experts
        offset = getattr(moe.experts, "expert_offset", 0)
        n_local = getattr(moe.experts, "num_experts", n_global)
        for pname, p in moe.experts.named_parameters(recurse=False):
            if p.shape[0] == n_local:
                out[f"{name}.experts.{pname}" if name else f"experts.{pname}"] = (offset, n_global)
    return out


def global_expert_counts(counts: Tensor, topology) -> Tensor:
    """Expert loads summed over the whole ep x dp world (the dp group), so every rank's bias update
    (bias += gamma * sign(mean - load)) is identical."""
    out = counts.detach().clone().float()
    if topology.size("dp") > 1:
        dist.all_reduce(out, group=topology.group("dp"))
    return out
