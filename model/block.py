"""One transformer block: h + MLA(RMSNorm(h)), then + FFN(RMSNorm(.)) (DeepSeek-V3 section 2.1).

The FFN is a dense SwiGLU for the first `first_k_dense` blocks and a DeepSeekMoE layer after.
The same class is used by the main model and by the MTP modules (DeepSeek-V3 section 2.2).

Steps for a pipeline that interleaves micro-batches (DeepSeek-V3 section 3.2.1): `attention`
returns the residual stream after attention and the FFN's input; an MoE block's FFN then runs
as the steps of `model.moe.MoE`; `forward` is `attention`, the FFN and the residual add.

Legend: B batch, L sequence, D hidden.
"""
from __future__ import annotations

from torch import Tensor, nn

from model.attention import MLA
from model.layers import RMSNorm, SwiGLU
from model.moe import MoE


class Block(nn.Module):
    def __init__(self, cfg, provider, dispatcher, *, layer: int, moe_index: int | None):
        super().__init__()
        m = cfg.model
        self.layer = layer
        self.attn_norm = RMSNorm(m.hidden_size, m.norm_eps)
        self.attn = MLA(provider, m.hidden_size, cfg.attention, eps=m.norm_eps, layer=layer)
        self.ffn_norm = RMSNorm(m.hidden_size, m.norm_eps)
        if moe_index is None:
            self.ffn = SwiGLU(provider, m.hidden_size, m.dense_ffn_size, kind="mlp", layer=layer)
        else:
            self.ffn = MoE(provider, dispatcher, m.hidden_size, cfg.moe, layer=layer, moe_index=moe_index)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(self, h_BLD: Tensor, ctx) -> Tensor:
        h_BLD, x_BLD = self.attention(h_BLD, ctx)
        return h_BLD + (self.ffn(x_BLD, ctx) if self.is_moe else self.ffn(x_BLD))

    def attention(self, h_BLD: Tensor, ctx) -> tuple[Tensor, Tensor]:
        """The attention step: h + MLA(RMSNorm(h)), and the FFN's input RMSNorm of that."""
        h_BLD = h_BLD + self.attn(self.attn_norm(h_BLD), ctx)
        return h_BLD, self.ffn_norm(h_BLD)
