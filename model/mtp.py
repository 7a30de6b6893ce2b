"""Multi-token prediction modules (DeepSeek-V3 section 2.2, eq. 21-25).

Depth k (1..D) keeps the causal chain: for position i it combines the previous depth's hidden
state h^{k-1}_i (depth 0 = the main model's last block output, before the final norm) with the
embedding of token i+k: h'_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))] (M_k: 2D -> D),
runs one transformer block, then a final RMSNorm and the output head shared with the main
model predict token i+k+1. Embedding and head are shared (not owned here). As in the released
DeepSeek-V3 (its layer 61), the block's FFN is MoE when the main model has MoE layers.
The loss is lambda * mean over depths of the cross-entropies; targets that leave the
document are masked (`model.batch.mtp_labels`).

Legend: B batch, L sequence, D hidden.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from model.block import Block
from model.layers import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg, provider, dispatcher, *, layer: int, moe_index: int | None):
        super().__init__()
        m = cfg.model
        self.hnorm = RMSNorm(m.hidden_size, m.norm_eps)
        self.enorm = RMSNorm(m.hidden_size, m.norm_eps)
        self.proj = provider.linear(2 * m.hidden_size, m.hidden_size, kind="mtp_proj", layer=layer)
        self.block = Block(cfg, provider, dispatcher, layer=layer, moe_index=moe_index)
        self.norm = RMSNorm(m.hidden_size, m.norm_eps)

    def forward(self, h_prev_BLD: Tensor, emb_BLD: Tensor, ctx) -> Tensor:
        """Next depth's hidden state h^k [B,L,D] (before this module's final norm)."""
        x = self.proj(torch.cat([self.hnorm(h_prev_BLD), self.enorm(emb_BLD)], dim=-1))
        return self.block(x, ctx)


def shift_tokens(tokens_BL: Tensor, k: int, fill: int = 0) -> Tensor:
    """tokens[:, i+k] at column i; columns past the row end get `fill` (their targets are masked)."""
    out = torch.full_like(tokens_BL, fill)
    if k < tokens_BL.shape[1]:
        out[:, :tokens_BL.shape[1] - k] = tokens_BL[:, k:]
    return out
