"""MLA through flex_attention + BlockMask vs the dense-mask SDPA path: same forward (CPU, eager
flex has no CPU backward) and same gradients (CUDA, run by benchmarks/gpu_check.sh). The dense
path (v zero-padded to the q/k head dim, SDPA's flash kernel on CPU) against the plain masked
softmax in fp64 on packed rows with several documents, forward and gradients."""
import pytest
import torch

from model.attention import MLA, dense_attention, flex_attention
from model.batch import make_batch
from model.context import additive_mask, attention_mask, attention_path, make_context
from model.layers import rope_tables
from model.provider import LayerProvider
from trainer.config import load_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# (nope, rope, v) head dims. CPU: q/k 8 + 8 = 16, v 8 (MLA's differing head dims). CUDA: inductor's
# flex lowering needs every head dim >= 16 (it raises NotImplementedError below), so q/k 32, v 16.
CPU_DIMS, CUDA_DIMS = (8, 8, 8), (16, 16, 16)
FLEX_MIN_HEAD_DIM = 16


def _setup(device, L=40, dtype=torch.float32, dims=CPU_DIMS):
    nope, rope, v = dims
    cfg = load_config(None, ["model.hidden_size=32", "model.max_seq_len=64", "data.seq_len=64",
                             "attention.num_heads=2", "attention.kv_lora_rank=16", "attention.q_lora_rank=16",
                             f"attention.qk_nope_head_dim={nope}", f"attention.qk_rope_head_dim={rope}",
                             f"attention.v_head_dim={v}"])
    torch.manual_seed(0)
    mla = MLA(LayerProvider(), 32, cfg.attention, eps=1e-6, layer=0).to(device, dtype)
    # three documents and padding in row 0, one document in row 1
    batch = make_batch(torch.zeros(2, L, dtype=torch.long), [[13, 20, 3], [L]])
    cos, sin = rope_tables(rope, 64, cfg.attention.rope_theta, device=device)
    x = torch.randn(2, L, 32, device=device, dtype=dtype)
    ctxs = {p: make_context(batch, cos, sin, 0, 1, attention=p) for p in ("dense", "flex")}
    return mla, x, ctxs


def test_flex_context_holds_no_dense_mask_and_auto_picks_by_device():
    _, _, ctxs = _setup("cpu")
    assert ctxs["flex"].mask is None and ctxs["flex"].block_mask is not None
    assert ctxs["dense"].block_mask is None and ctxs["dense"].mask.shape == (2, 1, 40, 40)
    assert attention_path(torch.device("cpu")) == "dense"
    assert attention_path(torch.device("cuda")) == "flex"
    with pytest.raises(ValueError, match="auto, flex or dense"):
        attention_path(torch.device("cpu"), "varlen")


def test_dense_attention_takes_flash_and_equals_masked_softmax_on_packed_rows():
    _, _, ctxs = _setup("cpu")
    mask = attention_mask(ctxs["dense"].segment_ids)   # row 0: three documents and padding; row 1: one
    torch.testing.assert_close(ctxs["dense"].mask, additive_mask(mask))
    torch.manual_seed(1)
    q, k = torch.randn(2, 2, 40, 16, requires_grad=True), torch.randn(2, 2, 40, 16, requires_grad=True)
    v = torch.randn(2, 2, 40, 8, requires_grad=True)
    assert not torch.equal(dense_attention(q, k, v, mask, 0.3), dense_attention(q, k, v, ~mask, 0.3))
    out = dense_attention(q, k, v, ctxs["dense"].mask, 0.3)
    torch.testing.assert_close(out, dense_attention(q, k, v, mask, 0.3))   # additive and boolean forms agree
    assert "Flash" in type(out.grad_fn.next_functions[0][0]).__name__   # the flash kernel, not the math path
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = ((q64 @ k64.transpose(-2, -1)) * 0.3).masked_fill(~mask, float("-inf")).softmax(-1) @ v64
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    g = torch.randn(out.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g.float()), torch.autograd.grad(ref, (q64, k64, v64), g)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_flex_forward_equals_dense_on_cpu():
    mla, x, ctxs = _setup("cpu")
    dense, flex = mla(x, ctxs["dense"]), mla(x, ctxs["flex"])
    valid = ctxs["dense"].valid
    torch.testing.assert_close(flex[valid], dense[valid], rtol=1e-5, atol=1e-6)


def test_cuda_flex_case_uses_head_dims_the_flex_lowering_accepts():
    nope, rope, v = CUDA_DIMS
    assert min(nope + rope, v) >= FLEX_MIN_HEAD_DIM and nope + rope != v


def test_cpu_tensors_take_eager_flex_even_when_a_gpu_exists(monkeypatch):
    """The compiled flex kernel is for CUDA tensors; a CPU tensor on a GPU machine stays eager."""
    compiled = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = torch.compile

    def record(fn, **kw):   # eager flex itself compiles with backend="eager"; inductor is the CUDA kernel
        if kw.get("backend", "inductor") == "inductor":
            compiled.append(fn)
        return real(fn, **kw)
    monkeypatch.setattr(torch, "compile", record)
    mla, x, ctxs = _setup("cpu")
    with torch.no_grad():
        mla(x, ctxs["flex"])
    assert compiled == []
    from torch.nn.attention.flex_attention import flex_attention as eager
    assert flex_attention(torch.device("cpu")) is eager


@cuda
def test_flex_forward_and_gradients_equal_dense_on_cuda():
    mla, x, ctxs = _setup("cuda", L=300, dims=CUDA_DIMS)
    x.requires_grad_(True)
    valid = ctxs["dense"].valid
    outs, grads = [], []
    for path in ("dense", "flex"):
        y = mla(x, ctxs[path])
        g = torch.autograd.grad(y[valid].square().sum(), [x, *mla.parameters()])
        outs.append(y[valid])
        grads.append(g)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
