"""Layer provider seam: the one place the model gets its Linear and grouped-expert modules.

Megatron keeps Transformer Engine behind a "spec provider" that hands out layer classes; we do
the same with a tiny object. The model asks for every bias-free Linear by `kind` and `layer`
(so an FP8 provider can keep e.g. the router and output head in high precision, DeepSeek-V3
section 3.3.1) and for one `GroupedExperts` per MoE layer. The default provider below is plain
PyTorch and runs on CPU and CUDA.

`GroupedExperts` (the routed experts) lives in `model/experts.py`.
"""
from __future__ import annotations

from torch import nn

from model.experts import GroupedExperts

LINEAR_KINDS = ("attention", "mlp", "shared_expert", "router", "output_head", "mtp_proj")


def check_linear_kind(kind: str) -> None:
    """Raise for a Linear kind the model does not ask for (every provider checks with this)."""
    if kind not in LINEAR_KINDS:
        raise ValueError(f"linear kind = {kind!r}: must be one of {', '.join(LINEAR_KINDS)}")


class LayerProvider:
    """Hands out the model's Linear and GroupedExperts modules; subclass to change precision."""

    def linear(self, in_features: int, out_features: int, *, kind: str, layer: int | None) -> nn.Module:
        """A bias-free Linear, y = x @ weight.T with weight [out, in]."""
        check_linear_kind(kind)
        return nn.Linear(in_features, out_features, bias=False)

    def grouped_experts(self, num_experts: int, hidden: int, ffn: int, *, layer: int) -> nn.Module:
        return GroupedExperts(num_experts, hidden, ffn, layer=layer)
