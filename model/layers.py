"""Small building blocks: RMSNorm, rotary position embedding, the dense SwiGLU FFN.

- RMSNorm (Zhang & Sennrich 2019), computed in fp32 and cast back, as in DeepSeek-V3.
- RoPE (Su et al. 2021) on interleaved pairs of dimensions: pair (2i, 2i+1) is rotated by
  angle position * theta^(-2i/R). DeepSeek-V2 section 2.1.3 applies it only to the decoupled
  rope parts of Q and K. Tables are non-persistent buffers indexed by per-document positions.
- YaRN (Peng et al. 2023, arXiv 2309.00071, section 3; DeepSeek-V3 section 4.3) extends the
  context by a factor s: pair i turns r_i = L0 / (2 pi theta^(2i/R)) times over the original
  context L0. Pairs with r_i > beta_fast keep their frequency, pairs with r_i < beta_slow are
  divided by s, and a linear ramp over the pair index blends the two in between (the pair
  indices where r_i = beta_fast / beta_slow, floored / ceiled, as DeepSeek's release does). The
  tables carry amplitude mscale(s, mscale) / mscale(s, mscale_all_dim); the rest of the
  attention temperature goes into the softmax scale (`AttentionConfig.softmax_scale`).
- SwiGLU FFN (Shazeer 2020): w_down(silu(w_gate x) * w_up x), used for the dense layers and
  for the shared experts (DeepSeek-V3 section 2.1.2).

Legend: B batch, L sequence, H heads, R rope dims, D hidden, F FFN size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.config import yarn_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight in fp32: PyTorch's fused kernel (one op forward and
        # backward, only the inverse rms saved), bit-identical on CPU to the composite formula
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def yarn_pair_index(rotations: float, rope_dim: int, theta: float, original_len: int) -> float:
    """The (fractional) pair index i at which pair i turns `rotations` times over original_len."""
    return rope_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_ramp(rope_dim: int, theta: float, yarn: dict) -> Tensor:
    """[R/2] share of each pair's frequency that is interpolated (divided by s): 0 keeps it, 1 divides."""
    L0 = yarn["original_max_position_embeddings"]
    low = max(math.floor(yarn_pair_index(yarn["beta_fast"], rope_dim, theta, L0)), 0)
    high = min(math.ceil(yarn_pair_index(yarn["beta_slow"], rope_dim, theta, L0)), rope_dim - 1)
    high = high if high > low else low + 0.001
    return ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)


def rope_frequencies(rope_dim: int, theta: float, yarn: dict | None = None) -> Tensor:
    """Angular frequency [R/2] of each pair: theta^(-2i/R), blended towards theta^(-2i/R) / s by YaRN."""
    inv_freq = theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    if not yarn:
        return inv_freq
    ramp = yarn_ramp(rope_dim, theta, yarn)
    return inv_freq * (1 - ramp) + inv_freq / yarn["factor"] * ramp


def rope_tables(rope_dim: int, max_len: int, theta: float, device=None,
                yarn: dict | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin tables [max_len, R/2] for positions 0..max_len-1 (`yarn`: AttentionConfig.yarn)."""
    inv_freq = rope_frequencies(rope_dim, theta, yarn).to(device)
    angles = torch.arange(max_len, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    amplitude = 1.0
    if yarn:
        amplitude = yarn_mscale(yarn["factor"], yarn["mscale"]) / yarn_mscale(yarn["factor"], yarn["mscale_all_dim"])
    return angles.cos() * amplitude, angles.sin() * amplitude


def apply_rope(x_BLHR: Tensor, cos_BLr: Tensor, sin_BLr: Tensor) -> Tensor:
    """Rotate interleaved pairs of the last dim of x [B,L,H,R] by per-token angles [B,L,R/2]."""
    # out[2i] = x[2i] cos_i + x[2i+1] (-sin_i), out[2i+1] = x[2i+1] cos_i + x[2i] sin_i: one
    # pair swap and two products with tables widened to R (bit-equal to the pairwise formula)
    xf = x_BLHR.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    cos_BLR = cos_BLr.repeat_interleave(2, dim=-1)[:, :, None, :]
    sin_BLR = torch.stack((-sin_BLr, sin_BLr), dim=-1).flatten(-2)[:, :, None, :]
    return (xf * cos_BLR + swapped * sin_BLR).to(x_BLHR.dtype)


def _silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def swiglu_activation(gate: Tensor, up: Tensor, recompute: bool = False) -> Tensor:
    """silu(gate) * up; with `recompute`, its inner activations are recomputed in backward
    (only gate and up are kept, DeepSeek-V3 section 3.2.3)."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(_silu_mul, gate, up, use_reentrant=False)
    return _silu_mul(gate, up)


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN built from three provider Linears. `recompute_activation` is set from
    outside by a recomputation policy."""

    recompute_activation = False

    def __init__(self, provider, hidden: int, ffn: int, *, kind: str, layer: int | None):
        super().__init__()
        self.w_gate = provider.linear(hidden, ffn, kind=kind, layer=layer)
        self.w_up = provider.linear(hidden, ffn, kind=kind, layer=layer)
        self.w_down = provider.linear(ffn, hidden, kind=kind, layer=layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(swiglu_activation(self.w_gate(x), self.w_up(x), self.recompute_activation))
