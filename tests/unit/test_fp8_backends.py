"""Backend selection, the TE backend wired to a recording stand-in, and the torch backend on CPU."""
import contextlib
import logging
import sys
import types

import pytest
import torch
from torch import nn

from parallel.fp8 import FP8BackendError, autocast_context, make_provider, select_backend
from parallel.fp8 import te as te_backend
from parallel.fp8.config import FP8Config
from parallel.fp8.provider import FP8GroupedExperts
from parallel.fp8.select import torch_probe
from parallel.fp8.torch_native import ScaledMMLinear, scaled_mm_linear
from model.experts import GroupedExperts
from model.provider import LayerProvider

H100 = lambda: ((9, 0), "12.9")  # noqa: E731
A100 = lambda: ((8, 0), "12.4")  # noqa: E731
ADA = lambda: ((8, 9), "12.4")  # noqa: E731
CPU = lambda: (None, None)  # noqa: E731
NO_TE = lambda recipe, info: "transformer_engine not importable (ImportError: no)"  # noqa: E731
TE_OK = lambda recipe, info: None  # noqa: E731


def cfg(**kw):
    return FP8Config(enabled=True, **kw)


# ---------------------------------------------------------------- selection
def test_auto_prefers_te_then_torch_then_emulate(caplog):
    with caplog.at_level(logging.INFO, logger="parallel.fp8.select"):
        assert select_backend(cfg(), info=H100, te_probe=TE_OK).backend == "te"
        assert select_backend(cfg(), info=H100, te_probe=NO_TE).backend == "torch"
        sel = select_backend(cfg(), info=CPU, te_probe=NO_TE)
    assert sel.backend == "emulate" and "torch: no CUDA device" in sel.why
    assert "backend=emulate" in caplog.text and "backend=te" in caplog.text


def test_requested_backend_that_cannot_run_is_an_error():
    with pytest.raises(FP8BackendError, match="backend = 'te'.*not importable"):
        select_backend(cfg(backend="te"), info=H100, te_probe=NO_TE)
    with pytest.raises(FP8BackendError, match="backend = 'torch'.*no CUDA device"):
        select_backend(cfg(backend="torch"), info=CPU, te_probe=NO_TE)
    with pytest.raises(FP8BackendError, match="sm90"):
        select_backend(cfg(backend="torch", recipe="rowwise"), info=ADA, te_probe=NO_TE)
    with pytest.raises(FP8BackendError, match="8.9"):
        select_backend(cfg(backend="torch", recipe="tensorwise"), info=A100, te_probe=NO_TE)
    with pytest.raises(FP8BackendError, match="blockwise recipe only"):
        select_backend(cfg(backend="emulate", recipe="delayed", format="hybrid"), info=CPU, te_probe=NO_TE)
    with pytest.raises(FP8BackendError, match="no backend runs recipe 'delayed'"):
        select_backend(cfg(recipe="delayed"), info=CPU, te_probe=NO_TE)
    assert select_backend(cfg(backend="emulate"), info=CPU, te_probe=NO_TE).why == "requested"


def test_real_environment_without_te_picks_emulate_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert select_backend(cfg()).backend == "emulate"
    with pytest.raises(FP8BackendError):
        select_backend(cfg(backend="torch"))


def test_hardware_gates():
    gate = te_backend.hardware_gate
    assert gate("blockwise", (9, 0), "12.9") is None
    assert "CUDA >= 12.9" in gate("blockwise", (9, 0), "12.4")
    assert "sm90" in gate("blockwise", (8, 9), "12.9")
    assert "sm100" in gate("mxfp8", (9, 0), "12.9") and gate("mxfp8", (10, 0), "12.8") is None
    assert "8.9" in gate("delayed", (8, 0), "12.4") and gate("tensorwise", (8, 9), "12.1") is None
    assert "no CUDA" in gate("delayed", None, None)
    assert torch_probe("blockwise", H100) is None or "scaled_mm" in torch_probe("blockwise", H100)
    assert "not 'mxfp8'" in torch_probe("mxfp8", H100)


def test_probe_reports_import_failures(monkeypatch):
    def broken():
        raise OSError("libcudnn.so.9: cannot open shared object file")
    monkeypatch.setattr(te_backend, "import_te", broken)
    assert "OSError: libcudnn" in te_backend.probe("blockwise", H100)


# ---------------------------------------------------------------- TE stand-in
class _Recipe:
    def __init__(self, **kw):
        self.kw = kw


def fake_te(monkeypatch, block_ok=True):
    """Install a stand-in transformer_engine that records what the backend does with it."""
    log = []

    class Linear(nn.Module):
        def __init__(self, in_f, out_f, bias=True, params_dtype=None, device=None):
            super().__init__()
            log.append(("Linear", in_f, out_f, bias, params_dtype))
            self.weight = nn.Parameter(torch.zeros(out_f, in_f, dtype=params_dtype))

        def forward(self, x):
            log.append(("Linear.forward", tuple(x.shape)))
            return x @ self.weight.T

    class GroupedLinear(nn.Module):
        def __init__(self, num_gemms, in_f, out_f, bias=True, params_dtype=None, device=None):
            super().__init__()
            log.append(("GroupedLinear", num_gemms, in_f, out_f, bias))
            for i in range(num_gemms):
                setattr(self, f"weight{i}", nn.Parameter(torch.zeros(out_f, in_f, dtype=params_dtype)))
            self.n = num_gemms

        def forward(self, x, m_splits):
            log.append(("GroupedLinear.forward", list(m_splits)))
            parts = torch.split(x, list(m_splits))
            return torch.cat([p @ getattr(self, f"weight{i}").T for i, p in enumerate(parts)])

    @contextlib.contextmanager
    def autocast(enabled=True, recipe=None):
        log.append(("autocast", enabled, type(recipe).__name__, recipe.kw))
        yield

    pt = types.ModuleType("transformer_engine.pytorch")
    pt.Linear, pt.GroupedLinear, pt.autocast = Linear, GroupedLinear, autocast
    pt.is_fp8_available = lambda return_reason=False: (True, "")
    pt.is_fp8_block_scaling_available = lambda return_reason=False: (block_ok, "" if block_ok else "needs cuBLAS 12.9")
    rec = types.ModuleType("transformer_engine.common.recipe")
    rec.Format = types.SimpleNamespace(E4M3="E4M3", HYBRID="HYBRID")
    for name in ("DelayedScaling", "Float8CurrentScaling", "Float8BlockScaling", "MXFP8BlockScaling"):
        setattr(rec, name, type(name, (_Recipe,), {}))
    common = types.ModuleType("transformer_engine.common")
    common.recipe = rec
    root = types.ModuleType("transformer_engine")
    root.pytorch, root.common = pt, common
    for name, mod in [("transformer_engine", root), ("transformer_engine.pytorch", pt),
                      ("transformer_engine.common", common), ("transformer_engine.common.recipe", rec)]:
        monkeypatch.setitem(sys.modules, name, mod)
    return log


def test_te_probe_uses_te_own_support_check(monkeypatch):
    fake_te(monkeypatch, block_ok=False)
    assert "needs cuBLAS 12.9" in te_backend.probe("blockwise", H100)
    assert te_backend.probe("tensorwise", H100) is None
    sel = select_backend(cfg(), info=H100)          # torch 2.13 has the block-wise scaled_mm
    assert sel.backend == "torch" and "te: Transformer Engine says: needs cuBLAS 12.9" in sel.why


def test_te_provider_builds_te_modules_and_autocast(monkeypatch):
    log = fake_te(monkeypatch)
    c = cfg(backend="te")
    provider = make_provider(c, num_layers=4, backend="te")
    lin = provider.linear(256, 512, kind="attention", layer=1)
    assert ("Linear", 256, 512, False, torch.float32) in log
    router = provider.linear(256, 8, kind="router", layer=1)
    assert type(router) is nn.Linear                      # kept in high precision
    base = LayerProvider().linear(256, 512, kind="attention", layer=1)
    assert lin.weight.shape == base.weight.shape
    with autocast_context(c, backend="te"):
        lin(torch.randn(3, 256))
    kind, enabled, name, kw = log[-2]
    assert (kind, enabled, name) == ("autocast", True, "Float8BlockScaling") and kw == {"fp8_format": "E4M3"}
    with autocast_context(cfg(backend="te", recipe="delayed", format="hybrid", amax_history_len=16), backend="te"):
        pass
    assert log[-1][2] == "DelayedScaling" and log[-1][3]["amax_history_len"] == 16
    assert log[-1][3]["fp8_format"] == "HYBRID"
    with pytest.raises(ValueError, match="divisible by 16"):
        provider.linear(100, 512, kind="attention", layer=1)


def test_te_grouped_experts_pad_counts_and_keep_contract_state_dict(monkeypatch):
    log = fake_te(monkeypatch)
    torch.manual_seed(0)
    E, D, F_ = 3, 32, 16
    ref = GroupedExperts(E, D, F_, layer=1)
    for p in ref.parameters():
        nn.init.normal_(p, std=0.1)
    te_exp = te_backend.TEGroupedExperts(ref, recipe="blockwise")
    assert ("GroupedLinear", E, D, 2 * F_, False) in log and ("GroupedLinear", E, F_, D, False) in log
    counts = [5, 0, 18]
    x = torch.randn(sum(counts), D, requires_grad=True)
    y = te_exp(x, counts)
    assert [e for e in log if e[0] == "GroupedLinear.forward"][-1] == ("GroupedLinear.forward", [16, 0, 32])
    assert torch.allclose(y, ref(x, counts), atol=1e-5)          # padding rows are dropped again
    y.sum().backward()
    assert x.grad.shape == x.shape
    sd = te_exp.state_dict()
    assert {"w_gate", "w_up", "w_down"} <= set(sd) and not any(k.startswith("gate_up.weight") for k in sd)
    assert torch.equal(sd["w_up"], ref.w_up.detach())
    fresh = te_backend.TEGroupedExperts(GroupedExperts(E, D, F_, layer=1), recipe="mxfp8")
    fresh.load_state_dict(sd)
    assert torch.allclose(fresh(x, counts), y)
    assert [e for e in log if e[0] == "GroupedLinear.forward"][-1][1] == [32, 0, 32]  # mxfp8: multiples of 32


def test_padded_index():
    padded, rows = te_backend.padded_index([3, 0, 17], 16)
    assert padded == [16, 0, 32] and rows.tolist() == [0, 1, 2] + list(range(16, 33))


# ---------------------------------------------------------------- torch backend (CPU scaled_mm)
@pytest.mark.parametrize("mode", ["tensorwise", "rowwise"])
def test_torch_scaled_mm_linear_on_cpu(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 37, 64, requires_grad=True)     # 74 tokens: Wgrad pads K to 80
    w = torch.randn(48, 64, requires_grad=True)
    y = scaled_mm_linear(x, w, mode)
    dy = torch.randn_like(y)
    y.backward(dy)
    xe, we = x.detach().requires_grad_(), w.detach().requires_grad_()
    (xe @ we.T).backward(dy)
    for got, ref in ((y, xe @ we.T), (x.grad, xe.grad), (w.grad, we.grad)):
        assert got.shape == ref.shape and ((got - ref).norm() / ref.norm()).item() < 0.06
    assert w.grad.dtype == torch.float32


def test_torch_scaled_mm_linear_compiles_as_one_graph():
    """torch.compile(fullgraph=True) traces quantization and all three scaled GEMMs with no graph
    break, and gives the eager result exactly (forward and both gradients)."""
    torch.manual_seed(0)
    x, w = torch.randn(40, 64, requires_grad=True), torch.randn(48, 64, requires_grad=True)
    compiled = torch.compile(lambda a, b: scaled_mm_linear(a, b, "rowwise"), fullgraph=True, backend="aot_eager")
    y = compiled(x, w)
    y.sum().backward()
    xe, we = x.detach().requires_grad_(), w.detach().requires_grad_()
    ye = scaled_mm_linear(xe, we, "rowwise")
    ye.sum().backward()
    assert torch.equal(y, ye) and torch.equal(x.grad, xe.grad) and torch.equal(w.grad, we.grad)


def test_torch_provider_rejects_unaligned_dims_and_builds_scaled_mm():
    p = make_provider(cfg(backend="torch", recipe="tensorwise"), num_layers=4, backend="torch")
    assert isinstance(p.linear(64, 128, kind="mlp", layer=1), ScaledMMLinear)
    with pytest.raises(ValueError, match="keep_high_precision"):
        p.linear(64, 100, kind="mlp", layer=1)
    assert type(make_provider(FP8Config(enabled=False), num_layers=4)) is LayerProvider


def test_autocast_is_a_no_op_for_emulate_and_when_disabled(monkeypatch):
    def boom():
        raise AssertionError("TE must not be imported")
    monkeypatch.setattr(te_backend, "import_te", boom)
    for c in (FP8Config(enabled=False), cfg(backend="emulate")):
        with autocast_context(c, backend=None if not c.enabled else "emulate"):
            pass
    p = make_provider(cfg(backend="emulate"), num_layers=2)          # selection runs, TE never imported
    assert p.backend == "emulate"


# ---------------------------------------------------------------- torch backend: grouped experts
def _scaled_grouped_mm_stand_in(calls):
    """Dequantize-and-loop stand-in for torch._scaled_grouped_mm (no CPU kernel). It first runs
    the real op on meta copies of its arguments, so shapes, dtypes, strides and scale layouts
    must satisfy the op's own checks."""
    real = torch._scaled_grouped_mm

    def stand_in(a, b, scale_a, scale_b, offs=None, out_dtype=None, **kw):
        meta = lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")  # noqa: E731
        real(meta(a), meta(b), meta(scale_a), meta(scale_b), offs=meta(offs), out_dtype=out_dtype)
        ends = offs.tolist()
        starts = [0] + ends[:-1]
        af, bf = a.float(), b.float()
        if b.dim() == 3:                                   # 2d x 3d: groups of rows of a
            out = torch.zeros(a.shape[0], b.shape[2])
            for g, (s, e) in enumerate(zip(starts, ends)):
                out[s:e] = (af[s:e] * scale_a[s:e, None]) @ (bf[g] * scale_b[g][None, :])
        else:                                              # 2d x 2d: groups along the contraction
            G, N, K = len(ends), a.shape[0], b.shape[1]
            sa, sb = scale_a.view(G, N), scale_b.view(G, K)
            out = torch.stack([(af[:, s:e] * sa[g][:, None]) @ (bf[s:e] * sb[g][None, :])
                               for g, (s, e) in enumerate(zip(starts, ends))])
        calls.append("2d3d" if b.dim() == 3 else "2d2d")
        return out.to(out_dtype)
    return stand_in


def test_torch_grouped_fp8_experts_through_scaled_grouped_mm(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _scaled_grouped_mm_stand_in(calls))
    E, D, F_ = 3, 64, 32
    torch.manual_seed(0)
    fp8 = FP8GroupedExperts(E, D, F_, layer=1, linear=None, backend="torch", grouped=True)
    for p in fp8.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    counts = torch.tensor([21, 0, 5])                      # not multiples of 16, one expert empty
    x = torch.randn(26, D, requires_grad=True)
    y = fp8(x, counts)
    dy = torch.randn_like(y)
    y.backward(dy)
    xe = x.detach().requires_grad_()
    ref = fp8.reference_forward(xe, counts)
    ref_grads = torch.autograd.grad(ref, [xe, fp8.w_gate, fp8.w_up, fp8.w_down], dy)
    got = [y, x.grad, fp8.w_gate.grad, fp8.w_up.grad, fp8.w_down.grad]
    for g, r in zip(got, [ref, *ref_grads]):
        assert g.shape == r.shape and ((g - r).norm() / r.norm()).item() < 0.1   # measured 0.06-0.07
    # same scaling granularity as the per-expert rowwise loop (CPU scaled_mm): the same numbers
    loop = FP8GroupedExperts(E, D, F_, layer=1, linear=lambda a, w: scaled_mm_linear(a, w, "rowwise"),
                             backend="torch")
    loop.load_state_dict(fp8.state_dict())
    xl = x.detach().requires_grad_()
    loop(xl, counts).backward(dy)
    for g, r in zip(got, [loop(x, counts), xl.grad, loop.w_gate.grad, loop.w_up.grad, loop.w_down.grad]):
        assert torch.equal(g, r)
    assert fp8.w_gate.grad[1].abs().sum() == 0            # the empty expert gets a zero gradient
    assert sorted(calls) == ["2d2d"] * 3 + ["2d3d"] * 6   # 3 Fprop + 3 Dgrad + 3 Wgrad, no loop
    assert fp8.path == "scaled_grouped_mm"


def test_torch_provider_uses_the_grouped_kernel_only_where_it_exists():
    p = make_provider(cfg(backend="torch", recipe="rowwise"), num_layers=4, backend="torch")
    experts = p.grouped_experts(4, 64, 32, layer=1)
    assert experts.path == ("scaled_grouped_mm" if torch.cuda.is_available() else "per-expert loop")


# ---------------------------------------------------------------- output dtype under autocast
@pytest.mark.parametrize("backend", ["emulate", "torch"])
def test_fp8_linear_returns_the_autocast_dtype(backend):
    """Under bf16 autocast the residual stream is fp32: an FP8 projection must hand bf16 on, as a
    plain Linear does, or attention after it runs in fp32. Gradients keep the input's dtype."""
    p = make_provider(cfg(backend=backend, recipe="rowwise"), num_layers=4, backend=backend)
    lin = p.linear(64, 48, kind="mlp", layer=1)
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        plain = torch.nn.functional.linear(x, lin.weight)
    assert y.dtype == plain.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    assert lin(x).dtype == torch.float32            # autocast off: the input's dtype
