"""Small building blocks: RMSNorm, rotary position embedding, the dense SwiGLU FFN.

- RMSNorm (Zhang & Sennrich 2019), computed in fp32 and cast back, as in DeepSeek-V3.
- RoPE (Su et al. 2021) on interleaved pairs of dimensions: pair (2i, 2i+1) is rotated by
  angle position * theta^(-2i/R). DeepSeek-V2 section 2.1.3 applies it only to the decoupled
  rope parts of Q and K. Tables are non-persistent buffers indexed by per-document positions.
- SwiGLU FFN (Shazeer 2020): w_down(silu(w_gate x) * w_up x), used for the dense layers and
  for the shared experts (DeepSeek-V3 section 2.1.2).

Legend: B batch, L sequence, H heads, R rope dims, D hidden, F FFN size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_tables(rope_dim: int, max_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin tables [max_len, R/2] for positions 0..max_len-1."""
    inv_freq = theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim)
    angles = torch.arange(max_len, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x_BLHR: Tensor, cos_BLr: Tensor, sin_BLr: Tensor) -> Tensor:
    """Rotate interleaved pairs of the last dim of x [B,L,H,R] by per-token angles [B,L,R/2]."""
    xf = x_BLHR.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos_BLr[:, :, None, :], sin_BLr[:, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x_BLHR.dtype)


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN built from three provider Linears."""

    def __init__(self, provider, hidden: int, ffn: int, *, kind: str, layer: int | None):
        super().__init__()
        self.w_gate = provider.linear(hidden, ffn, kind=kind, layer=layer)
        self.w_up = provider.linear(hidden, ffn, kind=kind, layer=layer)
        self.w_down = provider.linear(ffn, hidden, kind=kind, layer=layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
