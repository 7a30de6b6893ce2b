"""Autoregressive decoding with MLA's compressed KV cache (DeepSeek-V2 section 2.1.3).

Per token and layer the cache keeps only the normed latent c_KV (kv_lora_rank numbers) and the
RoPE'd key k_R shared by all heads (qk_rope_head_dim numbers): (C + R) x layers x dtype size
bytes per token, against 2 x H x head dims for a plain KV cache. The per-head keys and values are
never rebuilt. The up-projections are absorbed instead:
  score_h(t) = q_nope_h . (W_UK_h c_t) + q_rope_h . k_R,t = (W_UK_h^T q_nope_h) . c_t + q_rope_h . k_R,t
so the query is mapped into the latent space once (W_UK absorbed into the query), attention
runs over c_t directly, and the attended latent o_h = sum_t p_h(t) c_t meets W_UV_h and W_O in
one precomputed matrix W_O W_UV (D x H x C): W_UV absorbed into the output.
Numbers equal the training forward (`model.attention.MLA`) up to float rounding.

`LatentDecoder.forward(tokens, start)` runs new tokens at positions start.. (a prompt at once, or
one token per step) and returns their next-token logits; `full_logits` is the reference that
re-runs the whole prefix through the training path. MTP modules are not used for decoding.

Legend: B batch, S new tokens, T cached tokens, D hidden, H heads, N nope dims, R rope dims,
V value dims, C kv_lora_rank.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from model.batch import make_batch
from model.context import Context


class LatentCache:
    """Per layer c_KV [B, max_len, C] and k_R [B, max_len, R], filled up to `length`."""

    def __init__(self, num_layers: int, batch: int, max_len: int, C: int, R: int, dtype, device):
        self.c_kv = [torch.zeros(batch, max_len, C, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k_rope = [torch.zeros(batch, max_len, R, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token costs over all layers: (C + R) x layers x dtype size."""
        return sum(c.shape[-1] * c.element_size() + k.shape[-1] * k.element_size()
                   for c, k in zip(self.c_kv, self.k_rope))

    @property
    def bytes_used(self) -> int:
        return self.length * self.bytes_per_token * self.c_kv[0].shape[0]


class AbsorbedMLA:
    """One MLA layer's weights rearranged for decoding from the latent cache (read-only view)."""

    def __init__(self, mla):
        H, N, V, C = mla.H, mla.N, mla.V, mla.C
        self.mla = mla
        w_ukv = mla.wkv_b.weight.view(H, N + V, C)
        self.w_uk_HNC = w_ukv[:, :N]                                        # keys' up-projection
        w_uv_HVC = w_ukv[:, N:]
        w_o_DHV = mla.wo.weight.view(-1, H, V)
        self.w_ouv_DHC = torch.einsum("dhv,hvc->dhc", w_o_DHV, w_uv_HVC)      # W_O W_UV

    def __call__(self, x_BSD: Tensor, cache: LatentCache, layer: int, start: int, cos, sin) -> Tensor:
        mla = self.mla
        rope = SimpleNamespace(cos=cos, sin=sin)
        q_BSHK = mla.queries(x_BSD, rope)
        q_nope, q_rope_BSHR = q_BSHK.split([mla.N, mla.R], dim=-1)
        q_lat_BSHC = torch.einsum("bshn,hnc->bshc", q_nope, self.w_uk_HNC)   # W_UK absorbed into q
        c_new, k_new = mla.compress_kv(x_BSD, rope)
        S = x_BSD.shape[1]
        cache.c_kv[layer][:, start:start + S] = c_new
        cache.k_rope[layer][:, start:start + S] = k_new
        c_BTC, k_BTR = cache.c_kv[layer][:, :start + S], cache.k_rope[layer][:, :start + S]
        scores_BSHT = (torch.einsum("bshc,btc->bsht", q_lat_BSHC, c_BTC)
                       + torch.einsum("bshr,btr->bsht", q_rope_BSHR, k_BTR)) * mla.scale
        if S > 1:  # new token s may see cached keys and new keys up to itself
            keys = torch.arange(start + S, device=x_BSD.device)
            allowed = keys[None, :] <= (start + torch.arange(S, device=x_BSD.device))[:, None]
            scores_BSHT = scores_BSHT.masked_fill(~allowed[None, :, None, :], float("-inf"))
        p_BSHT = scores_BSHT.float().softmax(dim=-1).to(c_BTC.dtype)
        o_lat_BSHC = torch.einsum("bsht,btc->bshc", p_BSHT, c_BTC)
        return torch.einsum("bshc,dhc->bsd", o_lat_BSHC, self.w_ouv_DHC)    # W_UV absorbed into W_O


class LatentDecoder:
    """Decodes with a full model (`model.transformer.DeepSeekV3` with embedding and head)."""

    def __init__(self, model, batch: int = 1, max_len: int | None = None, dtype=None):
        if not (model.has_embed and model.has_head):
            raise ValueError("LatentDecoder needs the full model (embedding and head), not a pipeline stage")
        att = model.cfg.attention
        self.model = model
        self.max_len = max_len or model.cfg.model.max_seq_len
        if self.max_len > model.rope_cos.shape[0]:
            raise ValueError(f"max_len = {self.max_len}: exceeds model.max_seq_len = {model.rope_cos.shape[0]}")
        w = model.embed.weight
        self.cache = LatentCache(len(model.owned), batch, self.max_len, att.kv_lora_rank, att.qk_rope_head_dim,
                                 dtype or w.dtype, w.device)
        self.attn = {i: AbsorbedMLA(model.layers[str(i)].attn) for i in model.owned}

    def _context(self, B: int, start: int, S: int) -> Context:
        device = self.model.rope_cos.device
        pos = torch.arange(start, start + S, device=device).expand(B, S)
        seg = torch.zeros(B, S, dtype=torch.long, device=device)
        return Context(positions=pos, segment_ids=seg, cos=self.model.rope_cos[pos], sin=self.model.rope_sin[pos],
                       mask=None, valid=seg >= 0,
                       expert_counts=torch.zeros(self.model.n_moe_layers, self.model.cfg.moe.num_experts,
                                                 device=device))

    @torch.no_grad()
    def forward(self, tokens_BS: Tensor, start: int | None = None) -> Tensor:
        """Next-token logits [B,S,vocab] of tokens at positions start..start+S-1 (default: append)."""
        start = self.cache.length if start is None else start
        B, S = tokens_BS.shape
        if start + S > self.max_len:
            raise ValueError(f"decoding to position {start + S} exceeds the cache length {self.max_len} "
                             "(model.max_seq_len)")
        ctx = self._context(B, start, S)
        h = self.model.embed(tokens_BS)
        for layer, i in enumerate(self.model.owned):
            block = self.model.layers[str(i)]
            h = h + self.attn[i](block.attn_norm(h), self.cache, layer, start, ctx.cos, ctx.sin)
            x = block.ffn_norm(h)
            h = h + (block.ffn(x, ctx) if block.is_moe else block.ffn(x))
        self.cache.length = start + S
        return self.model.head(self.model.norm(h)).float()


@torch.no_grad()
def full_logits(model, tokens_BL: Tensor) -> Tensor:
    """Logits [B,L,vocab] of every position, re-running the whole prefix (one document per row)."""
    batch = make_batch(tokens_BL, None, tokens_BL.device)
    ctx = model.make_context(batch)
    h = model.embed_tokens(batch)
    for i in model.owned:
        h = model.layers[str(i)](h, ctx)
    return model.head(model.norm(h)).float()
