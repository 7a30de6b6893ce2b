"""FP8 Linear on PyTorch's own scaled matmuls, for GPUs without Transformer Engine.

The three GEMMs of y = x @ W.T (DeepSeek-V3 report section 3.3, Figure 6) each quantize their
operands along the contraction dim K and call a scaled matmul that takes FP8 inputs plus the
dequantization scales and accumulates in FP32:
- tensorwise: one scale per operand                       (torch._scaled_mm)
- rowwise:    one scale per row of a / column of b          (torch._scaled_mm, sm90)
- blockwise:  1x128 tiles for x and dy, 128x128 blocks for W (torch.nn.functional.scaled_mm with
  ScalingType.BlockWise1x128 / BlockWise128x128: needs sm90 and a torch built with CUDA >= 12.9;
  Wgrad uses 1x128 x 1x128 along the token dim). The CPU build has tensorwise and rowwise only.
Scaled matmuls want K and N multiples of 16; K is zero-padded here (zeros add nothing), N is
checked when the layer is built (see `check_shape`).

Legend: T tokens, K input features, N output features; a[M,K] @ b[N,K].T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.fp8 import quant

MODES = ("tensorwise", "rowwise", "blockwise")
ALIGN = 16
BLOCK = 128


def check_shape(in_features: int, out_features: int, what: str, backend: str = "torch") -> None:
    """Raise if a Linear cannot run through FP8 GEMM kernels (feature dims must be multiples of 16)."""
    if in_features % ALIGN or out_features % ALIGN:
        raise ValueError(f"fp8.backend={backend} needs Linear dims divisible by {ALIGN}; {what} is "
                         f"{in_features}->{out_features}. Add its component to fp8.keep_high_precision "
                         f"or use fp8.backend=emulate")


def _pad_k(t_MK: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-t_MK.shape[1]) % multiple
    return F.pad(t_MK, (0, pad)) if pad else t_MK


def _blockwise_mm(a_MK, b_NK, b_is_weight: bool, pow2: bool, out_dtype) -> torch.Tensor:
    """1x128 (a) x 128x128 or 1x128 (b) block-scaled matmul via torch.nn.functional.scaled_mm."""
    ST = F.ScalingType
    qa = quant.quantize(a_MK, (1, BLOCK), pow2=pow2)
    qb = quant.quantize(b_NK, (BLOCK, BLOCK) if b_is_weight else (1, BLOCK), pow2=pow2)
    sa = qa.scale.t().contiguous().t()                     # [M, K/128], M-major as cuBLAS wants
    if b_is_weight:                                        # [L4, N/128], K-blocks padded to 4, K-major
        kb = qb.scale.shape[1]
        sb_full = qb.scale.new_zeros(qb.scale.shape[0], kb + (-kb) % 4)
        sb_full[:, :kb] = qb.scale
        sb, rb = sb_full.t(), ST.BlockWise128x128
    else:
        sb, rb = qb.scale.t().contiguous().t(), ST.BlockWise1x128
    return F.scaled_mm(qa.data.contiguous(), qb.data.contiguous().t(), sa, ST.BlockWise1x128,
                       sb, rb, output_dtype=out_dtype)


def scaled_gemm(a_MK: torch.Tensor, b_NK: torch.Tensor, mode: str, *, b_is_weight: bool = False,
                pow2: bool = True, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a @ b.T in FP8: both operands quantized along K with `mode`'s scaling, FP32 accumulation."""
    if 0 in (a_MK.shape[0], b_NK.shape[0], a_MK.shape[1]):  # an expert that got no tokens
        return a_MK.new_zeros(a_MK.shape[0], b_NK.shape[0], dtype=out_dtype)
    multiple = BLOCK if mode == "blockwise" else ALIGN
    a_MK, b_NK = _pad_k(a_MK, multiple), _pad_k(b_NK, multiple)
    if mode == "blockwise":
        return _blockwise_mm(a_MK, b_NK, b_is_weight, pow2, out_dtype)
    if mode == "tensorwise":
        ta, tb = tuple(a_MK.shape), tuple(b_NK.shape)
    elif mode == "rowwise":
        ta, tb = (1, a_MK.shape[1]), (1, b_NK.shape[1])
    else:
        raise ValueError(f"scaled_gemm mode = {mode!r}: must be one of {', '.join(MODES)}")
    qa, qb = quant.quantize(a_MK, ta, pow2=pow2), quant.quantize(b_NK, tb, pow2=pow2)
    sa, sb = qa.scale, qb.scale.t().contiguous()            # [M,1] and [1,N] (or [1,1] both)
    if mode == "tensorwise":
        sa, sb = sa.reshape(()), sb.reshape(())
    return torch._scaled_mm(qa.data.contiguous(), qb.data.contiguous().t(), sa, sb, out_dtype=out_dtype)


class _ScaledMMLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_NK, mode, pow2):
        x_TK = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x_TK, w_NK)
        ctx.mode, ctx.pow2, ctx.x_shape = mode, pow2, x.shape
        out = quant.result_dtype(x)
        y = scaled_gemm(x_TK, w_NK, mode, b_is_weight=True, pow2=pow2, out_dtype=_out_dtype(out))
        return y.to(out).view(*x.shape[:-1], w_NK.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_TK, w_NK = ctx.saved_tensors
        dy_TN = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:   # Dgrad: dx = dy @ W, K = N; W re-read as [K_in, N] rows
            dx = scaled_gemm(dy_TN, w_NK.T, ctx.mode, b_is_weight=True, pow2=ctx.pow2,
                             out_dtype=_out_dtype(dy.dtype)).to(x_TK.dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:   # Wgrad: dW = dy.T @ x, K = T tokens
            dw = scaled_gemm(dy_TN.T, x_TK.T, ctx.mode, b_is_weight=False, pow2=ctx.pow2,
                             out_dtype=torch.float32 if ctx.mode == "tensorwise" else torch.bfloat16)
            dw = dw.to(w_NK.dtype)
        return dx, dw, None, None


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def scaled_mm_linear(x: torch.Tensor, w_NK: torch.Tensor, mode: str, pow2: bool = True) -> torch.Tensor:
    """y = x @ w.T with Fprop, Dgrad and Wgrad through PyTorch's scaled matmuls."""
    return _ScaledMMLinearFn.apply(x, w_NK, mode, pow2)


class ScaledMMLinear(nn.Module):
    """Bias-free Linear (weight [out, in]) running its GEMMs through torch scaled matmuls."""

    def __init__(self, weight: nn.Parameter, mode: str, pow2: bool = True):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode = {mode!r}: must be one of {', '.join(MODES)}")
        self.weight, self.mode, self.pow2 = weight, mode, pow2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_mm_linear(x, self.weight, self.mode, self.pow2)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, fp8=torch({self.mode})"
