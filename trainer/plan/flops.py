"""Parameter counts and training FLOPs per token, from the config alone (no model built).

Counts follow the modules in `trainer/model/` exactly (checked against a model built on the
meta device in tests/unit/test_inspect.py). "Activated" parameters are those a token touches:
everything except the routed experts, of which only top-K of E are used (DeepSeek-V3: 37B of
671B). The input embedding is a table lookup: `activated` counts it (as DeepSeek-V3's 37B
does), `activated_no_embed` does not. MTP modules (which share embedding and head) are counted
separately from the main model, as in the report (671B main + the MTP module).

Training FLOPs per token (forward + backward = 3 x forward, Kaplan et al. 2020 / PaLM app. B):
    6 * P_matmul  +  6 * sum over blocks of H * (d_qk + d_v) * c
where P_matmul = activated parameters without the input embedding (and without the MTP
modules' when MTP is off), d_qk = qk_nope + qk_rope and d_v = v_head_dim per head, and c is the
mean number of keys a query attends to: (L + 1) / 2 for causal attention over a row of L, or
sum n(n+1)/2 / sum n over the packed documents of lengths n (attention never crosses them).
Blocks = num_layers + mtp.depth. Norms, softmax and elementwise work are ignored.
"""
from __future__ import annotations


def _attention(cfg) -> int:
    m, a = cfg.model, cfg.attention
    D, H, qk = m.hidden_size, a.num_heads, a.qk_nope_head_dim + a.qk_rope_head_dim
    if a.q_lora_rank > 0:
        q = D * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * H * qk
    else:
        q = D * H * qk
    kv = D * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank \
        + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + H * a.v_head_dim * D


def _block(cfg, moe: bool) -> dict[str, tuple[int, int]]:
    """Components of one block: name -> (total, activated)."""
    D, e = cfg.model.hidden_size, cfg.moe
    att = _attention(cfg)
    out = {"attention": (att, att), "norms": (2 * D, 2 * D)}
    if not moe:
        dense = 3 * D * cfg.model.dense_ffn_size
        out["dense_ffn"] = (dense, dense)
        return out
    per_expert = 3 * D * e.expert_ffn_size
    shared = e.num_shared_experts * per_expert
    out["router"] = (e.num_experts * D, e.num_experts * D)
    out["moe_shared"] = (shared, shared)
    out["moe_routed"] = (e.num_experts * per_expert, e.topk * per_expert)
    return out


def block_param_counts(cfg, moe: bool) -> tuple[int, int]:
    """(total, activated) parameters of one dense or MoE block."""
    parts = _block(cfg, moe)
    return sum(t for t, _ in parts.values()), sum(a for _, a in parts.values())


def _add(acc: dict, part: dict) -> None:
    for k, (t, a) in part.items():
        t0, a0 = acc.get(k, (0, 0))
        acc[k] = (t0 + t, a0 + a)


def component_counts(cfg) -> dict[str, dict[str, tuple[int, int]]]:
    """{'main': {component: (total, activated)}, 'mtp': {...}} for the full model."""
    m = cfg.model
    D, V = m.hidden_size, m.vocab_size
    main: dict = {"embedding": (V * D, V * D)}
    for i in range(m.num_layers):
        _add(main, _block(cfg, moe=i >= m.first_k_dense))
    head = D + (0 if m.tie_embeddings else V * D)
    _add(main, {"head": (head, D + V * D)})
    mtp: dict = {}
    mtp_moe = m.first_k_dense < m.num_layers
    for _ in range(cfg.mtp.depth):
        _add(mtp, {"mtp_proj": (2 * D * D, 2 * D * D), "norms": (3 * D, 3 * D)})
        _add(mtp, _block(cfg, moe=mtp_moe))
    return {"main": main, "mtp": mtp}


def param_counts(cfg) -> dict[str, int]:
    """Totals: main_total, main_activated (with input embedding), main_activated_no_embed,
    mtp_total, mtp_activated (embedding and head are shared, so not counted again)."""
    c = component_counts(cfg)
    main_t = sum(t for t, _ in c["main"].values())
    main_a = sum(a for _, a in c["main"].values())
    return {
        "main_total": main_t, "main_activated": main_a,
        "main_activated_no_embed": main_a - c["main"]["embedding"][1],
        "mtp_total": sum(t for t, _ in c["mtp"].values()),
        "mtp_activated": sum(a for _, a in c["mtp"].values()),
    }


def attention_context(seq_len: int, doc_lens=None) -> float:
    """Mean keys per query under causal same-document masking (see the module docstring)."""
    if doc_lens is None:
        return (seq_len + 1) / 2
    lens = [int(n) for row in doc_lens for n in row]
    total = sum(lens)
    if total == 0:
        return 0.0
    return sum(n * (n + 1) / 2 for n in lens) / total


def flops_per_token(cfg, seq_len: int | None = None, doc_lens=None, mtp: bool = True) -> float:
    """Training (fwd + bwd) FLOPs per token; seq_len defaults to data.seq_len."""
    L = cfg.data.seq_len if seq_len is None else seq_len
    counts = param_counts(cfg)
    matmul = counts["main_activated_no_embed"] + (counts["mtp_activated"] if mtp else 0)
    a = cfg.attention
    blocks = cfg.model.num_layers + (cfg.mtp.depth if mtp else 0)
    per_block = a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
    return 6.0 * matmul + 6.0 * blocks * per_block * attention_context(L, doc_lens)
