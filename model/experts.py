"""Routed experts of DeepSeekMoE (DeepSeek-V3 section 2.1.2) and the dispatcher seam that feeds them.

Every routed expert is a SwiGLU FFN, y = (silu(x W_gate^T) * (x W_up^T)) W_down^T. `GroupedExperts`
holds the E experts of this rank as stacked weights and computes rows that arrive sorted by
expert, so each expert is one contiguous slice. Each of the three GEMMs is one grouped GEMM
(`torch._grouped_mm`) over all experts, driven by cumulative row offsets that stay on the
device: no host sync, no per-expert indexing of the stacked weights (whose backward would
build a zero tensor the size of the whole [E,F,D] weight per expert). On CUDA the grouped GEMM
runs in bf16 (the only dtype with a fused kernel; others fall back to a loop that copies the
offsets to the host), on CPU in the input's dtype. `expert_loop` is the plain per-expert loop,
kept as the reference the tests compare against.

A `Dispatcher` moves token copies to their experts and back: `dispatch` returns the rows sorted
by (local) expert with one count per local expert (a device tensor for both dispatchers; host
lists are accepted too), `combine` weights the expert outputs by their
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

from model.layers import swiglu_activation


class Dispatcher(Protocol):
    """Moves routed rows to the experts that hold them and back (single rank or all-to-all)."""

    num_experts: int          # experts of the whole model
    num_local_experts: int    # experts held by this rank
    expert_offset: int        # global index of local expert 0

    def dispatch(self, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor) -> tuple[Tensor, Tensor | list[int], Any]:
        """Rows [S', D] sorted by local expert, their per-expert counts, and the state for `combine`."""

    def combine(self, y_SD: Tensor, state: Any) -> Tensor:
        """Gate-weighted sum of the expert outputs back onto the T tokens: [T, D]."""


def grouped_dtype(x: Tensor) -> torch.dtype:
    """Dtype of the grouped GEMMs: bf16 on CUDA (the fused kernel's dtype), else x's own."""
    return torch.bfloat16 if x.device.type == "cuda" else x.dtype


def check_alignment(hidden: int, ffn: int, dtype: torch.dtype) -> None:
    """Grouped GEMMs need 16-byte aligned rows: D and F multiples of 16 / element size."""
    multiple = 128 // torch.finfo(dtype).bits
    if hidden % multiple or ffn % multiple:
        raise ValueError(f"grouped expert GEMMs in {dtype} need model.hidden_size ({hidden}) and "
                         f"moe.expert_ffn_size ({ffn}) divisible by {multiple}; round them up")


def grouped_mm(x_SK: Tensor, w_ENK: Tensor, offsets_E: Tensor) -> Tensor:
    """Rows of expert e (x_SK[offsets[e-1]:offsets[e]]) times w_ENK[e].T, all experts in one call.

    `offsets_E` are the cumulative row counts (int32, on x's device). Rows past the last offset
    are not computed (callers pass exactly sum(counts) rows). Under torch.compile only bf16 can be
    traced (the op's shape function accepts no other dtype): an fp32 (CPU) grouped GEMM runs
    eagerly between two graphs."""
    if x_SK.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return _eager_grouped_mm(x_SK, w_ENK, offsets_E)
    return torch._grouped_mm(x_SK, w_ENK.transpose(-2, -1), offs=offsets_E)


@torch._disable_dynamo  # torch.compiler.disable, importing dynamo (~1 s) only when first called
def _eager_grouped_mm(x_SK: Tensor, w_ENK: Tensor, offsets_E: Tensor) -> Tensor:
    return torch._grouped_mm(x_SK, w_ENK.transpose(-2, -1), offs=offsets_E)


def expert_loop(x_SD: Tensor, counts: list[int], w_gate_EFD: Tensor, w_up_EFD: Tensor,
                w_down_EDF: Tensor) -> Tensor:
    """Reference: one SwiGLU per expert over its contiguous slice (a loop over experts)."""
    assert sum(counts) == x_SD.shape[0], (sum(counts), x_SD.shape)
    outs, start = [], 0
    for e, n in enumerate(counts):
        # empty slices still run so that every expert gets a (zero) gradient
        x = x_SD[start:start + n]
        h = F.silu(x @ w_gate_EFD[e].t()) * (x @ w_up_EFD[e].t())
        outs.append(h @ w_down_EDF[e].t())
        start += n
    return torch.cat(outs, dim=0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense: the grouped GEMM's backward
    rejects the stride-0 gradient that e.g. `.sum()` hands back."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return dy.contiguous()


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights w_gate/w_up [E,F,D] and w_down [E,D,F].

    `expert_offset` is the global index of local expert 0 (non-zero under expert parallelism);
    the seeded init uses it so that a sharded expert gets the same weights as in the full model.
    """

    recompute_activation = False      # set from outside by a recomputation policy

    def __init__(self, num_experts: int, hidden: int, ffn: int, *, layer: int, expert_offset: int = 0):
        super().__init__()
        self.num_experts, self.hidden, self.ffn, self.layer = num_experts, hidden, ffn, layer
        self.expert_offset = expert_offset
        self.w_gate = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, ffn))

    def forward(self, x_SD: Tensor, counts: Tensor | list[int]) -> Tensor:
        """Routed outputs [S, D] of rows sorted by expert; counts [E] on the device or a host list."""
        counts_E = self._counts_tensor(counts, x_SD.device)
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        dtype = grouped_dtype(x_SD)
        check_alignment(self.hidden, self.ffn, dtype)
        x = x_SD.to(dtype)
        h = swiglu_activation(grouped_mm(x, self.w_gate.to(dtype), offsets_E),
                              grouped_mm(x, self.w_up.to(dtype), offsets_E), self.recompute_activation)
        return _ContiguousGrad.apply(grouped_mm(h, self.w_down.to(dtype), offsets_E))

    def reference_forward(self, x_SD: Tensor, counts: Tensor | list[int]) -> Tensor:
        """The plain per-expert loop (host counts); the grouped path must match it."""
        counts = [int(c) for c in counts]
        if len(counts) != self.num_experts:
            raise ValueError(f"GroupedExperts got {len(counts)} counts for {self.num_experts} experts")
        return expert_loop(x_SD, counts, self.w_gate, self.w_up, self.w_down)

    def _counts_tensor(self, counts: Tensor | list[int], device) -> Tensor:
        if len(counts) != self.num_experts:
            raise ValueError(f"GroupedExperts got {len(counts)} counts for {self.num_experts} experts")
        if isinstance(counts, Tensor):
            return counts
        return torch.tensor(counts, dtype=torch.int64).to(device, non_blocking=True)

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
        # a scatter-add, not bincount: CUDA bincount reads the max id on the host
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=flat_ids_S.device)
        counts_E.index_add_(0, flat_ids_S, torch.ones_like(flat_ids_S))
        state = (order_S, token_S, topk_weights_TK, T)
        return x_TD[token_S], counts_E, state

    def combine(self, y_SD: Tensor, state) -> Tensor:
        order_S, token_S, weights_TK, T = state
        w_S = weights_TK.reshape(-1)[order_S].to(y_SD.dtype)
        # in place into a fresh zero tensor: the out-of-place form would copy the [T, D] zeros once more
        return y_SD.new_zeros(T, y_SD.shape[-1]).index_add_(0, token_S, y_SD * w_S[:, None])
