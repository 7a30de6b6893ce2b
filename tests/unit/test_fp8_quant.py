"""Fine-grained FP8 quantizer and the limited-precision accumulation model (parallel/fp8/quant.py)."""
import math

import pytest
import torch

from parallel.fp8.quant import Quantized, accumulate_gemm, fake_quantize, quantize, truncate_mantissa


def test_shapes_and_scales_per_tile():
    torch.manual_seed(0)
    x = torch.randn(3, 300)                       # ragged: 300 = 2 * 128 + 44
    q = quantize(x, (1, 128), pow2=False)
    assert q.data.dtype == torch.float8_e4m3fn and q.data.shape == (3, 300)
    assert q.scale.shape == (3, 3)
    for r in range(3):
        for t, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 300)]):
            assert q.scale[r, t].item() == pytest.approx(x[r, lo:hi].abs().max().item() / 448, rel=1e-6)
    w = quantize(torch.randn(200, 130), (128, 128))
    assert w.scale.shape == (2, 2)


def test_tile_max_maps_to_448_and_error_is_e4m3_sized():
    torch.manual_seed(0)
    x = torch.randn(16, 256) * 1e-3
    q = quantize(x, (1, 128), pow2=False)
    assert q.data.float().abs().amax(dim=1).eq(448).all()
    rel = ((q.dequantize() - x).abs() / x.abs()).max().item()
    assert rel <= 2 ** -4 + 1e-6                  # E4M3 keeps 3 mantissa bits: half-ulp = 2^-4


def test_power_of_two_scales():
    torch.manual_seed(0)
    x = torch.randn(4, 256) * 7.3
    s = quantize(x, (1, 128), pow2=True).scale
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    exact = quantize(x, (1, 128), pow2=False).scale
    assert (s >= exact).all() and (s < 2 * exact).all()   # rounded up: never saturates


@pytest.mark.parametrize("dtype,fmax", [(torch.float8_e4m3fn, 448.0), (torch.float8_e5m2, 57344.0)])
def test_saturates_at_format_max_over_any_range(dtype, fmax):
    x = torch.tensor([[1e-30, -3e-20, 2.0, -1e30], [7.0, 1e-3, 0.0, 448.5]])
    q = quantize(x, (1, 4), dtype=dtype, pow2=False)
    data = q.data.float()
    assert torch.isfinite(data).all() and data.abs().max().item() == fmax
    assert data[0, 3].item() == -fmax
    assert torch.isfinite(q.dequantize()).all()
    assert q.dequantize()[1, 3].item() == pytest.approx(448.5, rel=2 ** -3)


def test_all_zero_tile_gets_unit_scale_and_zeros():
    x = torch.zeros(2, 256)
    x[1, 130] = 5.0
    q = quantize(x, (1, 128))
    assert q.scale[0].eq(1).all() and q.scale[1, 0].item() == 1.0
    deq = q.dequantize()
    assert deq[0].eq(0).all() and deq[1, 130].item() == 5.0 and torch.isfinite(deq).all()


def test_nan_poisons_its_tile_only():
    x = torch.ones(2, 256)
    x[0, 3] = float("nan")
    deq = fake_quantize(x, (1, 128))
    assert deq[0, :128].isnan().all()
    assert not deq[0, 128:].isnan().any() and not deq[1].isnan().any()


def test_weight_blocks_are_transpose_invariant():
    torch.manual_seed(0)
    w = torch.randn(256, 384)
    assert torch.equal(fake_quantize(w, (128, 128)).T, fake_quantize(w.T.contiguous(), (128, 128)))


def test_truncate_mantissa():
    x = torch.tensor([1.0 + 2 ** -20, -3.0 - 2 ** -15, 0.0])
    t = truncate_mantissa(x, 14)
    assert t[0].item() == 1.0 and t[1].item() == -3.0 and t[2].item() == 0.0
    assert truncate_mantissa(torch.tensor([1.0 + 2 ** -10]), 14).item() == 1.0 + 2 ** -10


def test_exact_accumulator_is_a_plain_matmul():
    torch.manual_seed(0)
    a, b = torch.randn(8, 256), torch.randn(5, 256)
    assert torch.allclose(accumulate_gemm(a, b, promote_every=128, mantissa_bits=0), a @ b.T)


def test_promotion_reduces_error_at_k4096():
    """DeepSeek-V3 section 3.3.2: without FP32 promotion a K=4096 GEMM loses ~1e-2 relative accuracy."""
    torch.manual_seed(0)
    M, N, K = 32, 32, 4096
    a = fake_quantize(torch.rand(M, K), (1, 128))        # positive data: the error cannot cancel
    b = fake_quantize(torch.rand(N, K), (128, 128))
    ref = a.double() @ b.double().T
    err = {}
    for every in (0, 128):
        out = accumulate_gemm(a, b, promote_every=every, mantissa_bits=14)
        err[every] = ((out.double() - ref).abs() / ref.abs()).max().item()
    assert err[0] > 1e-3                    # truncating accumulator over 128 MMAs
    assert err[128] < 3e-4
    assert err[0] > 8 * err[128]


def test_block_scaled_gemm_error_vs_float64():
    torch.manual_seed(0)
    x, w = torch.randn(64, 4096), torch.randn(128, 4096)
    ref = x.double() @ w.double().T
    out = accumulate_gemm(fake_quantize(x, (1, 128)), fake_quantize(w, (128, 128)),
                          promote_every=128, mantissa_bits=14)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert 1e-3 < rel < 0.06                # FP8 quantization error dominates, bounded by E4M3's
    assert math.isfinite(rel)


def test_dataclass_roundtrip():
    q = Quantized(torch.zeros(2, 2, dtype=torch.float8_e4m3fn), torch.full((2, 1), 2.0), (1, 128))
    assert q.dequantize().shape == (2, 2)
