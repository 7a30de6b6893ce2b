"""torchtitan 0.3.0's DeepSeek-V3 model at the dimensions of a moepipe config, with moepipe's weights.

The peer of `bench_model.py`: the same MLA + DeepSeekMoE math (DeepSeek-V3 section 2.1) in
another implementation, built from torchtitan's own config classes (`build_mla_moe_layers`),
its weights copied by name from a moepipe model (`weight_map`), so both models compute the same
loss on the same batch. Each model is measured with its own loss: the peer's is torchtitan's
`cross_entropy_loss` (F.cross_entropy over fp32 logits, summed) divided by the number of non-ignored
targets, as its trainer normalises it; moepipe's is its token cross-entropy (`model/loss.py`).

What the peer differs in, and how it is adapted (each line is printed with the benchmark's table,
`adaptations`):
- experts: torchtitan's GroupedExperts always computes in bf16; in fp32 its forward is replaced
  by the same three grouped GEMMs in the input's dtype (`SameDtypeExperts`);
- attention on CPU: its default flex_attention has no CPU backward; its SDPA inner attention
  (plain causal, no document mask) is used, exact for one document per row;
- attention on CUDA: its flex_attention with its block-causal document mask, compiled without
  max-autotune (as moepipe's), so that compiling fits the GPU check's time limit;
- balancing: its aux-loss-free bias is copied from moepipe's router bias (its update runs in an
  optimizer hook, outside a step); it has no sequence-wise balance loss, so the comparison runs
  moepipe with moe.seq_aux_loss_alpha = 0;
- RMSNorm eps: its norms are set to moepipe's model.norm_eps.
Not mapped (raise): MTP, YaRN, tied embeddings, DeepSeek-V2's max group scoring.

Legend: B batch, L sequence, V vocab.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from model.batch import IGNORE


def unavailable_reason() -> str | None:
    """None when torchtitan's DeepSeek-V3 model can be imported, else why not (one line)."""
    try:
        import torchtitan.models.deepseek_v3  # noqa: F401
    except Exception as exc:  # torchtitan, triton or one of their imports missing
        return f"torchtitan's DeepSeek-V3 model is not importable ({type(exc).__name__}: {exc})"
    return None


def adaptations(device: torch.device, dtype: torch.dtype) -> list[str]:
    """One line per change made to torchtitan's model for this comparison."""
    lines = []
    if dtype != torch.bfloat16:
        lines.append("torchtitan experts: its forward casts to bf16; replaced by the same grouped GEMMs in "
                     f"{str(dtype).replace('torch.', '')}")
    if device.type == "cuda":
        lines.append("torchtitan attention: flex_attention with its document mask, compiled without max-autotune")
    else:
        lines.append("torchtitan attention: its SDPA inner attention, plain causal (its flex backward cannot run "
                     "on CPU); exact here, one document per row")
    lines.append("torchtitan balancing: no sequence-wise balance loss, so moepipe runs with "
                 "moe.seq_aux_loss_alpha = 0; router bias copied (its update is an optimizer hook)")
    lines.append("torchtitan RMSNorm eps set to moepipe's model.norm_eps")
    lines.append("loss: each model its own; torchtitan's cross_entropy_loss (F.cross_entropy on fp32 logits, "
                 "summed) / non-ignored targets, as its trainer normalises it")
    return lines


def check_mappable(cfg) -> None:
    """Raise for a moepipe config the peer cannot express."""
    bad = {"mtp.depth": (cfg.mtp.depth, "0"), "attention.yarn": (cfg.attention.yarn, "unset"),
           "model.tie_embeddings": (cfg.model.tie_embeddings, "false")}
    for field, (value, want) in bad.items():
        if value:
            raise ValueError(f"{field} = {value!r}: the torchtitan peer maps only {field} {want}")
    if cfg.moe.n_group > 1 and cfg.moe.topk_group < cfg.moe.n_group and cfg.moe.group_scoring != "top2_sum":
        raise ValueError(f"moe.score_func = {cfg.moe.score_func!r} scores groups by max; torchtitan scores "
                         "them by the top-2 sum: use sigmoid or no group limit")


def titan_config(cfg, device: torch.device):
    """torchtitan's DeepSeekV3Model.Config at the dimensions of moepipe config `cfg`."""
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model
    from torchtitan.models.deepseek_v3 import build_mla_moe_layers

    check_mappable(cfg)
    m, att, moe = cfg.model, cfg.attention, cfg.moe
    no_init = {"weight": nn.init.zeros_}   # never run: every weight is copied from moepipe
    limited = moe.n_group > 1 and moe.topk_group < moe.n_group
    layers = build_mla_moe_layers(
        n_layers=m.num_layers, n_dense_layers=m.first_k_dense, dim=m.hidden_size, n_heads=att.num_heads,
        q_lora_rank=att.q_lora_rank, kv_lora_rank=att.kv_lora_rank, qk_nope_head_dim=att.qk_nope_head_dim,
        qk_rope_head_dim=att.qk_rope_head_dim, v_head_dim=att.v_head_dim, mscale=1.0,
        dense_hidden_dim=m.dense_ffn_size, moe_hidden_dim=moe.expert_ffn_size, num_experts=moe.num_experts,
        num_shared_experts=max(moe.num_shared_experts, 1), router_top_k=moe.topk, router_score_func=moe.score_func,
        router_num_expert_groups=moe.n_group if limited else None,
        router_num_limited_groups=moe.topk_group if limited else None,
        router_route_scale=moe.routed_scaling_factor, router_route_norm=moe.normalize_weights,
        attn_backend="flex", moe_comm_backend="standard", non_blocking_capacity_factor=None,
        linear_init=no_init, norm_init=no_init, depth_init=lambda layer: no_init,
        depth_experts_init=lambda layer: {},
        rope=ComplexRoPE.Config(dim=att.qk_rope_head_dim, max_seq_len=m.max_seq_len, theta=att.rope_theta))
    for layer in layers:
        if device.type != "cuda":
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
        if layer.moe is not None and moe.num_shared_experts == 0:
            layer.moe.shared_experts = None
    return DeepSeekV3Model.Config(
        vocab_size=m.vocab_size, dim=m.hidden_size,
        tok_embeddings=Embedding.Config(num_embeddings=m.vocab_size, embedding_dim=m.hidden_size),
        norm=RMSNorm.Config(normalized_shape=m.hidden_size),
        lm_head=Linear.Config(in_features=m.hidden_size, out_features=m.vocab_size),
        layers=layers, mtp_layers=[])


def same_dtype_experts_class():
    """torchtitan's GroupedExperts with its forward in the input's dtype (its own casts to bf16)."""
    from torchtitan.models.common.moe import GroupedExperts

    class SameDtypeExperts(GroupedExperts):
        def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
            offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
            gate_RF = torch._grouped_mm(x_RD, self.w1_EFD.transpose(-2, -1), offs=offsets_E)
            up_RF = torch._grouped_mm(x_RD, self.w3_EFD.transpose(-2, -1), offs=offsets_E)
            h_RF = torch.nn.functional.silu(gate_RF) * up_RF
            return torch._grouped_mm(h_RF, self.w2_EDF.transpose(-2, -1), offs=offsets_E)
    return SameDtypeExperts


def use_compiled_flex_without_autotune() -> None:
    """torchtitan compiles flex_attention with max-autotune (minutes of tuning); compile it plainly."""
    from torch.nn.attention.flex_attention import flex_attention
    from torchtitan.models.common.attention import FlexAttention
    FlexAttention._compiled_flex_attn = torch.compile(flex_attention)


def weight_map(cfg) -> dict[str, str]:
    """moepipe parameter/buffer name -> torchtitan name, for every weight of both models."""
    att_names = ["wq_a", "q_norm", "wq_b"] if cfg.attention.q_lora_rank > 0 else ["wq"]
    att_names += ["wkv_a", "kv_norm", "wkv_b", "wo"]
    swiglu = {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}
    out = {"embed.weight": "tok_embeddings.weight", "norm.weight": "norm.weight", "head.weight": "lm_head.weight"}
    for i in range(cfg.model.num_layers):
        ours, theirs = f"layers.{i}", f"layers.{i}"
        out[f"{ours}.attn_norm.weight"] = f"{theirs}.attention_norm.weight"
        out[f"{ours}.ffn_norm.weight"] = f"{theirs}.ffn_norm.weight"
        for name in att_names:
            out[f"{ours}.attn.{name}.weight"] = f"{theirs}.attention.{name}.weight"
        if i < cfg.model.first_k_dense:
            for a, b in swiglu.items():
                out[f"{ours}.ffn.{a}.weight"] = f"{theirs}.feed_forward.{b}.weight"
            continue
        out[f"{ours}.ffn.router.gate.weight"] = f"{theirs}.moe.router.gate.weight"
        out[f"{ours}.ffn.router.bias"] = f"{theirs}.moe.expert_bias_E"
        experts = {"w_gate": "w1_EFD", "w_up": "w3_EFD", "w_down": "w2_EDF"}
        for a, b in experts.items():
            out[f"{ours}.ffn.experts.{a}"] = f"{theirs}.moe.routed_experts.inner_experts.{b}"
        if cfg.moe.num_shared_experts > 0:
            for a, b in swiglu.items():
                out[f"{ours}.ffn.shared.{a}.weight"] = f"{theirs}.moe.shared_experts.{b}.weight"
    return out


@torch.no_grad()
def copy_weights(ours: nn.Module, titan: nn.Module, cfg) -> None:
    """Copy every moepipe weight into torchtitan's model; raise if either side has one unmapped."""
    src = dict(ours.named_parameters()) | dict(ours.named_buffers())
    dst = dict(titan.named_parameters()) | {k: v for k, v in titan.named_buffers() if k.endswith("expert_bias_E")}
    names = weight_map(cfg)
    if set(names) != set(src) - {"rope_cos", "rope_sin"} or set(names.values()) != set(dst):
        raise AssertionError(f"weight map incomplete: moepipe unmapped {sorted(set(src) - set(names))[:5]}, "
                             f"torchtitan unmapped {sorted(set(dst) - set(names.values()))[:5]}")
    for a, b in names.items():
        if src[a].shape != dst[b].shape:
            raise AssertionError(f"{a} {tuple(src[a].shape)} vs {b} {tuple(dst[b].shape)}")
        dst[b].copy_(src[a])


def build_titan(cfg, ours: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """torchtitan's model at cfg's dimensions, on device in dtype, holding the weights of `ours`."""
    titan = titan_config(cfg, device).build()
    if dtype != torch.bfloat16:
        experts_cls = same_dtype_experts_class()
        for mod in titan.modules():
            if isinstance(mod, experts_cls.__base__):
                mod.__class__ = experts_cls
    if device.type == "cuda":
        use_compiled_flex_without_autotune()
    for mod in titan.modules():
        if isinstance(mod, nn.RMSNorm):
            mod.eps = cfg.model.norm_eps
    # cast real floating tensors only: the RoPE cache is complex and .to(dtype) would drop its imaginary part
    titan = titan.to(device)._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
    copy_weights(ours, titan, cfg)
    titan.train()
    return titan


def titan_loss(titan: nn.Module, batch, device: torch.device) -> Tensor:
    """Forward + torchtitan's cross-entropy, mean over non-ignored targets (document mask through
    positions on CUDA only)."""
    from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss

    assert IGNORE_INDEX == IGNORE, "both must skip the same targets"
    if device.type == "cuda":
        logits_BLV = titan(batch.tokens, batch.positions, titan.get_attention_masks(batch.positions))
    else:
        logits_BLV = titan(batch.tokens)
    return cross_entropy_loss(logits_BLV, batch.labels) / (batch.labels != IGNORE_INDEX).sum()
