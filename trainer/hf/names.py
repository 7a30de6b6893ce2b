"""Parameter names and config fields: this project <-> Hugging Face DeepSeek-V3, in one table.

DeepSeek's released checkpoint (and `transformers`' `deepseek_v3` model) names every tensor
`model.layers.<i>.self_attn.q_a_proj.weight`, `...mlp.experts.<e>.gate_proj.weight`, ... and
stores the multi-token-prediction module of depth k (DeepSeek-V3 report section 2.2) as an
extra decoder layer `model.layers.<num_hidden_layers + k - 1>` (layer 61 of the 671B model) that
also carries `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, `shared_head.head` and its own copy
of `embed_tokens`. `BLOCK` below is the single table of per-block names; `TOP` and `MTP_EXTRA`
hold the rest. Both directions read the same rows:

- Routed experts: we keep one stacked tensor per projection ([E, F, D], see
  `model.provider.GroupedExperts`); HF stores one 2-D weight per expert.
- MTP input projection: the paper (eq. 21) and this project concatenate [RMSNorm(h); RMSNorm(emb)],
  the released weights and every inference engine use [enorm(emb); hnorm(h)], so `eh_proj`'s two
  column halves are swapped on the way out and back.
- The router's balancing bias (`bias` here, a buffer) is `mlp.gate.e_score_correction_bias`.
- RoPE: we rotate interleaved pairs, as DeepSeek's weights expect; HF's `rope_interleave: true`
  does the same rotation and only permutes the output dims of both q and k, so q.k is unchanged
  and the weights need no permutation.
- YaRN: `attention.rope_scaling` is config.json's `rope_scaling` (type yarn) with the same key
  names; transformers reads it into the rotary tables and the softmax scale as we do.
- transformers builds q_a_layernorm/kv_a_layernorm with eps 1e-6 whatever rms_norm_eps says;
  we use model.norm_eps everywhere, so logits match exactly only for norm_eps = 1e-6 (the default).
- transformers' DeepseekV3ForCausalLM does not run the MTP layer (it drops layer 61 on load and
  reports the tiny model's layer num_hidden_layers as unexpected keys); the weights are there.

Legend: E routed experts, F expert FFN size, D hidden size.
"""
from __future__ import annotations

import json
import re

import torch
from torch import Tensor

# (our name relative to a block, HF name relative to a decoder layer); "{e}" = expert index.
BLOCK: tuple[tuple[str, str], ...] = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight"),
    ("attn.q_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight"),
    ("attn.wq.weight", "self_attn.q_proj.weight"),
    ("attn.wkv_a.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("attn.kv_norm.weight", "self_attn.kv_a_layernorm.weight"),
    ("attn.wkv_b.weight", "self_attn.kv_b_proj.weight"),
    ("attn.wo.weight", "self_attn.o_proj.weight"),
    ("ffn.w_gate.weight", "mlp.gate_proj.weight"),
    ("ffn.w_up.weight", "mlp.up_proj.weight"),
    ("ffn.w_down.weight", "mlp.down_proj.weight"),
    ("ffn.router.gate.weight", "mlp.gate.weight"),
    ("ffn.router.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.shared.w_gate.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn.shared.w_up.weight", "mlp.shared_experts.up_proj.weight"),
    ("ffn.shared.w_down.weight", "mlp.shared_experts.down_proj.weight"),
    ("ffn.experts.w_gate", "mlp.experts.{e}.gate_proj.weight"),
    ("ffn.experts.w_up", "mlp.experts.{e}.up_proj.weight"),
    ("ffn.experts.w_down", "mlp.experts.{e}.down_proj.weight"),
)
TOP: tuple[tuple[str, str], ...] = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("head.weight", "lm_head.weight"),
)
# MTP module k: (our name relative to `mtp.<k>.`, HF name relative to its decoder layer).
MTP_EXTRA: tuple[tuple[str, str], ...] = (
    ("hnorm.weight", "hnorm.weight"),
    ("enorm.weight", "enorm.weight"),
    ("proj.weight", "eh_proj.weight"),
    ("norm.weight", "shared_head.norm.weight"),
)
# Copies DeepSeek's release stores in each MTP layer: (HF name in the layer, our shared tensor).
MTP_COPIES: tuple[tuple[str, str], ...] = (
    ("embed_tokens.weight", "embed.weight"),
    ("shared_head.head.weight", "head.weight"),
)


class HFNameError(KeyError):
    """A tensor name that has no counterpart; the message names it."""


# (our "section.field", HF config.json key): the architecture fields that map one to one.
CONFIG: tuple[tuple[str, str], ...] = (
    ("model.vocab_size", "vocab_size"),
    ("model.hidden_size", "hidden_size"),
    ("model.num_layers", "num_hidden_layers"),
    ("model.first_k_dense", "first_k_dense_replace"),
    ("model.dense_ffn_size", "intermediate_size"),
    ("model.norm_eps", "rms_norm_eps"),
    ("model.init_std", "initializer_range"),
    ("model.max_seq_len", "max_position_embeddings"),
    ("model.tie_embeddings", "tie_word_embeddings"),
    ("attention.num_heads", "num_attention_heads"),
    ("attention.kv_lora_rank", "kv_lora_rank"),
    ("attention.qk_nope_head_dim", "qk_nope_head_dim"),
    ("attention.qk_rope_head_dim", "qk_rope_head_dim"),
    ("attention.v_head_dim", "v_head_dim"),
    ("attention.rope_theta", "rope_theta"),
    ("moe.num_experts", "n_routed_experts"),
    ("moe.num_shared_experts", "n_shared_experts"),
    ("moe.expert_ffn_size", "moe_intermediate_size"),
    ("moe.topk", "num_experts_per_tok"),
    ("moe.n_group", "n_group"),
    ("moe.topk_group", "topk_group"),
    ("moe.routed_scaling_factor", "routed_scaling_factor"),
    ("moe.normalize_weights", "norm_topk_prob"),
    ("mtp.depth", "num_nextn_predict_layers"),
)


def hf_config(cfg, torch_dtype: str, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """config.json of a DeepSeek-V3 checkpoint for `cfg` (the fields DeepSeek's release carries)."""
    if cfg.moe.score_func != "sigmoid":
        raise ValueError(f"moe.score_func = {cfg.moe.score_func!r}: the deepseek_v3 format only has "
                         "sigmoid gating; export a DeepSeek-V3-style (sigmoid) model")
    out = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "topk_method": topk_method(cfg.moe)}
    for ours, hf in CONFIG:
        section, name = ours.split(".")
        out[hf] = getattr(getattr(cfg, section), name)
    att = cfg.attention
    out.update(
        q_lora_rank=att.q_lora_rank or None, num_key_value_heads=att.num_heads,
        scoring_func="sigmoid", moe_layer_freq=1, ep_size=1,
        hidden_act="silu", attention_bias=False, attention_dropout=0.0,
        rope_scaling={"type": "yarn", **att.yarn} if att.yarn else None,
        rope_interleave=True, seq_aux=cfg.moe.seq_aux_loss_alpha > 0, aux_loss_alpha=cfg.moe.seq_aux_loss_alpha,
        bos_token_id=bos_id, eos_token_id=eos_id, use_cache=True, torch_dtype=torch_dtype)
    return out


def topk_method(moe) -> str:
    """HF `topk_method` of our routing. DeepSeek-V3's `noaux_tc` scores a group by its top-2 biased
    affinities; DeepSeek-V2's `group_limited_greedy` (group max) exists only with softmax gating,
    which the deepseek_v3 format lacks. Without group limiting the group score plays no part."""
    grouped = moe.n_group > 1 and moe.topk_group < moe.n_group
    if grouped and moe.group_scoring != "top2_sum":
        raise ValueError(f"moe.group_score = {moe.group_score!r} (groups scored by {moe.group_scoring}): the "
                         "deepseek_v3 format (topk_method noaux_tc) scores groups by the top-2 sum; set "
                         "moe.group_score=top2_sum, or moe.topk_group=moe.n_group")
    return "noaux_tc"


def yarn_from_hf(hf: dict) -> dict:
    """attention.rope_scaling of an HF config.json: its `rope_scaling` (or newer `rope_parameters`)
    of type yarn, as DeepSeek-V3's release writes it; {} for plain RoPE."""
    rs = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    kind = rs.pop("type", None) or rs.pop("rope_type", None) or "default"
    rs.pop("rope_type", None)
    rs.pop("rope_theta", None)
    if kind == "default" and not rs:
        return {}
    if kind != "yarn":
        raise ValueError(f"config.json rope_scaling type = {kind!r}: only yarn (DeepSeek-V3's long-context "
                         "extension) is implemented")
    return rs


def overrides_from_hf(hf: dict) -> list[str]:
    """`section.field=value` overrides that rebuild the architecture of an HF config.json."""
    if hf.get("model_type") not in ("deepseek_v3", None):
        raise ValueError(f"config.json model_type = {hf.get('model_type')!r}: expected 'deepseek_v3'")
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError(f"config.json scoring_func/topk_method = {hf.get('scoring_func')}/{hf.get('topk_method')}: "
                         "only sigmoid + noaux_tc (DeepSeek-V3: groups scored by their top-2 sum) is "
                         "supported; DeepSeek-V2's softmax + group_limited_greedy is not")
    out = []
    hf = dict(hf)
    if "rope_theta" not in hf and isinstance(hf.get("rope_parameters"), dict):
        hf["rope_theta"] = hf["rope_parameters"].get("rope_theta")
    for ours, key in CONFIG:
        if hf.get(key) is not None:
            out.append(f"{ours}={hf[key]}")
    yarn = yarn_from_hf(hf)
    if yarn:
        out.append(f"attention.rope_scaling={json.dumps(yarn)}")
    out.append(f"attention.q_lora_rank={hf.get('q_lora_rank') or 0}")
    out.append("moe.score_func=sigmoid")
    out.append("moe.group_score=top2_sum")  # topk_method noaux_tc
    return out


def _swap_halves(w_DX: Tensor) -> Tensor:
    """[W_a | W_b] -> [W_b | W_a] along the input dim (eh_proj's concat order differs)."""
    half = w_DX.shape[1] // 2
    return torch.cat([w_DX[:, half:], w_DX[:, :half]], dim=1)


def _block_to_hf(prefix_ours: str, prefix_hf: str, state: dict, out: dict) -> None:
    for ours, hf in BLOCK:
        key = prefix_ours + ours
        if key not in state:
            continue
        if "{e}" in hf:
            for e, w in enumerate(state[key].unbind(0)):
                out[prefix_hf + hf.format(e=e)] = w
        else:
            out[prefix_hf + hf] = state[key]


def to_hf(state: dict, cfg) -> dict:
    """Our full-model state dict -> HF DeepSeek-V3 tensors (views where possible, not copies)."""
    n = cfg.model.num_layers
    out: dict[str, Tensor] = {}
    for ours, hf in TOP:
        if ours in state:
            out[hf] = state[ours]
    for i in range(n):
        _block_to_hf(f"layers.{i}.", f"model.layers.{i}.", state, out)
    for k in range(cfg.mtp.depth):
        ours_p, hf_p = f"mtp.{k}.", f"model.layers.{n + k}."
        _block_to_hf(ours_p + "block.", hf_p, state, out)
        for ours, hf in MTP_EXTRA:
            w = state[ours_p + ours]
            out[hf_p + hf] = _swap_halves(w) if ours == "proj.weight" else w
        for hf, ours in MTP_COPIES:
            out[hf_p + hf] = state[ours]
    known = _our_names(state, cfg)
    missing = sorted(set(state) - known)
    if missing:
        raise HFNameError(f"no Hugging Face name for {missing[:5]} (of {len(missing)}); "
                         "trainer/hf/names.py's table is out of date with the model")
    return out


def _our_names(state: dict, cfg) -> set:
    """Which of `state`'s names the table covers."""
    blocks = [f"layers.{i}." for i in range(cfg.model.num_layers)] + \
             [f"mtp.{k}.block." for k in range(cfg.mtp.depth)]
    names = {ours for ours, _ in TOP}
    names |= {p + ours for p in blocks for ours, _ in BLOCK}
    names |= {f"mtp.{k}.{ours}" for k in range(cfg.mtp.depth) for ours, _ in MTP_EXTRA}
    return names & set(state)


def from_hf(tensors: dict, cfg, expected: dict) -> dict:
    """HF tensors -> our state dict with exactly the keys of `expected` (a model's state dict).

    Raises HFNameError naming the missing HF tensors. HF tensors we do not use (the MTP layers'
    embedding/head copies, MTP layers beyond mtp.depth) are ignored; others are an error.
    """
    n = cfg.model.num_layers
    rows = [(ours, hf) for ours, hf in TOP]
    for i in range(n):
        rows += [(f"layers.{i}.{o}", f"model.layers.{i}.{h}") for o, h in BLOCK]
    for k in range(cfg.mtp.depth):
        rows += [(f"mtp.{k}.block.{o}", f"model.layers.{n + k}.{h}") for o, h in BLOCK]
        rows += [(f"mtp.{k}.{o}", f"model.layers.{n + k}.{h}") for o, h in MTP_EXTRA]
    out, used, missing = {}, set(), []
    for ours, hf in rows:
        if ours not in expected:
            continue
        if "{e}" in hf:
            names = [hf.format(e=e) for e in range(expected[ours].shape[0])]
            lost = [x for x in names if x not in tensors]
            if lost:
                missing += lost
                continue
            out[ours] = torch.stack([tensors[x] for x in names])
            used.update(names)
        elif hf not in tensors:
            missing.append(hf)
        else:
            w = tensors[hf]
            out[ours] = _swap_halves(w) if ours.endswith(".proj.weight") and ours.startswith("mtp.") else w
            used.add(hf)
    if missing:
        raise HFNameError(f"the Hugging Face checkpoint lacks {len(missing)} tensors this config needs, "
                         f"e.g. {missing[:4]}; is config.json the one written with these weights?")
    ignorable = re.compile(rf"model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight$")
    extra = [x for x in tensors if x not in used and not _ignorable(x, ignorable, n + cfg.mtp.depth)]
    if extra:
        raise HFNameError(f"the Hugging Face checkpoint has {len(extra)} tensors with no place in this "
                         f"model, e.g. {sorted(extra)[:4]}")
    return out


def _ignorable(name: str, copies: re.Pattern, first_unused_layer: int) -> bool:
    """MTP copies of shared tensors, and MTP layers this config does not use (mtp.depth lower)."""
    if copies.match(name):
        return True
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(m) and int(m.group(1)) >= first_unused_layer
