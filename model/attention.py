"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1.1).

Queries: c_Q = RMSNorm(W_DQ h) (rank q_lora_rank), then W_UQ c_Q gives per head a "nope" part
(qk_nope_head_dim) and a rope part (qk_rope_head_dim) that gets RoPE; with q_lora_rank = 0 the
query is projected directly from h (DeepSeek-V2-Lite). Keys/values: one joint down-projection
gives the latent c_KV (kv_lora_rank) plus one rope key k_R (qk_rope_head_dim) shared by all
heads; c_KV is RMS-normed and up-projected to per-head k_nope and v. Only c_KV and k_R would be
cached at inference: kv_lora_rank + qk_rope_head_dim numbers per token (`cache_dim`).
Scores use softmax scale 1/sqrt(qk_nope + qk_rope), causal and same-document masking: through
flex_attention and the context's BlockMask on CUDA (q/k head dim N+R, v head dim V), or through
scaled_dot_product_attention and the dense additive mask on CPU (see `model.context`), with v
zero-padded to N+R so that SDPA can take its flash kernel (`dense_attention`).

Legend: B batch, L sequence, D hidden, H heads, N nope dims, R rope dims, V value dims,
C kv_lora_rank.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.layers import RMSNorm, apply_rope


def flex_attention(device: torch.device):
    """flex_attention for tensors on `device`: compiled on CUDA (eager flex is a slow reference),
    eager elsewhere. Chosen by the tensors' device, not by whether a GPU exists: the compiled CPU
    kernel is not the path the dense CPU route was checked against (it gave wrong numbers with
    two threads in a trial)."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    if device.type == "cuda":
        return _compiled_flex(flex)
    return flex


@functools.cache
def _compiled_flex(flex):
    return torch.compile(flex, dynamic=False)


def dense_attention(q_BHLK: Tensor, k_BHLK: Tensor, v_BHLV: Tensor, mask: Tensor, scale: float) -> Tensor:
    """scaled_dot_product_attention under the dense mask [B,1,L,L] (`model.context`), [B,H,L,V].

    SDPA's flash kernel (on CPU: blocked, online softmax, only the log-sum-exp kept for
    backward) needs equal q/k and v head dims; MLA's differ (N+R vs V). The narrower side is
    zero-padded: zero value columns give zero output columns, which are dropped, and zero q/k
    columns add nothing to the scores (the scale is explicit), so the result is the same
    attention up to rounding, without the L x L probabilities the math path would save."""
    K, V = q_BHLK.shape[-1], v_BHLV.shape[-1]
    if V < K:
        v_BHLV = F.pad(v_BHLV, (0, K - V))
    elif K < V:
        q_BHLK, k_BHLK = F.pad(q_BHLK, (0, V - K)), F.pad(k_BHLK, (0, V - K))
    if mask.is_floating_point():
        mask = mask.to(q_BHLK.dtype)    # SDPA wants an additive mask in the query's dtype
    out = F.scaled_dot_product_attention(q_BHLK, k_BHLK, v_BHLV, attn_mask=mask, scale=scale)
    return out[..., :V]


class MLA(nn.Module):
    def __init__(self, provider, hidden: int, att, *, eps: float, layer: int):
        super().__init__()
        self.H, self.N, self.R, self.V = att.num_heads, att.qk_nope_head_dim, att.qk_rope_head_dim, att.v_head_dim
        self.C = att.kv_lora_rank
        self.scale = att.softmax_scale  # 1/sqrt(N + R), YaRN-corrected when the context is extended
        lin = lambda i, o: provider.linear(i, o, kind="attention", layer=layer)  # noqa: E731
        q_out = self.H * (self.N + self.R)
        if att.q_lora_rank > 0:
            self.wq_a = lin(hidden, att.q_lora_rank)
            self.q_norm = RMSNorm(att.q_lora_rank, eps)
            self.wq_b = lin(att.q_lora_rank, q_out)
        else:
            self.wq = lin(hidden, q_out)
        self.wkv_a = lin(hidden, self.C + self.R)
        self.kv_norm = RMSNorm(self.C, eps)
        self.wkv_b = lin(self.C, self.H * (self.N + self.V))
        self.wo = lin(self.H * self.V, hidden)

    @property
    def cache_dim(self) -> int:
        """Numbers per token an inference KV cache holds: latent c_KV plus the shared rope key."""
        return self.C + self.R

    def compress_kv(self, x_BLD: Tensor, ctx) -> tuple[Tensor, Tensor]:
        """The cacheable part: normed latent c_KV [B,L,C] and RoPE'd shared key k_R [B,L,R]."""
        kv = self.wkv_a(x_BLD)
        c_kv, k_rope = kv.split([self.C, self.R], dim=-1)
        k_rope = apply_rope(k_rope[:, :, None, :], ctx.cos, ctx.sin)[:, :, 0]
        return self.kv_norm(c_kv), k_rope

    def queries(self, x_BLD: Tensor, ctx) -> Tensor:
        """Per-head queries [B,L,H,N+R] with RoPE applied to the rope part."""
        B, L, _ = x_BLD.shape
        q = self.wq_b(self.q_norm(self.wq_a(x_BLD))) if hasattr(self, "wq_a") else self.wq(x_BLD)
        q_nope, q_rope = q.view(B, L, self.H, self.N + self.R).split([self.N, self.R], dim=-1)
        return torch.cat([q_nope, apply_rope(q_rope, ctx.cos, ctx.sin)], dim=-1)

    def forward(self, x_BLD: Tensor, ctx) -> Tensor:
        B, L, _ = x_BLD.shape
        q_BLHK = self.queries(x_BLD, ctx)
        c_kv, k_rope_BLR = self.compress_kv(x_BLD, ctx)
        k_nope, v_BLHV = self.wkv_b(c_kv).view(B, L, self.H, self.N + self.V).split([self.N, self.V], dim=-1)
        k_BLHK = torch.cat([k_nope, k_rope_BLR[:, :, None, :].expand(B, L, self.H, self.R)], dim=-1)
        q, k, v = q_BLHK.transpose(1, 2), k_BLHK.transpose(1, 2), v_BLHV.transpose(1, 2)
        if ctx.block_mask is not None:
            out = flex_attention(q.device)(q, k, v, block_mask=ctx.block_mask, scale=self.scale)
        else:
            out = dense_attention(q, k, v, ctx.mask, self.scale)
        return self.wo(out.transpose(1, 2).reshape(B, L, self.H * self.V))
