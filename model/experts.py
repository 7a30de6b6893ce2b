"""Routed experts of DeepSeekMoE (DeepSeek-V3 section 2.1.2) and the dispatcher seam that feeds them.

Every routed expert is a SwiGLU FFN, y = (silu(x W_gate^T) * (x W_up^T)) W_down^T. `GroupedExperts`
holds the E experts of this rank as stacked weights and computes rows that arrive sorted by
expert, so each expert is one contiguous slice: a loop over experts, never over tokens.

A `Dispatcher` moves token copies to their experts and back: `dispatch` returns the rows sorted
by (local) expert with one count per local expert, `combine` weights the expert outputs by their
gates and sums them back per token. `LocalDispatcher` is the single-rank one (a stable sort of the
(token, slot) pairs by expert, nothing dropped); the expert-parallel all-to-all dispatcher lives in
`parallel/expert.py` and follows the same protocol.

Legend: E experts (local to this rank), F expert FFN size, D hidden size, T tokens, K experts per
token, S = T*K routed rows.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Dispatcher(Protocol):
    """Moves routed rows to the experts that hold them and back (single rank or all-to-all)."""

    num_experts: int          # experts of the whole model
    num_local_experts: int    # experts held by this rank
    expert_offset: int        # global index of local expert 0

    def dispatch(self, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor) -> tuple[Tensor, list[int], Any]:
        """Rows [S', D] sorted by local expert, their per-expert counts, and the state for `combine`."""

    def combine(self, y_SD: Tensor, state: Any) -> Tensor:
        """Gate-weighted sum of the expert outputs back onto the T tokens: [T, D]."""


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights w_gate/w_up [E,F,D] and w_down [E,D,F].

    `expert_offset` is the global index of local expert 0 (non-zero under expert parallelism);
    the seeded init uses it so that a sharded expert gets the same weights as in the full model.
    """

    def __init__(self, num_experts: int, hidden: int, ffn: int, *, layer: int, expert_offset: int = 0):
        super().__init__()
        self.num_experts, self.hidden, self.ffn, self.layer = num_experts, hidden, ffn, layer
        self.expert_offset = expert_offset
        self.w_gate = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, ffn))

    def forward(self, x_SD: Tensor, counts: list[int]) -> Tensor:
        if len(counts) != self.num_experts:
            raise ValueError(f"GroupedExperts got {len(counts)} counts for {self.num_experts} experts")
        assert sum(counts) == x_SD.shape[0], (sum(counts), x_SD.shape)
        outs, start = [], 0
        for e, n in enumerate(counts):
            # empty slices still run so that every expert gets a (zero) gradient
            x = x_SD[start:start + n]
            h = F.silu(x @ self.w_gate[e].t()) * (x @ self.w_up[e].t())
            outs.append(h @ self.w_down[e].t())
            start += n
        return torch.cat(outs, dim=0)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden}, ffn={self.ffn}, offset={self.expert_offset}"


class LocalDispatcher:
    """Dispatcher for one rank holding all experts: a permutation, gradients flow to x and weights."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts
        self.expert_offset = 0

    def dispatch(self, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor):
        T, K = topk_ids_TK.shape
        flat_ids_S = topk_ids_TK.reshape(-1)
        order_S = torch.argsort(flat_ids_S, stable=True)
        token_S = order_S // K
        counts = torch.bincount(flat_ids_S, minlength=self.num_experts).tolist()
        state = (order_S, token_S, topk_weights_TK, T)
        return x_TD[token_S], counts, state

    def combine(self, y_SD: Tensor, state) -> Tensor:
        order_S, token_S, weights_TK, T = state
        w_S = weights_TK.reshape(-1)[order_S].to(y_SD.dtype)
        out = y_SD.new_zeros(T, y_SD.shape[-1])
        return out.index_add(0, token_S, y_SD * w_S[:, None])
