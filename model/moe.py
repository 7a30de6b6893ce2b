"""DeepSeekMoE layer: shared experts + fine-grained routed experts (DeepSeek-V3 section 2.1.2).

h' = u + sum_shared FFN_s(u) + sum_{i in topK} g_i FFN_i(u). The shared experts are fused into
one SwiGLU of size num_shared_experts * expert_ffn_size. Routed experts run through two seams:
a Dispatcher moves token copies to their experts (sorted, one contiguous slice per local
expert) and back, and the provider's GroupedExperts computes them. `LocalDispatcher` is the
single-rank dispatcher (`model/experts.py`); the expert-parallel all-to-all dispatcher lives
in `parallel/`. The layer also records expert
loads and the sequence-wise balance loss into the forward context.

Legend: B batch, L sequence, D hidden, T = B*L tokens, K experts per token, E experts, S = T*K rows.
"""
from __future__ import annotations

from torch import Tensor, nn

from model.layers import SwiGLU
from model.router import Router, expert_counts, seq_balance_loss


class MoE(nn.Module):
    """Shared + routed experts of one layer. `moe_index` is the layer's row in expert-count tensors."""

    def __init__(self, provider, dispatcher, hidden: int, moe, *, layer: int, moe_index: int):
        super().__init__()
        self.moe, self.layer, self.moe_index = moe, layer, moe_index
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

    def forward(self, x_BLD: Tensor, ctx) -> Tensor:
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        ids_TK, weights_TK, scores_TE = self.router(x_TD)
        x_SD, counts, state = self.dispatcher.dispatch(x_TD, ids_TK, weights_TK)
        y_TD = self.dispatcher.combine(self.experts(x_SD, counts), state).to(x_BLD.dtype)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        self._record(ctx, ids_TK, scores_TE, B, L)
        return y_TD.view(B, L, D)

    def _record(self, ctx, ids_TK: Tensor, scores_TE: Tensor, B: int, L: int) -> None:
        valid_T = ctx.valid.reshape(-1)
        ctx.expert_counts[self.moe_index] += expert_counts(ids_TK.detach(), self.moe.num_experts, valid_T)
        if self.moe.seq_aux_loss_alpha > 0:
            ctx.balance_losses.append(seq_balance_loss(
                scores_TE.view(B, L, -1), ids_TK.view(B, L, -1), ctx.valid, self.moe.seq_aux_loss_alpha))
