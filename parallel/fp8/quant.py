"""Fine-grained FP8 quantization and a model of the tensor cores' limited-precision accumulation.

DeepSeek-V3 (arXiv 2412.19437) section 3.3.2:
- Fine-grained quantization: one scale per 1x128 tile of an activation/gradient row and per
  128x128 block of a weight, derived from the tile's online max |x| so that it maps to the
  largest E4M3 value (448). `quantize` does this for any tile shape (rows x cols), padding the
  ragged edge with zeros (which never change a max).
- Increasing accumulation precision: on H800 the FP8 MMA keeps only ~14 significant bits in its
  accumulator; partial sums are copied to FP32 registers every N_C = 128 elements of K.
  `accumulate_gemm` reproduces this: chunks of K = 32 (one Hopper FP8 MMA) are added into an
  accumulator whose mantissa is truncated to `mantissa_bits`, and the accumulator is flushed into
  an exact FP32 sum every `promote_every` elements (0 = never flushed).

Numerics chosen here (each one tested in tests/unit/test_fp8_quant.py):
- values beyond the format's max saturate to +-max (the cast alone would turn E5M2 overflow into inf);
- a tile whose max is 0 gets scale 1 (its data is exactly zero);
- NaN anywhere in a tile makes the tile's scale NaN, so the whole dequantized tile is NaN (the
  hardware amax behaves the same): a NaN is never silently hidden; an inf in a tile does likewise;
- scales are FP32, rounded up to a power of two when `pow2` (so value / scale is exact in the exponent).

Legend: R, C rows and columns of a 2-D operand; M, N, K the GEMM sizes (out[M,N] = a[M,K] @ b[N,K].T).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
MMA_K = 32  # K of one FP8 tensor-core MMA instruction (Hopper wgmma)


@dataclass
class Quantized:
    """An FP8 tensor with one FP32 scale per tile: x ~= data * scale (broadcast over each tile)."""

    data: torch.Tensor    # [R, C] float8
    scale: torch.Tensor   # [ceil(R / tile[0]), ceil(C / tile[1])] float32 (dequantization factor)
    tile: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        """FP32 values data * scale (exact: an FP8 value times a scale fits in FP32)."""
        R, C = self.data.shape
        s = self.scale.repeat_interleave(self.tile[0], 0).repeat_interleave(self.tile[1], 1)
        return self.data.float() * s[:R, :C]


def result_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an FP8 Linear hands back: the autocast dtype when autocast is on for x's device
    (as a plain Linear under autocast would), else x's own. Under bf16 autocast the residual
    stream is fp32; returning x.dtype would run everything after the projection in fp32."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def compute_scale(amax: torch.Tensor, fp8_max: float, pow2: bool) -> torch.Tensor:
    """Dequantization scale per tile: amax / fp8_max (rounded up to 2^k if pow2); 1 for all-zero tiles."""
    tiny = torch.finfo(torch.float32).tiny
    scale = (amax.float() / fp8_max).clamp_min(tiny)       # clamp keeps NaN (and inf) as they are
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def quantize(x_RC: torch.Tensor, tile: tuple[int, int], *, dtype: torch.dtype = torch.float8_e4m3fn,
             pow2: bool = True) -> Quantized:
    """Quantize a 2-D tensor with one scale per `tile` = (rows, cols) block, scale from the tile's amax."""
    if x_RC.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor, got shape {tuple(x_RC.shape)}")
    fp8_max = FP8_MAX[dtype]
    R, C = x_RC.shape
    tr, tc = tile
    pr, pc = (-R) % tr, (-C) % tc
    xp = F.pad(x_RC.float(), (0, pc, 0, pr))
    blocks = xp.view((R + pr) // tr, tr, (C + pc) // tc, tc)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = compute_scale(amax, fp8_max, pow2)
    q = (blocks / scale[:, None, :, None]).clamp(-fp8_max, fp8_max).to(dtype)
    return Quantized(q.view(R + pr, C + pc)[:R, :C], scale, (tr, tc))


def fake_quantize(x_RC: torch.Tensor, tile: tuple[int, int], *, dtype: torch.dtype = torch.float8_e4m3fn,
                  pow2: bool = True) -> torch.Tensor:
    """quantize then dequantize: the FP32 values an FP8 GEMM actually multiplies."""
    return quantize(x_RC, tile, dtype=dtype, pow2=pow2).dequantize()


def truncate_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep `bits` significant bits of each FP32 value, dropping the rest (round toward zero).

    FP32 has 24 significant bits (23 stored + the implicit one); clearing the low 24 - bits of the
    stored mantissa truncates the significand. Inf and NaN keep their exponent and stay non-finite.
    """
    assert 1 <= bits <= 24 and x.dtype == torch.float32, (bits, x.dtype)
    mask = -(1 << (24 - bits))              # ...1110000 in two's complement: keeps sign and exponent
    return (x.view(torch.int32) & mask).view(torch.float32)


def accumulate_gemm(a_MK: torch.Tensor, b_NK: torch.Tensor, *, promote_every: int, mantissa_bits: int,
                    mma_k: int = MMA_K) -> torch.Tensor:
    """out[M,N] = a @ b.T in FP32 with the tensor cores' limited accumulator and periodic FP32 promotion.

    mantissa_bits = 0 means an exact FP32 accumulator (one plain matmul). Otherwise each chunk of
    `mma_k` products is summed exactly (one MMA), added into a `mantissa_bits` accumulator, and the
    accumulator is added into the FP32 result every `promote_every` elements of K (0 = only at the end).
    """
    with torch.autocast(a_MK.device.type, enabled=False):   # never let autocast lower these to BF16
        return _accumulate(a_MK.float(), b_NK.float(), promote_every, mantissa_bits, mma_k)


def _accumulate(a_MK, b_NK, promote_every: int, mantissa_bits: int, mma_k: int) -> torch.Tensor:
    if mantissa_bits == 0:
        return a_MK @ b_NK.T
    assert promote_every % mma_k == 0, (promote_every, mma_k)
    M, K = a_MK.shape
    N = b_NK.shape[0]
    pad = (-K) % mma_k                                   # zero products change no sum
    a_MK, b_NK = F.pad(a_MK, (0, pad)), F.pad(b_NK, (0, pad))
    C = (K + pad) // mma_k
    # exact sum of each MMA's mma_k products, all chunks at once: [C, M, N]
    parts = torch.bmm(a_MK.view(M, C, mma_k).transpose(0, 1), b_NK.view(N, C, mma_k).permute(1, 2, 0))
    per_group = promote_every // mma_k if promote_every else C
    out = a_MK.new_zeros(M, N)
    for g0 in range(0, C, per_group):
        acc = torch.zeros_like(out)
        for c in range(g0, min(g0 + per_group, C)):
            acc = truncate_mantissa(acc + parts[c], mantissa_bits)
        out += acc                                       # promotion: into the exact FP32 sum
    return out
