"""DeepSeekMoE layer: shared experts + fine-grained routed experts (DeepSeek-V3 section 2.1.2).

h' = u + sum_shared FFN_s(u) + sum_{i in topK} g_i FFN_i(u). The shared experts are fused into
one SwiGLU of size num_shared_experts * expert_ffn_size. Routed experts run through two seams:
a Dispatcher moves token copies to their experts (sorted, one contiguous slice per local
expert) and back, and the provider's GroupedExperts computes them. `LocalDispatcher` is the
single-rank dispatcher (`model/experts.py`); the expert-parallel all-to-all dispatcher lives
in `parallel/`. The layer also records expert loads and the sequence-wise balance loss into
the forward context.

The layer hands out its steps so that a pipeline can interleave two micro-batches (DeepSeek-V3
section 3.2.1, Figure 4: attention, dispatch, MLP, combine): `route` (the router, the end of the
attention step), the dispatcher's `dispatch`, `expert_mlp` and `shared_mlp` (the MLP step), the
dispatcher's `combine`, then `output`; `record` does the bookkeeping. `forward` runs them in
sequence.

Legend: B batch, L sequence, D hidden, T = B*L tokens, K experts per token, E experts, S = T*K rows.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from model.layers import SwiGLU
from model.router import Router, expert_counts, seq_balance_loss


@dataclass
class Routing:
    """The router's choice for the tokens of one micro-batch (what the dispatch step consumes)."""

    x_TD: Tensor          # the FFN input, one row per token
    ids_TK: Tensor        # chosen experts
    weights_TK: Tensor    # their gates
    scores_TE: Tensor     # affinities (for the balance loss)
    shape: tuple          # (B, L, D) of the FFN input
    dtype: object         # dtype of the FFN input (the layer's output dtype)


class MoE(nn.Module):
    """Shared + routed experts of one layer. `moe_index` is the layer's row in expert-count tensors."""

    def __init__(self, provider, dispatcher, hidden: int, moe, *, layer: int, moe_index: int):
        super().__init__()
        self.moe, self.layer, self.moe_index = moe, layer, moe_index
        self.seq_aux_loss_alpha = moe.seq_aux_loss_alpha  # scheduled: DeepSeekV3.set_loss_weights
        self.router = Router(provider, hidden, moe, layer=layer)
        n_local = getattr(dispatcher, "num_local_experts", moe.num_experts)
        self.experts = provider.grouped_experts(n_local, hidden, moe.expert_ffn_size, layer=layer)
        self.experts.expert_offset = getattr(dispatcher, "expert_offset", 0)
        self.shared = None
        if moe.num_shared_experts > 0:
            self.shared = SwiGLU(provider, hidden, moe.num_shared_experts * moe.expert_ffn_size,
                                 kind="shared_expert", layer=layer)
        self._dispatcher = [dispatcher]  # a list: keeps a dispatcher that is an nn.Module out of the tree

    @property
    def dispatcher(self):
        return self._dispatcher[0]

    def set_dispatcher(self, dispatcher) -> None:
        """Install another dispatcher (e.g. the expert-parallel one once the experts are sharded)."""
        self._dispatcher[0] = dispatcher

    def forward(self, x_BLD: Tensor, ctx) -> Tensor:
        r = self.route(x_BLD)
        x_SD, counts, state = self.dispatcher.dispatch(r.x_TD, r.ids_TK, r.weights_TK)
        y_TD = self.dispatcher.combine(self.expert_mlp(x_SD, counts), state)
        out = self.output(y_TD, self.shared_mlp(r.x_TD), r)
        self.record(ctx, r)
        return out

    def route(self, x_BLD: Tensor) -> Routing:
        """The router's top-K experts and gates for every token."""
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        ids_TK, weights_TK, scores_TE = self.router(x_TD)
        return Routing(x_TD, ids_TK, weights_TK, scores_TE, (B, L, D), x_BLD.dtype)

    def expert_mlp(self, x_SD: Tensor, counts: list[int]) -> Tensor:
        """The routed experts on the dispatched rows (sorted by local expert)."""
        return self.experts(x_SD, counts)

    def shared_mlp(self, x_TD: Tensor) -> Tensor | None:
        """The shared experts on every token (None without shared experts)."""
        return self.shared(x_TD) if self.shared is not None else None

    def output(self, y_TD: Tensor, shared_TD: Tensor | None, r: Routing) -> Tensor:
        """Combined routed outputs plus the shared experts', in the FFN input's shape and dtype."""
        y_TD = y_TD.to(r.dtype)
        if shared_TD is not None:
            y_TD = y_TD + shared_TD
        return y_TD.view(r.shape)

    def record(self, ctx, r: Routing) -> None:
        """Expert loads and the sequence-wise balance loss of this layer, into the context."""
        B, L, _ = r.shape
        valid_T = ctx.valid.reshape(-1)
        ctx.expert_counts[self.moe_index] += expert_counts(r.ids_TK.detach(), self.moe.num_experts, valid_T)
        if self.seq_aux_loss_alpha > 0:
            ctx.balance_losses.append(seq_balance_loss(
                r.scores_TE.view(B, L, -1), r.ids_TK.view(B, L, -1), ctx.valid, self.seq_aux_loss_alpha))
