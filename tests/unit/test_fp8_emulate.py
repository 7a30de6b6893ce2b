"""Emulated fine-grained FP8 Linear / experts and the FP8 provider (parallel/fp8/emulate.py, provider.py)."""
import pytest
import torch

from parallel.fp8 import emulate, make_provider, in_fp8
from parallel.fp8.config import FP8Config
from parallel.fp8.emulate import EmulationSpec, emulated_linear
from parallel.fp8.provider import FP8GroupedExperts
from parallel.fp8.quant import accumulate_gemm, fake_quantize
from model.experts import GroupedExperts

SPEC = EmulationSpec()


def _record(monkeypatch):
    calls = []
    real = emulate._q

    def spy(x, tile, dtype, spec):
        calls.append((tuple(x.shape), tile, dtype))
        return real(x, tile, dtype, spec)

    monkeypatch.setattr(emulate, "_q", spy)
    return calls


def test_each_gemm_quantizes_along_its_own_k(monkeypatch):
    calls = _record(monkeypatch)
    T, K, N = 200, 256, 384
    x = torch.randn(2, T // 2, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    emulated_linear(x, w, SPEC).backward(torch.randn(2, T // 2, N))
    e4, = {torch.float8_e4m3fn}
    assert calls[:2] == [((T, K), (1, 128), e4), ((N, K), (128, 128), e4)]          # Fprop
    assert sorted(calls[2:4]) == sorted([((N, K), (128, 128), e4), ((T, N), (1, 128), e4)])  # Dgrad
    assert calls[4:] == [((N, T), (1, 128), e4), ((K, T), (1, 128), e4)]             # Wgrad: tiles of tokens
    assert len(calls) == 6


def _skewed(R, C):
    """Data whose magnitude varies by row and by column, so that the tile grouping matters."""
    return torch.randn(R, C) * torch.exp2(torch.randint(-5, 6, (R, 1)).float()) \
        * torch.exp2(torch.randint(-5, 6, (1, C)).float())


def test_gradients_equal_the_three_fp8_gemms():
    torch.manual_seed(0)
    T, K, N = 256, 256, 128
    x = _skewed(T, K).requires_grad_()
    w = _skewed(N, K).requires_grad_()
    dy = _skewed(T, N)
    y = emulated_linear(x, w, SPEC)
    y.backward(dy)
    g = dict(promote_every=128, mantissa_bits=14)
    xq, wq = fake_quantize(x.detach(), (1, 128)), fake_quantize(w.detach(), (128, 128))
    assert torch.equal(y, accumulate_gemm(xq, wq, **g))
    assert torch.equal(x.grad, accumulate_gemm(fake_quantize(dy, (1, 128)), wq.T, **g))
    dw = accumulate_gemm(fake_quantize(dy.T, (1, 128)), fake_quantize(x.detach().T, (1, 128)), **g)
    assert torch.equal(w.grad, dw)
    # a wrong grouping (Wgrad tiled along features, Fprop along tokens) gives different numbers
    dw_feat = accumulate_gemm(fake_quantize(dy, (1, 128)).T, fake_quantize(x.detach(), (1, 128)).T, **g)
    assert not torch.allclose(w.grad, dw_feat, rtol=1e-3)
    y_tok = accumulate_gemm(fake_quantize(x.detach(), (128, 1)), wq, **g)
    assert not torch.allclose(y, y_tok, rtol=1e-3)
    # straight-through: close to the exact gradients
    xe, we = x.detach().requires_grad_(), w.detach().requires_grad_()
    (xe @ we.T).backward(dy)
    for got, ref in ((x.grad, xe.grad), (w.grad, we.grad)):
        assert ((got - ref).norm() / ref.norm()).item() < 0.06


def test_outlier_token_only_hurts_its_own_tiles():
    """1x128 activation tiles (section 3.3.2): an outlier in one token leaves the others exact-scaled."""
    torch.manual_seed(0)
    x = torch.randn(4, 256)
    x[0, 5] = 1e6
    err_rows = (fake_quantize(x, (1, 128)) - x).abs().amax(dim=1)
    per_tensor = (fake_quantize(x, (4, 256)) - x).abs().amax(dim=1)
    assert err_rows[1:].max() < 0.3 and per_tensor[1:].max() > 1.0


def test_hybrid_format_quantizes_gradients_to_e5m2(monkeypatch):
    calls = _record(monkeypatch)
    spec = emulate.spec_from_config(FP8Config(enabled=True, recipe="blockwise", format="e4m3"))
    assert spec.grad_dtype == torch.float8_e4m3fn
    spec = EmulationSpec(grad_dtype=torch.float8_e5m2)
    x, w = torch.randn(8, 128, requires_grad=True), torch.randn(16, 128, requires_grad=True)
    emulated_linear(x, w, spec).sum().backward()
    grads = [c for c in calls if c[2] == torch.float8_e5m2]
    assert [c[0] for c in grads] == [(8, 16), (16, 8)]


def test_fp8_experts_match_bf16_experts_closely():
    torch.manual_seed(0)
    E, D, F_ = 4, 128, 256
    ref = GroupedExperts(E, D, F_, layer=1)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fp8 = FP8GroupedExperts(E, D, F_, layer=1, backend="emulate",
                            linear=lambda x, w: emulated_linear(x, w, SPEC))
    fp8.load_state_dict(ref.state_dict())
    counts = [5, 0, 40, 19]
    x = torch.randn(sum(counts), D)
    y_ref, y = ref(x, counts), fp8(x, counts)
    assert y.shape == y_ref.shape
    assert ((y - y_ref).norm() / y_ref.norm()).item() < 0.08
    y.sum().backward()
    assert fp8.w_gate.grad is not None and fp8.w_gate.grad[1].abs().sum() == 0
    with pytest.raises(ValueError, match="counts"):
        fp8(x, [1, 2, 3, 4])


def test_high_precision_plan():
    cfg = FP8Config(enabled=True, backend="emulate", first_layers_bf16=1, last_layers_bf16=1)
    L = 6
    assert not in_fp8(cfg, L, "router", 2) and not in_fp8(cfg, L, "output_head", None)
    assert not in_fp8(cfg, L, "mtp_proj", 6) and not in_fp8(cfg, L, "attention", 6)  # MTP block
    assert not in_fp8(cfg, L, "attention", 0) and not in_fp8(cfg, L, "experts", 5)    # first/last
    assert in_fp8(cfg, L, "attention", 1) and in_fp8(cfg, L, "experts", 4) and in_fp8(cfg, L, "shared_expert", 2)
    off = FP8Config(enabled=False)
    assert not in_fp8(off, L, "attention", 1)
    keep = FP8Config(enabled=True, keep_high_precision=["embedding", "norm", "attention_core", "experts"])
    assert not in_fp8(keep, L, "experts", 2) and in_fp8(keep, L, "router", 2) and in_fp8(keep, L, "mtp_proj", 6)


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="keep_high_precision"):
        FP8Config(keep_high_precision=["embedding", "norm", "attention_core", "everything"])
    with pytest.raises(ValueError, match="always run in high precision"):
        FP8Config(keep_high_precision=["router"])
    with pytest.raises(ValueError, match="promote_every"):
        FP8Config(promote_every=100)
    with pytest.raises(ValueError, match="format"):
        FP8Config(recipe="blockwise", format="hybrid")


def test_tiny_model_builds_and_trains_a_step_in_emulated_fp8():
    from trainer.config import load_config
    from model.transformer import build_model
    from model.batch import make_batch
    import numpy as np

    over = ["model.hidden_size=128", "model.vocab_size=512", "model.num_layers=2", "model.dense_ffn_size=256",
            "moe.expert_ffn_size=128"]
    cfg = load_config("configs/tiny.yaml", over + ["fp8.enabled=true", "fp8.backend=emulate"])
    provider = make_provider(cfg.fp8, cfg.model.num_layers)
    model, ref = build_model(cfg, provider=provider), build_model(cfg)
    kinds = {k for k, _, v in provider.decisions if v == "fp8"}
    assert {"attention", "mlp", "experts", "shared_expert"} <= kinds
    assert ("router", 1, "high") in provider.decisions and ("output_head", None, "high") in provider.decisions
    names = [n for n, m in model.named_modules() if isinstance(m, emulate.EmulatedFP8Linear)]
    assert names and all(torch.equal(model.state_dict()[k], v) for k, v in ref.state_dict().items())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 64), generator=g)
    batch = make_batch(tokens, [np.array([30, 34], dtype=np.int32), np.array([64], dtype=np.int32)])
    out, out_ref = model(batch), ref(batch)
    assert abs(out.lm_loss.item() - out_ref.lm_loss.item()) / out_ref.lm_loss.item() < 0.01
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
