"""Model architecture configs: the transformer trunk, MLA attention, DeepSeekMoE and MTP.

Field names follow the DeepSeek-V3 report (arXiv 2412.19437, sections 2.1-2.2) and the
Hugging Face `deepseek_v3` config where one exists. Each dataclass validates its own
fields in `__post_init__` and raises `ValueError("field = value: why")`; cross-section
checks live in `trainer.config.Config.validate`. Pure stdlib: no torch here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from config_fields import doc, require  # the one definition, shared by every component config

__all__ = ["AttentionConfig", "MTPConfig", "ModelConfig", "MoEConfig", "doc", "require"]

GROUP_SCORES = ("auto", "max", "top2_sum")
# YaRN keys as DeepSeek-V3's released config.json names them, with the defaults of its reference code
YARN_DEFAULTS = {"factor": None, "original_max_position_embeddings": None, "beta_fast": 32.0, "beta_slow": 1.0,
                 "mscale": 1.0, "mscale_all_dim": 0.0}


def yarn_mscale(factor: float, mscale: float) -> float:
    """sqrt(t) of YaRN (arXiv 2309.00071, section 3.4): 0.1 * mscale * ln(s) + 1, and 1 for s <= 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(kw_only=True)
class ModelConfig:
    """The transformer trunk: embedding -> layers -> RMSNorm -> output head."""

    vocab_size: int = doc(8192, "Vocabulary size (rows of the embedding and output head).")
    hidden_size: int = doc(256, "Model width d.")
    num_layers: int = doc(4, "Number of transformer blocks in the main model (MTP blocks not counted).")
    first_k_dense: int = doc(1, "The first k blocks use a dense SwiGLU FFN instead of MoE (DeepSeek-V3: 3).")
    dense_ffn_size: int = doc(512, "Inner size of the dense SwiGLU FFN (DeepSeek-V3: 18432).")
    norm_eps: float = doc(1e-6, "RMSNorm epsilon.")
    init_std: float = doc(0.006, "Std of the normal init of every weight matrix (DeepSeek-V3: 0.006).")
    max_seq_len: int = doc(256, "Longest sequence the RoPE tables are built for.")
    tie_embeddings: bool = doc(False, "Share the input embedding with the output head (DeepSeek-V3: no).")

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "dense_ffn_size", "max_seq_len"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        require(0 <= self.first_k_dense <= self.num_layers, "first_k_dense", self.first_k_dense,
                f"must be between 0 and num_layers ({self.num_layers})")
        require(self.init_std > 0, "init_std", self.init_std, "must be positive")
        require(self.norm_eps > 0, "norm_eps", self.norm_eps, "must be positive")


@dataclass(kw_only=True)
class AttentionConfig:
    """Multi-head Latent Attention (DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1.1)."""

    num_heads: int = doc(4, "Number of attention heads n_h.")
    q_lora_rank: int = doc(64, "Rank d_c' of the compressed query; 0 projects Q directly (DeepSeek-V2-Lite).")
    kv_lora_rank: int = doc(32, "Rank d_c of the joint compressed key/value latent (cached per token).")
    qk_nope_head_dim: int = doc(32, "Per-head query/key dims that carry no position (d_h).")
    qk_rope_head_dim: int = doc(16, "Per-head decoupled RoPE dims d_h^R; the rope key is shared by all heads.")
    v_head_dim: int = doc(32, "Per-head value dims.")
    rope_theta: float = doc(10000.0, "RoPE base frequency.")
    rope_scaling: dict = doc({}, "YaRN context extension of the decoupled rope key (DeepSeek-V3 section 4.3), "
                             "e.g. {type: yarn, factor: 40, original_max_position_embeddings: 4096, beta_fast: 32, "
                             "beta_slow: 1, mscale: 1.0, mscale_all_dim: 1.0}; empty = plain RoPE.")

    def __post_init__(self):
        for name in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        require(self.q_lora_rank >= 0, "q_lora_rank", self.q_lora_rank, "must be >= 0 (0 = no Q compression)")
        require(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
                self.qk_rope_head_dim, "must be a positive even number (RoPE rotates pairs)")
        require(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be positive")
        self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if not rs:
            return
        unknown = sorted(set(rs) - set(YARN_DEFAULTS) - {"type"})
        require(not unknown, "rope_scaling", rs, f"unknown keys {unknown}; known: type, {', '.join(YARN_DEFAULTS)}")
        require(rs.get("type", "yarn") == "yarn", "rope_scaling.type", rs.get("type"), "only 'yarn' is implemented")
        for key in ("factor", "original_max_position_embeddings"):
            require(key in rs, f"rope_scaling.{key}", None, "is required for YaRN")
        for key in YARN_DEFAULTS:
            value = rs.get(key, 0)
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                    f"rope_scaling.{key}", value, "must be a number")
        require(rs["factor"] >= 1, "rope_scaling.factor", rs["factor"],
                "must be >= 1 (the extended context over the original one); 1 leaves RoPE unchanged")
        require(rs["original_max_position_embeddings"] > 0, "rope_scaling.original_max_position_embeddings",
                rs["original_max_position_embeddings"], "must be positive (the pre-extension context)")
        require(rs.get("beta_fast", 32.0) > rs.get("beta_slow", 1.0) > 0, "rope_scaling.beta_slow",
                rs.get("beta_slow"), "must be positive and below beta_fast")

    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters with defaults filled in, or None for plain RoPE."""
        if not self.rope_scaling:
            return None
        return {k: self.rope_scaling.get(k, v) for k, v in YARN_DEFAULTS.items()}

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk head dim); under YaRN times t = mscale(s, mscale_all_dim)^2, the attention-temperature
        correction DeepSeek's released attention applies to the softmax scale rather than to q and k."""
        scale = 1.0 / math.sqrt(self.qk_nope_head_dim + self.qk_rope_head_dim)
        y = self.yarn
        if y and y["mscale_all_dim"]:
            scale *= yarn_mscale(y["factor"], y["mscale_all_dim"]) ** 2
        return scale


@dataclass(kw_only=True)
class MoEConfig:
    """DeepSeekMoE with auxiliary-loss-free balancing (DeepSeek-V3 sections 2.1.2, 2.1.3)."""

    num_experts: int = doc(8, "Routed experts N_r per MoE layer (DeepSeek-V3: 256).")
    num_shared_experts: int = doc(1, "Shared experts N_s, applied to every token (DeepSeek-V3: 1).")
    expert_ffn_size: int = doc(128, "Inner size of each expert's SwiGLU FFN (DeepSeek-V3: 2048).")
    topk: int = doc(2, "Routed experts K_r chosen per token (DeepSeek-V3: 8).")
    n_group: int = doc(4, "Expert groups (= nodes under expert parallelism) for group-limited routing.")
    topk_group: int = doc(2, "Groups M a token may reach (DeepSeek-V3: 4 of 8).")
    score_func: str = doc("sigmoid", "Affinity function: sigmoid (DeepSeek-V3) or softmax (DeepSeek-V2).")
    group_score: str = doc("auto", "Score of an expert group for group-limited routing: max (the group's highest affinity, "
                           "DeepSeek-V2), top2_sum (sum of its two highest biased affinities, DeepSeek-V3), or auto "
                           "(max for softmax, top2_sum for sigmoid).")
    routed_scaling_factor: float = doc(1.0, "Gate weights are normalised to sum 1, then multiplied by this (DeepSeek-V3: 2.5).")
    normalize_weights: bool = doc(True, "Normalise the chosen experts' affinities to sum 1 (DeepSeek-V3: true; DeepSeek-V2 softmax gate: false).")
    bias_update_speed: float = doc(0.001, "gamma: per-step move of each expert's balancing bias; 0 disables aux-loss-free balancing.")
    seq_aux_loss_alpha: float = doc(0.0001, "alpha of the sequence-wise balance loss; 0 disables it.")

    def __post_init__(self):
        for name in ("num_experts", "expert_ffn_size", "topk", "n_group", "topk_group"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        require(self.num_shared_experts >= 0, "num_shared_experts", self.num_shared_experts, "must be >= 0")
        require(self.topk <= self.num_experts, "topk", self.topk,
                f"must be <= num_experts ({self.num_experts})")
        require(self.num_experts % self.n_group == 0, "n_group", self.n_group,
                f"must divide num_experts ({self.num_experts})")
        require(self.topk_group <= self.n_group, "topk_group", self.topk_group,
                f"must be <= n_group ({self.n_group})")
        per_group = self.num_experts // self.n_group
        require(self.topk <= self.topk_group * per_group, "topk", self.topk,
                f"must be <= topk_group * experts per group ({self.topk_group} * {per_group}), "
                "or some tokens could not be routed")
        require(self.score_func in ("sigmoid", "softmax"), "score_func", self.score_func,
                "must be 'sigmoid' or 'softmax'")
        require(self.group_score in GROUP_SCORES, "group_score", self.group_score,
                "must be 'auto', 'max' or 'top2_sum'")
        require(self.routed_scaling_factor > 0, "routed_scaling_factor", self.routed_scaling_factor, "must be positive")
        require(self.bias_update_speed >= 0, "bias_update_speed", self.bias_update_speed, "must be >= 0")
        require(self.seq_aux_loss_alpha >= 0, "seq_aux_loss_alpha", self.seq_aux_loss_alpha, "must be >= 0")

    @property
    def group_scoring(self) -> str:
        """The group score in use: `group_score` with auto resolved by the model family."""
        if self.group_score != "auto":
            return self.group_score
        return "max" if self.score_func == "softmax" else "top2_sum"


@dataclass(kw_only=True)
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3 section 2.2)."""

    depth: int = doc(1, "Number D of sequential MTP modules; 0 disables MTP.")
    loss_weight: float = doc(0.3, "lambda: weight of the mean MTP cross-entropy in the total loss.")

    def __post_init__(self):
        require(self.depth >= 0, "depth", self.depth, "must be >= 0")
        require(self.loss_weight >= 0, "loss_weight", self.loss_weight, "must be >= 0")
