"""FP8 routed experts on PyTorch's grouped scaled matmul (`torch._scaled_grouped_mm`), rowwise.

DeepSeek-V3 (section 3.3, Figure 6) runs the three GEMMs of every expert Linear in FP8 with
FP32 accumulation. Here each GEMM covers all experts of a layer in one call, driven by
cumulative row offsets that stay on the device (no host sync):
- Fprop  y[P,N]     = x[P,K] @ w[e].T  x: one scale per row over K; w: one per (e, n) over K
- Dgrad  dx[P,K]    = dy[P,N] @ w[e]   dy: one per row over N;      w: one per (e, k) over N
- Wgrad  dw[e][N,K] = dy_e.T @ x_e     contraction over expert e's rows: one scale per (e, n)
                                       for dy and per (e, k) for x, over that expert's rows only
The kernel wants every expert's row block to start at a multiple of 16 rows: rows are scattered
into a zero buffer with a static upper bound of S + E*15 rows (rounded up to 16) (no host sync), the padding rows
stay zero through SwiGLU (silu(0) * 0 = 0) and add nothing to Wgrad. The fused kernel needs
sm90 CUDA; the CPU build has none (the tests drive this file through a stand-in that checks the
call contract against the op's meta kernel).

Legend: S real rows sorted by expert, P padded rows, E experts, K input and N output features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel.fp8 import quant

ROW_ALIGN = 16
FP8 = torch.float8_e4m3fn


def pad_rows(counts_E: torch.Tensor, rows: int, multiple: int = ROW_ALIGN):
    """(padded offsets int32 [E], destination row of every real row [S], expert of every padded
    row [P], P) with each expert's block starting at a multiple of `multiple`; P is a static bound."""
    E = counts_E.shape[0]
    padded_E = (counts_E + multiple - 1) // multiple * multiple
    padded_end_E = torch.cumsum(padded_E, 0)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    expert_S = torch.repeat_interleave(torch.arange(E, device=counts_E.device), counts_E, output_size=rows)
    dest_S = (padded_end_E - padded_E)[expert_S] + torch.arange(rows, device=counts_E.device) - start_E[expert_S]
    P = -(-(rows + E * (multiple - 1)) // multiple) * multiple    # Wgrad reads [N,P]: 16-byte rows
    # rows past the last block belong to no expert: index E (the kernel leaves their outputs unset)
    expert_P = torch.bucketize(torch.arange(P, device=counts_E.device), padded_end_E, right=True)
    return padded_end_E.to(torch.int32), dest_S, expert_P, P


def _rowwise(t_RC: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 data [R,C] and one dequantization scale per row [R]."""
    q = quant.quantize(t_RC, (1, t_RC.shape[1]), pow2=pow2)
    return q.data, q.scale.reshape(-1)


def _per_expert_rows(t_PC: torch.Tensor, expert_P: torch.Tensor, E: int, pow2: bool):
    """FP8 data [P,C] and scales [E*C]: one scale per (expert, column) over that expert's rows.
    Rows of index E (past the last block, unset memory) get a scale row of their own, dropped."""
    fp8_max = quant.FP8_MAX[FP8]
    amax_EC = t_PC.new_zeros(E + 1, t_PC.shape[1], dtype=torch.float32)
    amax_EC.scatter_reduce_(0, expert_P[:, None].expand(-1, t_PC.shape[1]), t_PC.float().abs(), "amax")
    scale_EC = quant.compute_scale(amax_EC, fp8_max, pow2)
    data = (t_PC.float() / scale_EC[expert_P]).clamp(-fp8_max, fp8_max).to(FP8)
    return data, scale_EC[:E].reshape(-1)


def _weight_rows(w_ERC: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 weights [E,R,C] with one scale per (e, r) over C, scales [E,R]."""
    E, R, C = w_ERC.shape
    data, scale = _rowwise(w_ERC.reshape(E * R, C), pow2)
    return data.view(E, R, C), scale.view(E, R)


def _fprop(x_PK, w_ENK, offsets_E, pow2):
    xq, sx = _rowwise(x_PK, pow2)
    wq, sw = _weight_rows(w_ENK, pow2)
    return torch._scaled_grouped_mm(xq, wq.transpose(-2, -1), sx, sw, offs=offsets_E, out_dtype=torch.bfloat16)


def _dgrad(dy_PN, w_ENK, offsets_E, pow2):
    dyq, sdy = _rowwise(dy_PN, pow2)
    wq, sw = _weight_rows(w_ENK.transpose(-2, -1).contiguous(), pow2)      # [E,K,N], scales [E,K]
    return torch._scaled_grouped_mm(dyq, wq.transpose(-2, -1), sdy, sw, offs=offsets_E, out_dtype=torch.bfloat16)


def _wgrad(dy_PN, x_PK, offsets_E, expert_P, E, pow2):
    dyq, sdy = _per_expert_rows(dy_PN, expert_P, E, pow2)                  # scales [E*N]
    xq, sx = _per_expert_rows(x_PK, expert_P, E, pow2)                     # scales [E*K]
    a_NP = dyq.t().contiguous()                                            # row-major
    b_PK = xq.t().contiguous().t()                                         # column-major
    return torch._scaled_grouped_mm(a_NP, b_PK, sdy, sx, offs=offsets_E, out_dtype=torch.bfloat16)


class _GroupedFP8Linear(torch.autograd.Function):
    """y[p] = x[p] @ w[expert(p)].T over padded rows, all three GEMMs in FP8."""

    @staticmethod
    def forward(ctx, x_PK, w_ENK, offsets_E, expert_P, pow2):
        ctx.save_for_backward(x_PK, w_ENK, offsets_E, expert_P)
        ctx.pow2 = pow2
        return _fprop(x_PK, w_ENK, offsets_E, pow2).to(quant.result_dtype(x_PK))

    @staticmethod
    def backward(ctx, dy_PN):
        x_PK, w_ENK, offsets_E, expert_P = ctx.saved_tensors
        dy_PN = dy_PN.contiguous()
        dx = _dgrad(dy_PN, w_ENK, offsets_E, ctx.pow2).to(x_PK.dtype)
        dw = _wgrad(dy_PN, x_PK, offsets_E, expert_P, w_ENK.shape[0], ctx.pow2).to(w_ENK.dtype)
        return dx, dw, None, None, None


def grouped_fp8_swiglu(x_SD, counts_E, w_gate_EFD, w_up_EFD, w_down_EDF, pow2: bool = True):
    """Routed SwiGLU experts [S,D] of rows sorted by expert, every GEMM one FP8 grouped call."""
    offsets_E, dest_S, expert_P, P = pad_rows(counts_E, x_SD.shape[0])
    x_PD = x_SD.new_zeros(P, x_SD.shape[1]).index_copy(0, dest_S, x_SD)
    lin = lambda x, w: _GroupedFP8Linear.apply(x, w, offsets_E, expert_P, pow2)  # noqa: E731
    h_PF = F.silu(lin(x_PD, w_gate_EFD)) * lin(x_PD, w_up_EFD)
    return lin(h_PF, w_down_EDF)[dest_S]
