"""The planner's memory model: bytes per GPU of one pipeline rank under a parallel layout.

Static bytes are exact for this trainer (checked against real ranks in tests/unit/
test_plan_memory.py and benchmarks/bench_plan.py): every rank holds its pipeline stages as one
model (DualPipe: stages r and pp-1-r of the two copies; DualPipeV: r and 2pp-1-r) with
parameters and gradients of `train.param_dtype` (fp32 or bf16, parallel.precision), routed
experts split over ep; ZeRO-1 (DeepSeek-V3 section 3.1) keeps 1/dp of the fp32 master copy and
of the AdamW moments of dense parameters and 1/edp of the expert ones, in 25 MB buckets padded to
a multiple of the group size (parallel.data_parallel). Moments are bf16 with
`optim.bf16_moments` (section 3.3.3).

Checkpoints (`save_bytes`): a sharded save writes the rank's ZeRO shards and its share of the
weights in place, so on the device it allocates at most one bucket on top of them (DCP copies a
view whose storage is larger than itself, one item at a time: tests/distributed/
test_sharded_save.py bounds a save by the shard plus one bucket); an async save
(`checkpoint.async_save`) stages a host copy of what the rank writes: its master and moment
shards, and its share (1/dp of the dense weights, 1/edp of its expert rows) of the weights.

The optimizer step's all-gathers (`gather_bytes`): after the update, each bucket's parameters
come back from the fp32 master shards straight into the parameters, which are views of one flat
buffer per bucket (padded to a multiple of the group); with bf16 parameters the rank also sends
a bf16 copy of its shard. The sends stay alive until the next forward waits for each bucket
(ZeroAdamW's `defer_gather`; with `train.compile` the step waits instead). The first
micro-batch's forward waits for them all before activations build up, so they count only where
they exceed the activations and all-to-all buffers: the "gather" term is that excess; the
padding is counted with them.

Activations are an analytic count of the tensors autograd saves per token of each block, by
module (RMSNorm saves its input, the normalised input and its output; a SwiGLU four
ffn-sized tensors; MLA the query/key/value of the attention core; MoE the dispatched rows, the
combine input and four expert-ffn-sized tensors per routed copy), times bytes per element.
`attention_core = "math"` adds the probabilities PyTorch's math attention keeps (CPU);
"flash" keeps the log-sum-exp instead (GPU). Calibrated on CPU in benchmarks/RESULTS.md.
With recomputation "full" a block keeps only its input, and one block is rebuilt at a time.
With FP8 the inputs of the GEMMs are kept in FP8 (section 3.3.4). A rank holds one
micro-batch's activations per forward still waiting for its backward: the schedule's peak.

Legend: D hidden, H heads, N/R/V nope/rope/value head dims, C kv rank, Q q rank, F dense ffn,
Fe expert ffn, S shared ffn, K experts per token, E experts, L sequence, Vocab vocabulary.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from model.experts import LocalDispatcher
from model.provider import LayerProvider
from model.transformer import DeepSeekV3
from parallel.data_parallel import ZeroAdamW

BUCKET_ELEMENTS = int(inspect.signature(ZeroAdamW.__init__).parameters["bucket_mb"].default * 2 ** 20 / 4)
FP32, BF16 = 4, 2


@dataclass(frozen=True)
class Param:
    """One parameter tensor of the full model: name, elements, matrix or not, routed expert or not."""

    name: str
    numel: int
    ndim: int
    expert: bool
    block: int | None = None   # the main-model block it belongs to (layers.<block>.)


def param_inventory(cfg) -> list[Param]:
    """Every trainable parameter of the full model in registration order (built on the meta
    device, not initialised: shapes only, any size)."""
    with torch.device("meta"):
        model = DeepSeekV3(cfg, LayerProvider(), LocalDispatcher(cfg.moe.num_experts))
    return [Param(n, p.numel(), p.ndim, ".ffn.experts." in n, int(n.split(".")[1]) if n.startswith("layers.") else None)
            for n, p in model.named_parameters() if p.requires_grad]


def rank_params(inventory: list[Param], blocks: list[int], embed: bool, head: bool, cfg) -> list[Param]:
    """The parameters one rank's union model holds (see model.transformer)."""
    keep_embed = embed or (head and (cfg.mtp.depth > 0 or cfg.model.tie_embeddings))
    held = set(blocks)
    return [p for p in inventory if (p.block in held if p.block is not None
                                     else keep_embed if p.name.startswith("embed.") else head)]


def zero_buckets(params: list[Param], ep: int, dp: int, weight_decay: float = 0.1,
                 cap: int = BUCKET_ELEMENTS) -> list[tuple[int, int]]:
    """(elements, group size) of each of ZeroAdamW's buckets: by kind and decay, reverse
    registration order, closed at `cap`; dense buckets are shared over dp, expert ones over edp."""
    spaces: dict[tuple[str, float], list[int]] = {}
    for p in params:
        kind = "edp" if p.expert else "dp"
        wd = weight_decay if p.ndim >= 2 else 0.0
        spaces.setdefault((kind, wd), []).append(p.numel // ep if p.expert else p.numel)
    return [(n, dp // ep if kind == "edp" else dp) for (kind, _), numels in spaces.items()
            for n in _bucket_sizes(list(reversed(numels)), cap)]


def zero_shard_elements(params: list[Param], ep: int, dp: int, weight_decay: float = 0.1,
                        cap: int = BUCKET_ELEMENTS) -> int:
    """Elements of this rank's ZeRO-1 shards: each bucket padded to a multiple of its group, over
    the group size."""
    return sum(math.ceil(n / size) for n, size in zero_buckets(params, ep, dp, weight_decay, cap))


def gather_bytes(params: list[Param], ep: int, dp: int, weight_decay: float = 0.1, param_bytes: int = FP32,
                 cap: int = BUCKET_ELEMENTS) -> int:
    """The optimizer step's all-gather bytes on top of the weights (module doc): each bucket's
    padding (its parameters live in one flat buffer padded to a multiple of the group), plus the
    rank's shard cast to the parameters' dtype when that is not fp32 (an fp32 master is sent as
    it is)."""
    total = 0
    for n, size in zero_buckets(params, ep, dp, weight_decay, cap):
        shard = math.ceil(n / size)
        total += param_bytes * (shard * size - n) + (param_bytes * shard if param_bytes != FP32 else 0)
    return total


def _bucket_sizes(numels: list[int], cap: int) -> list[int]:
    out, n = [], 0
    for k in numels:
        if n and n + k > cap:
            out.append(n)
            n = 0
        n += k
    if n:
        out.append(n)
    return out


@dataclass
class StaticBytes:
    weights: int
    grads: int
    master: int
    moments: int


def static_bytes(params: list[Param], ep: int, dp: int, bf16_moments: bool, weight_decay: float,
                 param_bytes: int = FP32) -> StaticBytes:
    """Weights and gradients (`param_bytes` each: 4 fp32, 2 bf16) of the held parameters, and the
    ZeRO-1 optimizer shards (fp32 master, fp32 or bf16 moments)."""
    elements = sum(p.numel // ep if p.expert else p.numel for p in params)
    shard = zero_shard_elements(params, ep, dp, weight_decay)
    return StaticBytes(weights=param_bytes * elements, grads=param_bytes * elements, master=FP32 * shard,
                       moments=2 * (BF16 if bf16_moments else FP32) * shard)


@dataclass
class SaveBytes:
    device: int     # what a sharded save allocates on the device on top of the live state
    host: int       # an async save's host staging copy of what the rank writes (0 when synchronous)


def save_bytes(params: list[Param], ep: int, dp: int, st: StaticBytes, async_save: bool,
               param_bytes: int = FP32) -> SaveBytes:
    """A checkpoint's extra memory on one rank (module doc): one fp32 bucket where the save reads
    the live tensors (the device; the host with `async_save`), plus the async save's host copy
    of its ZeRO shards and of its share of the weights."""
    bucket = FP32 * BUCKET_ELEMENTS
    if not async_save:
        return SaveBytes(device=bucket, host=0)
    dense = sum(p.numel for p in params if not p.expert)
    expert = sum(p.numel // ep for p in params if p.expert)
    share = dense / dp + expert / (dp // ep)   # replicas are written by one rank of each group of holders
    return SaveBytes(device=0, host=st.master + st.moments + math.ceil(param_bytes * share) + bucket)


# ----------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class ActivationModel:
    """Elements saved per token, split into what FP8 would store in one byte (GEMM inputs) and the rest."""

    dense_block: tuple[float, float]
    moe_block: tuple[float, float]
    head: float                 # final norm + output-head cross-entropy (fp32 logits)
    mtp: float                  # one MTP module without its block (added separately)
    logits: float               # vocab entries kept in fp32 per cross-entropy


def activation_model(cfg, seq_len: int, attention_core: str = "flash") -> ActivationModel:
    m, a, e = cfg.model, cfg.attention, cfg.moe
    D, H, N, R, V = m.hidden_size, a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
    C, Q, F = a.kv_lora_rank, a.q_lora_rank, m.dense_ffn_size
    K, E, Fe, S = e.topk, e.num_experts, e.expert_ffn_size, e.num_shared_experts * e.expert_ffn_size
    norms = 2 * 3 * D                                    # attn_norm, ffn_norm: input, normalised, output
    q_path = 3 * Q if Q else 0                           # wq_a output, q_norm's normalised and output
    core = 2 * H * (N + R) + H * V                       # q, k, v of the attention core
    core += H * seq_len if attention_core == "math" else H * V + 2 * H   # probabilities | output + lse
    attn = norms + q_path + 3 * C + R + core + H * V     # + kv latent path, rope key, wo input
    attn_gemm_in = 2 * D + Q + C + H * V                 # inputs of the projections
    dense = (attn + 4 * F, attn_gemm_in + F)
    routed = 4 * K * Fe + 3 * K * D + 2 * E + 2 * K      # experts, dispatched rows + combine, router
    moe = (attn + 4 * S + routed, attn_gemm_in + S + K * D + K * Fe)
    return ActivationModel(dense_block=dense, moe_block=moe, head=3 * D, mtp=8 * D,
                           logits=m.vocab_size)


def block_activation_bytes(am: ActivationModel, moe: bool, tokens: int, act_bytes: int, fp8: bool) -> float:
    total, gemm_in = am.moe_block if moe else am.dense_block
    if fp8:
        return tokens * ((total - gemm_in) * act_bytes + gemm_in * 1)
    return tokens * total * act_bytes


def stage_activation_bytes(cfg, am: ActivationModel, blocks: list[int], head: bool, tokens: int,
                           act_bytes: int, fp8: bool, recompute: str) -> float:
    """Saved bytes of one micro-batch of `tokens` through one stage (its blocks, and the head +
    MTP when it is the last stage)."""
    moe_of = [i >= cfg.model.first_k_dense for i in blocks]
    mtp_moe = cfg.model.first_k_dense < cfg.model.num_layers
    per_block = [block_activation_bytes(am, mo, tokens, act_bytes, fp8) for mo in moe_of]
    if recompute == "full":
        total = tokens * cfg.model.hidden_size * act_bytes * len(blocks)
    else:
        total = sum(per_block)
    if head:
        depth = cfg.mtp.depth
        total += tokens * (am.head + depth * am.mtp) * act_bytes
        total += tokens * am.logits * FP32 * (1 + depth)
        total += depth * block_activation_bytes(am, mtp_moe, tokens, act_bytes, fp8)
    return total


def recompute_peak_bytes(cfg, am: ActivationModel, tokens: int, act_bytes: int, fp8: bool) -> float:
    """With full recomputation, the one block rebuilt at a time during a backward."""
    return max(block_activation_bytes(am, mo, tokens, act_bytes, fp8) for mo in (False, True))
