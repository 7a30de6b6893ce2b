"""The planner's time model: one training step of a layout, from FLOP and byte counts.

- Compute: the FLOPs of each pipeline stage per micro-batch (trainer.plan.flops: 2 per activated
  matmul parameter and token forward, 4 backward, split evenly into the input-gradient I and
  weight-gradient W halves; the attention core 2 H (d_qk + d_v) c per token forward, 4 backward,
  all in I) at the table's peak times an efficiency; FP8 runs the matmuls at the FP8 peak.
  Full recomputation adds one forward to every backward.
- All-to-all (DeepSeek-V3 section 3.2.2): per MoE layer, dispatch and combine move each
  token's hidden state to the ranks of its K experts and back, forward and backward. With
  node-limited dispatch a token crosses to each remote node it needs once (at most topk_group
  nodes) and fans out over NVLink there; the inter-node and NVLink parts run at the same time.
  Dispatch is FP8 with FP8 on, combine bf16.
- Pipeline: the simulator (parallel.pipeline.simulate) replays the schedule with these costs.
  With `parallel.overlap` on (ep > 1) every F&B pair hides one micro-batch's all-to-all behind
  the other's compute (`Costs.from_overlap`): DualPipe's and DualPipeV's pairs, and the
  steady-state pairs of paired 1F1B / ZB1P (`schedules.paired_1f1b`), which are replayed as
  such; so is pp = 1 (F0, F1&B0, ..., B(N-1)). Off, every action pays compute + all-to-all. The
  shared experts' overlap with the dispatch inside one micro-batch is not modelled. The activation
  hand-off between stages is the replay's latency. Stages differ in cost: the replay uses the
  most expensive stage for every action, so an unbalanced layout pays for its slowest stage.
- Data parallel (ZeRO-1): reduce-scatter of fp32 gradients and all-gather of fp32 parameters
  over dp (dense) and edp (experts), counted as not overlapped.

Legend: T tokens of a micro-batch, D hidden, K experts per token, G ep ranks per node.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from parallel.pipeline.schedules import build_schedule
from parallel.pipeline.simulate import Costs, replay
from trainer.plan.flops import attention_context, block_param_counts
from trainer.plan.hardware import GPU, Efficiency

OVERLAP_SCHEDULES = ("dualpipe", "dualpipev")   # F&B pairs are part of the schedule
PAIRED_SCHEDULES = ("1f1b", "zb1p")             # F&B pairs with parallel.overlap on (paired_1f1b)


@dataclass
class StageWork:
    """Seconds of one micro-batch through one stage."""

    f: float          # forward compute
    i: float          # input-gradient backward compute
    w: float          # weight-gradient backward compute
    comm: float       # all-to-all of the forward (the backward moves the same bytes)


def stage_flops(cfg, blocks: list[int], head: bool, seq_len: int) -> tuple[float, float]:
    """(matmul, attention-core) forward FLOPs per token of one stage."""
    a, m = cfg.attention, cfg.model
    attn = 2.0 * a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * attention_context(seq_len)
    n_moe = sum(i >= m.first_k_dense for i in blocks)
    mm = 2.0 * (n_moe * block_param_counts(cfg, True)[1] + (len(blocks) - n_moe) * block_param_counts(cfg, False)[1])
    core = attn * len(blocks)
    if head:
        depth = cfg.mtp.depth
        mtp_moe = m.first_k_dense < m.num_layers
        mm += 2.0 * (1 + depth) * m.hidden_size * m.vocab_size
        mm += 2.0 * depth * (2 * m.hidden_size ** 2 + block_param_counts(cfg, mtp_moe)[1])
        core += attn * depth
    return mm, core


def moe_layers(cfg, blocks: list[int], head: bool) -> int:
    m = cfg.model
    n = sum(i >= m.first_k_dense for i in blocks)
    return n + (cfg.mtp.depth if head and m.first_k_dense < m.num_layers else 0)


def a2a_rows(cfg, ep: int, gpus_per_node: int, node_limited: bool) -> tuple[float, float]:
    """(inter-node, intra-node) copies of one token that a rank sends in one dispatch."""
    if ep == 1:
        return 0.0, 0.0
    K, G = cfg.moe.topk, min(ep, gpus_per_node)
    nodes = max(1, ep // gpus_per_node)

    def distinct(bins: int, balls: float) -> float:
        return bins * (1.0 - (1.0 - 1.0 / bins) ** balls)

    hit = min(distinct(nodes, K), cfg.moe.topk_group, nodes) if nodes > 1 else 1.0
    per_node_gpus = distinct(G, K / hit)
    if node_limited and nodes > 1:   # once per remote node, then a fan-out inside every node reached
        return hit * (nodes - 1) / nodes, hit * per_node_gpus * (G - 1) / G
    # one hop: a copy per destination GPU; 1 / nodes of the nodes reached is my own
    return hit * (nodes - 1) / nodes * per_node_gpus, hit / nodes * per_node_gpus * (G - 1) / G


def a2a_seconds(cfg, tokens: int, ep: int, gpus_per_node: int, gpu: GPU, eff: Efficiency, fp8: bool,
                node_limited: bool = True) -> float:
    """Forward all-to-all time of one MoE layer: dispatch (fp8 or bf16) + combine (bf16)."""
    inter, intra = a2a_rows(cfg, ep, gpus_per_node, node_limited)
    row = cfg.model.hidden_size * ((1 if fp8 else 2) + 2)
    t_net = tokens * inter * row / (gpu.net_gbps * 1e9 * eff.net)
    t_nvl = tokens * intra * row / (gpu.nvlink_gbps * 1e9 * eff.nvlink)
    return max(t_net, t_nvl)


def stage_work(cfg, blocks: list[int], head: bool, tokens: int, seq_len: int, *, ep: int, gpus_per_node: int,
               gpu: GPU, eff: Efficiency, fp8: bool, recompute: str) -> StageWork:
    mm, core = stage_flops(cfg, blocks, head, seq_len)
    t_mm = tokens * mm / ((gpu.peak_fp8 if fp8 else gpu.peak_bf16) * 1e12 * eff.gemm)
    t_core = tokens * core / (gpu.peak_bf16 * 1e12 * eff.attention)
    f = t_mm + t_core
    i, w = t_mm + 2 * t_core, t_mm
    if recompute == "full":
        i += f
    comm = moe_layers(cfg, blocks, head) * a2a_seconds(cfg, tokens, ep, gpus_per_node, gpu, eff, fp8,
                                                        cfg.parallel.node_limited_dispatch)
    return StageWork(f, i, w, comm)


def stage_costs(work: StageWork, overlap: bool, p2p: float) -> Costs:
    """Costs of one stage; `overlap`: F&B pairs hide one micro-batch's all-to-all (parallel.overlap on)."""
    if overlap:
        return Costs.from_overlap(work.f, work.comm, work.i + work.w, work.comm,
                                  w_share=work.w / (work.i + work.w), latency=p2p)
    return Costs(F=work.f + work.comm, I=work.i + work.comm, W=work.w, latency=p2p)


@lru_cache(maxsize=256)
def _schedule(name: str, pp: int, n: int, paired: bool):
    return build_schedule(name, pp, n, paired=paired)


@lru_cache(maxsize=4096)
def _replay_units(name: str, pp: int, n: int, i: float, w: float, fb: float | None, lat: float,
                  paired: bool) -> tuple[float, float]:
    rp = replay(_schedule(name, pp, n, paired), Costs(1.0, i, w, fb, lat))
    return rp.makespan, max(rp.busy(r) for r in range(pp))


def pipeline_seconds(schedule: str, pp: int, n: int, costs: Costs, paired: bool = False) -> tuple[float, float]:
    """(makespan, busy time of the busiest rank) of the replay; costs are rounded to 5% of F so
    that near-equal layouts share one replay. `paired`: 1F1B / ZB1P (and pp = 1) as F&B pairs."""
    if pp == 1:  # F0, (N-1) x F&B, B(N-1) when paired; N x (F + B) otherwise
        t = costs.F + (n - 1) * costs.pair() + costs.B if paired else n * (costs.F + costs.B)
        return t, t
    f = costs.F
    r = lambda x: round(x / f * 20) / 20  # noqa: E731
    fb = None if costs.FB is None else r(costs.FB)
    span, busy = _replay_units(schedule, pp, n, r(costs.I), r(costs.W), fb, r(costs.latency),
                               paired and schedule in PAIRED_SCHEDULES)
    return f * span, f * busy


def dp_seconds(dense_elems: int, expert_elems: int, dp: int, ep: int, gpus_per_node: int, gpu: GPU,
               eff: Efficiency) -> float:
    """ZeRO-1 reduce-scatter of fp32 gradients plus all-gather of fp32 parameters."""
    def ring(elems: int, size: int, crosses: bool) -> float:
        if size == 1:
            return 0.0
        bw = (gpu.net_gbps * eff.net if crosses else gpu.nvlink_gbps * eff.nvlink) * 1e9
        return 2 * 4 * elems * (size - 1) / size / bw
    edp = dp // ep
    return ring(dense_elems, dp, dp > gpus_per_node) + ring(expert_elems, edp, ep >= gpus_per_node or dp > gpus_per_node)
