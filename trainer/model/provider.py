"""Layer provider seam: the one place the model gets its Linear and grouped-expert modules.

Megatron keeps Transformer Engine behind a "spec provider" that hands out layer classes; we do
the same with a tiny object. The model asks for every bias-free Linear by `kind` and `layer`
(so an FP8 provider can keep e.g. the router and output head in high precision, DeepSeek-V3
section 3.3.1) and for one `GroupedExperts` per MoE layer. The default provider below is plain
PyTorch and runs on CPU and CUDA.

GroupedExperts computes DeepSeekMoE's routed experts (DeepSeek-V3 section 2.1.2): every expert
is a SwiGLU FFN, y = (silu(x W_gate^T) * (x W_up^T)) W_down^T. Its input rows are already sorted
by expert, so each expert is one contiguous slice: a loop over experts, never over tokens.

Legend: E experts (local to this rank), F expert FFN size, D hidden size, S routed rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LINEAR_KINDS = ("attention", "mlp", "shared_expert", "router", "output_head", "mtp_proj")


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


class LayerProvider:
    """Hands out the model's Linear and GroupedExperts modules; subclass to change precision."""

    def linear(self, in_features: int, out_features: int, *, kind: str, layer: int | None) -> nn.Module:
        """A bias-free Linear, y = x @ weight.T with weight [out, in]."""
        if kind not in LINEAR_KINDS:
            raise ValueError(f"linear kind = {kind!r}: must be one of {', '.join(LINEAR_KINDS)}")
        return nn.Linear(in_features, out_features, bias=False)

    def grouped_experts(self, num_experts: int, hidden: int, ffn: int, *, layer: int) -> nn.Module:
        return GroupedExperts(num_experts, hidden, ffn, layer=layer)
