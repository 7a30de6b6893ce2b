"""CPU-runnable emulation of DeepSeek-V3's fine-grained FP8 Linear (arXiv 2412.19437, section 3.3, Figure 6).

All three GEMMs of a Linear y = x @ W.T run on quantize-dequantized operands, each operand tiled
along that GEMM's contraction dimension K:

    Fprop  y[T,N]  = x[T,K]  @ W[N,K].T   x: 1x128 tiles along K (features), W: 128x128 blocks
    Dgrad  dx[T,K] = dy[T,N] @ W[N,K]     dy: 1x128 tiles along N,           W: 128x128 blocks
    Wgrad  dW[N,K] = dy.T    @ x          dy.T and x.T: 1x128 tiles along T (tokens); the paper
                                          converts the cached activation to 128x1 tiles for this

and the products are summed with `quant.accumulate_gemm` (limited-precision accumulator, FP32
promotion every `promote_every` elements of K). The gradient is straight-through: backward treats
quantization as the identity and differs from the exact gradient only by the FP8 GEMMs above.
Weights and their gradients stay in the parameter's dtype (FP32 master weights in the paper).
Gradients use E4M3 too unless `format = hybrid` (then E5M2, as TE's HYBRID format).

Legend: T tokens (all leading dims flattened), K input features, N output features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from parallel.fp8 import quant


@dataclass(frozen=True)
class EmulationSpec:
    """How the emulated FP8 GEMMs quantize and accumulate (built from FP8Config by `spec_from_config`)."""

    block: int = 128
    pow2: bool = True
    act_dtype: torch.dtype = torch.float8_e4m3fn   # activations and weights
    grad_dtype: torch.dtype = torch.float8_e4m3fn  # output gradients
    promote_every: int = 128
    mantissa_bits: int = 14


def spec_from_config(cfg) -> EmulationSpec:
    """EmulationSpec of an FP8Config."""
    grad = torch.float8_e5m2 if cfg.format == "hybrid" else torch.float8_e4m3fn
    return EmulationSpec(block=cfg.block_size, pow2=cfg.power_of_two_scales, grad_dtype=grad,
                         promote_every=cfg.promote_every, mantissa_bits=cfg.accum_mantissa_bits)


def _q(x_RC: torch.Tensor, tile: tuple[int, int], dtype: torch.dtype, spec: EmulationSpec) -> torch.Tensor:
    """Quantize-dequantize one operand (looked up through the module so tests can record calls)."""
    return quant.fake_quantize(x_RC, tile, dtype=dtype, pow2=spec.pow2)


def _gemm(a_MK: torch.Tensor, b_NK: torch.Tensor, spec: EmulationSpec) -> torch.Tensor:
    return quant.accumulate_gemm(a_MK, b_NK, promote_every=spec.promote_every,
                                 mantissa_bits=spec.mantissa_bits)


def fprop(x_TK: torch.Tensor, w_NK: torch.Tensor, spec: EmulationSpec) -> torch.Tensor:
    """y[T,N] = x @ W.T with x in 1x128 tiles along K and W in 128x128 blocks."""
    b = spec.block
    return _gemm(_q(x_TK, (1, b), spec.act_dtype, spec), _q(w_NK, (b, b), spec.act_dtype, spec), spec)


def dgrad(dy_TN: torch.Tensor, w_NK: torch.Tensor, spec: EmulationSpec) -> torch.Tensor:
    """dx[T,K] = dy @ W with dy in 1x128 tiles along N and W in 128x128 blocks (K of this GEMM is N)."""
    b = spec.block
    w_q = _q(w_NK, (b, b), spec.act_dtype, spec)  # the same blocks as Fprop, read transposed
    return _gemm(_q(dy_TN, (1, b), spec.grad_dtype, spec), w_q.T, spec)


def wgrad(dy_TN: torch.Tensor, x_TK: torch.Tensor, spec: EmulationSpec) -> torch.Tensor:
    """dW[N,K] = dy.T @ x with both operands in tiles of 128 tokens (K of this GEMM is T)."""
    b = spec.block
    return _gemm(_q(dy_TN.T, (1, b), spec.grad_dtype, spec), _q(x_TK.T, (1, b), spec.act_dtype, spec), spec)


class _EmulatedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_NK, spec):
        x_TK = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x_TK, w_NK)
        ctx.spec, ctx.x_shape = spec, x.shape
        y_TN = fprop(x_TK, w_NK, spec)
        return y_TN.to(quant.result_dtype(x)).view(*x.shape[:-1], w_NK.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_TK, w_NK = ctx.saved_tensors
        dy_TN = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = dgrad(dy_TN, w_NK, ctx.spec).to(x_TK.dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = wgrad(dy_TN, x_TK, ctx.spec).to(w_NK.dtype)
        return dx, dw, None


def emulated_linear(x: torch.Tensor, w_NK: torch.Tensor, spec: EmulationSpec) -> torch.Tensor:
    """y = x @ w.T with all three GEMMs in emulated fine-grained FP8."""
    return _EmulatedLinearFn.apply(x, w_NK, spec)


class EmulatedFP8Linear(nn.Module):
    """Bias-free Linear (weight [out, in]) whose GEMMs run in emulated FP8; adopts an existing weight."""

    def __init__(self, weight: nn.Parameter, spec: EmulationSpec):
        super().__init__()
        self.weight = weight
        self.spec = spec

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return emulated_linear(x, self.weight, self.spec)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8=emulate(block={self.spec.block})"
