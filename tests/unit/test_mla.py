"""MLA vs a naive per-head reference from the same weights; latent cache size; document isolation."""
import math

import pytest
import torch

from model.batch import make_batch
from trainer.config import load_config
from model.attention import MLA
from model.context import make_context
from model.layers import rope_tables
from model.provider import LayerProvider
from model.transformer import build_model


def _cfg(**att):
    sets = [f"attention.{k}={v}" for k, v in att.items()]
    return load_config(None, sets + ["model.hidden_size=32", "model.max_seq_len=16", "data.seq_len=16"])


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope_ref(x, pos, theta):
    """Rotate adjacent pairs as complex numbers by pos * theta^(-2i/R)."""
    R = x.shape[-1]
    freqs = theta ** (-torch.arange(0, R, 2, dtype=torch.float64) / R)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], R // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(freqs), pos * freqs)).reshape(x.shape)


def naive_mla(mla, att, x, seg, pos, eps):
    """Loops over rows, heads and queries; softmax over same-document earlier keys."""
    B, L, _ = x.shape
    H, N, R, V, C = mla.H, mla.N, mla.R, mla.V, mla.C
    x = x.double()
    W = lambda lin: lin.weight.double()  # noqa: E731
    if att.q_lora_rank > 0:
        cq = _rms(x @ W(mla.wq_a).T, mla.q_norm.weight.double(), eps)
        q = cq @ W(mla.wq_b).T
    else:
        q = x @ W(mla.wq).T
    kv = x @ W(mla.wkv_a).T
    c_kv = _rms(kv[..., :C], mla.kv_norm.weight.double(), eps)
    k_r = kv[..., C:]
    up = c_kv @ W(mla.wkv_b).T
    out = torch.zeros(B, L, H * V, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            qh = q[b, :, h * (N + R):(h + 1) * (N + R)]
            kh_nope = up[b, :, h * (N + V):h * (N + V) + N]
            vh = up[b, :, h * (N + V) + N:(h + 1) * (N + V)]
            for i in range(L):
                q_i = torch.cat([qh[i, :N], _rope_ref(qh[i, N:], float(pos[b, i]), att.rope_theta)])
                keys = [j for j in range(i + 1) if seg[b, j] == seg[b, i]]
                scores = torch.stack([
                    q_i @ torch.cat([kh_nope[j], _rope_ref(k_r[b, j], float(pos[b, j]), att.rope_theta)])
                    for j in keys]) / math.sqrt(N + R)
                p = scores.softmax(0)
                out[b, i, h * V:(h + 1) * V] = sum(p[n] * vh[j] for n, j in enumerate(keys))
    return out @ W(mla.wo).T


@pytest.mark.parametrize("q_lora_rank", [16, 0])
def test_mla_matches_naive_reference(q_lora_rank):
    cfg = _cfg(q_lora_rank=q_lora_rank, num_heads=2, kv_lora_rank=8, qk_nope_head_dim=4,
               qk_rope_head_dim=4, v_head_dim=6)
    torch.manual_seed(0)
    mla = MLA(LayerProvider(), 32, cfg.attention, eps=1e-6, layer=0)
    for p in mla.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    batch = make_batch(torch.zeros(2, 9, dtype=torch.long), [[4, 3], [9]])
    cos, sin = rope_tables(4, 16, cfg.attention.rope_theta)
    ctx = make_context(batch, cos, sin, 0, 1)
    x = torch.randn(2, 9, 32)
    got = mla(x, ctx)
    ref = naive_mla(mla, cfg.attention, x, batch.segment_ids, batch.positions, 1e-6)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


def test_latent_cache_size():
    cfg = load_config(None, [])
    a = cfg.attention
    mla = MLA(LayerProvider(), cfg.model.hidden_size, a, eps=1e-6, layer=0)
    assert mla.cache_dim == a.kv_lora_rank + a.qk_rope_head_dim
    batch = make_batch(torch.zeros(1, 5, dtype=torch.long), [[5]])
    cos, sin = rope_tables(a.qk_rope_head_dim, 8, a.rope_theta)
    c_kv, k_r = mla.compress_kv(torch.randn(1, 5, cfg.model.hidden_size), make_context(batch, cos, sin, 0, 1))
    assert c_kv.shape[-1] + k_r.shape[-1] == mla.cache_dim
    # much smaller than the per-head keys and values standard MHA would cache
    assert mla.cache_dim < a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)


def _logits(model, batch):
    ctx = model.make_context(batch)
    h = model.embed_tokens(batch)
    for i in model.owned:
        h = model.layers[str(i)](h, ctx)
    return model.head(model.norm(h))


def test_no_attention_across_documents():
    cfg = load_config(None, ["model.vocab_size=64", "model.max_seq_len=32", "data.seq_len=32", "mtp.depth=0"])
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (1, 24), generator=g)
    doc_lens = [[10, 9]]  # doc 1 = [0, 10), doc 2 = [10, 19), padding after
    base = _logits(model, make_batch(tokens, doc_lens))
    perturbed = tokens.clone()
    perturbed[0, :10] = torch.randint(0, 64, (10,), generator=g)
    out = _logits(model, make_batch(perturbed, doc_lens))
    # equal up to float rounding (GEMM blocking differs with the routed row counts)
    torch.testing.assert_close(out[0, 10:19], base[0, 10:19], rtol=0, atol=1e-6)
    assert (out[0, :10] - base[0, :10]).abs().max() > 1e-2
    # positions restart: doc 2 alone at the start of a row gives the same outputs
    alone = torch.zeros(1, 24, dtype=torch.long)
    alone[0, :9] = tokens[0, 10:19]
    torch.testing.assert_close(_logits(model, make_batch(alone, [[9]]))[0, :9], base[0, 10:19],
                               rtol=1e-5, atol=1e-5)
