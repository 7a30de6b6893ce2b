"""The planner's search: every layout the trainer accepts for a cluster, its memory and its step time.

A layout is pipeline x data x expert parallelism as `parallel.topology` arranges ranks (world =
pp x dp, ep | dp, no tensor parallelism; DeepSeek-V3 section 3.1), a schedule, the blocks of
each stage (proposed by `parallel.pipeline.layout.balanced_layout` from per-block time), and
per-rank settings: micro-batch size and count (global batch = dp x micro-batch x count),
recomputation, FP8, bf16 AdamW moments. Candidates go through the trainer's own validation
(`Config.validate`, `plan_layout`). Memory per rank is `trainer.plan.memory` with the
schedule's peak of micro-batches in flight, time is `trainer.plan.timing`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache

from parallel.pipeline.layout import balanced_layout, num_stages
from parallel.pipeline.schedules import (SCHEDULE_NAMES, check_sizes, dualpipe, dualpipev, one_f_one_b,
                                         paired_1f1b, zb1p)
from parallel.topology import plan_layout
from trainer.config import ConfigError
from trainer.plan.flops import flops_per_token
from trainer.plan.hardware import GIB, GPU, Efficiency
from trainer.plan.memory import (BF16, FP32, activation_model, gather_bytes, param_inventory, rank_params,
                                 recompute_peak_bytes, save_bytes, stage_activation_bytes, static_bytes)
from trainer.plan.timing import (PAIRED_SCHEDULES, dp_seconds, pipeline_seconds, stage_costs,
                               stage_flops, stage_work)

MICRO_BATCH_SIZES = (1, 2, 4)
RECOMPUTE = ("none", "full")
COMPONENTS = ("weights", "grads", "master", "moments", "activations", "a2a_buffers", "gather", "save", "reserved")


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int
    gpu: GPU
    seq_len: int
    global_batch: int
    eff: Efficiency = Efficiency()


@dataclass(frozen=True)
class Candidate:
    pp: int
    dp: int
    ep: int
    schedule: str
    micro_batch: int
    num_micro: int
    recompute: str
    fp8: bool
    bf16_moments: bool
    layout: tuple[tuple[int, ...], ...]

    @property
    def key(self) -> tuple:
        """What makes two candidates the same parallel layout (the rest are per-rank settings)."""
        return (self.pp, self.dp, self.ep, self.schedule)

    def overrides(self) -> str:
        counts = ",".join(str(len(b)) for b in self.layout)
        return (f"parallel.pp={self.pp} parallel.ep={self.ep} parallel.schedule={self.schedule} "
                f"parallel.layout=[{counts}] train.micro_batch_size={self.micro_batch} "
                f"train.grad_accum={self.num_micro} fp8.enabled={str(self.fp8).lower()} "
                f"optim.bf16_moments={str(self.bf16_moments).lower()}")


@dataclass
class Estimate:
    cand: Candidate
    memory: dict[str, float]          # bytes of the fullest rank, by component
    rank: int                         # that rank
    budget: float
    step_s: float = 0.0
    tokens_per_s_gpu: float = 0.0
    mfu: float = 0.0
    bubble: float = 0.0               # share of the pipeline makespan idle on the busiest rank
    notes: list[str] = field(default_factory=list)
    host: float = 0.0                 # host bytes of that rank: an async save's staging copy

    @property
    def total(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def reason(self) -> str:
        """Why it does not fit: the total against the budget and the component that puts it over."""
        m = self.memory
        static = m["weights"] + m["grads"] + m["master"] + m["moments"] + m["reserved"]
        head = f"needs {self.total / GIB:.1f} GiB > {self.budget / GIB:.0f} GiB on pp rank {self.rank}"
        if static > self.budget:
            big = max(("weights", "grads", "master", "moments"), key=lambda k: m[k])
            return (f"{head}: weights, gradients and optimizer state alone need {static / GIB:.1f} GiB "
                    f"(largest: {big} {m[big] / GIB:.1f} GiB); add pipeline or expert parallelism")
        return (f"{head}: activations {m['activations'] / GIB:.1f} GiB (+ all-to-all buffers "
                f"{m['a2a_buffers'] / GIB:.1f}) on top of {static / GIB:.1f} GiB of state are over budget")


# ----------------------------------------------------------------------------- inputs


def check_cluster(cfg, cl: Cluster) -> None:
    """One-line ValueErrors for a GPU count no layout divides and a global batch nothing fits."""
    if cl.gpus < 1 or cl.gpus_per_node < 1:
        raise ValueError(f"--gpus {cl.gpus} --gpus-per-node {cl.gpus_per_node}: both must be >= 1")
    if cl.gpus > cl.gpus_per_node and cl.gpus % cl.gpus_per_node:
        lo = cl.gpus // cl.gpus_per_node * cl.gpus_per_node
        raise ValueError(f"--gpus {cl.gpus}: whole nodes of --gpus-per-node {cl.gpus_per_node} are needed so that "
                         f"every layout divides them; use {lo} or {lo + cl.gpus_per_node}")
    dps = [cl.gpus // pp for pp in pipeline_degrees(cfg, cl.gpus)]
    if not any(cl.global_batch % dp == 0 for dp in dps):
        step = min(dps)
        near = max(step, round(cl.global_batch / step) * step)
        raise ValueError(f"--global-batch {cl.global_batch}: no data-parallel degree of {cl.gpus} GPUs "
                         f"({', '.join(map(str, sorted(set(dps))))}) divides it into whole micro-batches; "
                         f"use a multiple of {step}, e.g. {near}")


def pipeline_degrees(cfg, gpus: int) -> list[int]:
    return [pp for pp in range(1, gpus + 1) if gpus % pp == 0 and pp <= cfg.model.num_layers]


def _ep_degrees(cfg, dp: int, gpus_per_node: int) -> list[int]:
    E = cfg.moe.num_experts
    return [ep for ep in range(1, dp + 1) if dp % ep == 0 and E % ep == 0
            and (ep % gpus_per_node == 0 or gpus_per_node % ep == 0)]


def _valid(cfg, c: Candidate, cl: Cluster) -> bool:
    """The trainer's own checks: config validation and the rank layout."""
    try:
        variant = dataclasses.replace(
            cfg, parallel=dataclasses.replace(cfg.parallel, pp=c.pp, dp=c.dp, ep=c.ep, schedule=c.schedule,
                                              layout=[list(b) for b in c.layout] if c.pp > 1 else []),
            train=dataclasses.replace(cfg.train, micro_batch_size=c.micro_batch, grad_accum=c.num_micro))
        variant.validate()
        _topology_ok(cl.gpus, c.pp, c.dp, c.ep, min(cl.gpus_per_node, cl.gpus))
    except (ValueError, ConfigError):
        return False
    return True


@lru_cache(maxsize=1024)
def _topology_ok(world: int, pp: int, dp: int, ep: int, rpn: int) -> bool:
    plan_layout(world, pp=pp, dp=dp, ep=ep, ranks_per_node=rpn)
    return True


def block_seconds(cfg, cl: Cluster) -> tuple[list[float], float]:
    """Forward time of each block and of the head + MTP (bf16), to balance stages."""
    costs = []
    for i in range(cfg.model.num_layers):
        mm, core = stage_flops(cfg, [i], False, cl.seq_len)
        costs.append(mm / cl.eff.gemm + core / cl.eff.attention)
    mm, core = stage_flops(cfg, [], True, cl.seq_len)
    return costs, mm / cl.eff.gemm + core / cl.eff.attention


def propose_layout(cfg, cl: Cluster, schedule: str, pp: int) -> tuple[tuple[int, ...], ...]:
    costs, head = block_seconds(cfg, cl)
    return tuple(map(tuple, balanced_layout(costs, num_stages(schedule, pp), last_extra=head)))


def candidates(cfg, cl: Cluster) -> list[Candidate]:
    out = []
    for pp in pipeline_degrees(cfg, cl.gpus):
        dp = cl.gpus // pp
        if cl.global_batch % dp:
            continue
        per_rank = cl.global_batch // dp
        for schedule in (SCHEDULE_NAMES if pp > 1 else ("1f1b",)):
            if num_stages(schedule, pp) > cfg.model.num_layers:
                continue
            layout = propose_layout(cfg, cl, schedule, pp)
            for ep in _ep_degrees(cfg, dp, cl.gpus_per_node):
                for mb in MICRO_BATCH_SIZES:
                    if per_rank % mb:
                        continue
                    for rc in RECOMPUTE:
                        for fp8 in (False, True):
                            for m16 in (False, True):
                                c = Candidate(pp, dp, ep, schedule, mb, per_rank // mb, rc, fp8, m16, layout)
                                if _valid(cfg, c, cl):
                                    out.append(c)
    return out


# ----------------------------------------------------------------------------- memory


def _rank_stages(c: Candidate) -> list[list[int]]:
    """Stages of each pp rank, by chunk (see parallel.pipeline.schedules placements)."""
    if c.pp == 1:
        return [[0]]
    if c.schedule == "dualpipe":
        return [[r, c.pp - 1 - r] for r in range(c.pp)]
    if c.schedule == "dualpipev":
        return [[r, 2 * c.pp - 1 - r] for r in range(c.pp)]
    return [[r] for r in range(c.pp)]


_INVENTORIES: dict[int, tuple] = {}


def _inventory(cfg):
    """param_inventory(cfg), built once per config object."""
    hit = _INVENTORIES.get(id(cfg))
    if hit is None or hit[0] is not cfg:
        hit = _INVENTORIES[id(cfg)] = (cfg, param_inventory(cfg))
    return hit[1]


def _static(cfg, c: Candidate, stages: list[int]):
    return _static_cached(id(_inventory(cfg)) and id(cfg), c.layout, tuple(stages), c.ep, c.dp, c.bf16_moments)


@lru_cache(maxsize=4096)
def _static_cached(cfg_id: int, layout, stages: tuple, ep: int, dp: int, bf16_moments: bool):
    cfg, inventory = _INVENTORIES[cfg_id]
    last = len(layout) - 1
    blocks = sorted(i for s in stages for i in layout[s])
    params = rank_params(inventory, blocks, embed=0 in stages, head=last in stages, cfg=cfg)
    param_bytes = BF16 if cfg.train.param_dtype == "bf16" else FP32
    st = static_bytes(params, ep, dp, bf16_moments, cfg.optim.weight_decay, param_bytes)
    gather = gather_bytes(params, ep, dp, cfg.optim.weight_decay, param_bytes) if dp > 1 else 0
    return st, params, gather, save_bytes(params, ep, dp, st, cfg.checkpoint.async_save, param_bytes)


@lru_cache(maxsize=4096)
def _rank_live_points(schedule: str, pp: int, n: int, rank: int, paired: bool = False):
    return live_points(_compute_lists(schedule, pp, n, paired)[rank])


@lru_cache(maxsize=256)
def _compute_lists(schedule: str, pp: int, n: int, paired: bool = False):
    """The schedule's compute actions per rank (no comms: the peak needs only their order);
    `paired`: 1F1B / ZB1P with F&B pairs (parallel.overlap on), which hold more micro-batches."""
    check_sizes(schedule, pp, n)
    if paired and schedule in PAIRED_SCHEDULES:
        return paired_1f1b(pp, n, split_w=schedule == "zb1p")
    build = {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}[schedule]
    return build(pp, n)


def live_points(compute_actions) -> tuple[tuple[int, ...], ...]:
    """Micro-batches held per chunk right after each forward, keeping only the maximal points."""
    chunks = 1 + max((c for a in compute_actions for _, _, c in a.parts()), default=0)
    live, points = [0] * chunks, set()
    for a in compute_actions:
        for op, _, chunk in a.parts():
            if op == "F":
                live[chunk] += 1
                points.add(tuple(live))
            elif op in ("B", "I"):
                live[chunk] -= 1
    return tuple(p for p in points if not any(q != p and all(x >= y for x, y in zip(q, p)) for q in points))


def memory(cfg, c: Candidate, cl: Cluster, act_bytes: int = 2, attention_core: str = "flash") -> Estimate:
    """Bytes of every pp rank; the Estimate of the fullest one."""
    tokens = c.micro_batch * cl.seq_len
    am = activation_model(cfg, cl.seq_len, attention_core)
    last = len(c.layout) - 1
    best = None
    for r, stages in enumerate(_rank_stages(c)):
        st, _, gather, save = _static(cfg, c, stages)
        acts = [stage_activation_bytes(cfg, am, list(c.layout[s]), s == last, tokens, act_bytes, c.fp8, c.recompute)
                for s in stages]
        ov = cfg.parallel.overlap_on(c.ep)
        peak = max(sum(w * k for w, k in zip(acts, point))
                   for point in _rank_live_points(c.schedule, c.pp, c.num_micro, r, ov))
        if c.recompute == "full":
            peak += recompute_peak_bytes(cfg, am, tokens, act_bytes, c.fp8)
        a2a = 0.0
        if c.ep > 1:
            pairs = 2 if ov else 1  # an overlapped F&B pair has two micro-batches' rows in flight
            a2a = 2.0 * pairs * tokens * cfg.moe.topk * cfg.model.hidden_size * act_bytes
        mem = {"weights": st.weights, "grads": st.grads, "master": st.master, "moments": st.moments,
               "activations": peak, "a2a_buffers": a2a, "gather": max(0.0, gather - peak - a2a), "save": save.device,
               "reserved": cl.eff.reserved_gib * GIB}
        est = Estimate(c, mem, r, cl.gpu.memory_bytes, host=save.host)
        if best is None or est.total > best.total:
            best = est
    return best


# ----------------------------------------------------------------------------- time


def _works(cfg, c: Candidate, cl: Cluster) -> list:
    tokens = c.micro_batch * cl.seq_len
    last = len(c.layout) - 1
    return [stage_work(cfg, list(c.layout[s]), s == last, tokens, cl.seq_len, ep=c.ep, gpus_per_node=cl.gpus_per_node,
                       gpu=cl.gpu, eff=cl.eff, fp8=c.fp8, recompute=c.recompute) for s in range(len(c.layout))]


def _dp_seconds(cfg, c: Candidate, cl: Cluster) -> float:
    _, params, _, _ = _static(cfg, c, _rank_stages(c)[0])
    dense = sum(p.numel for p in params if not p.expert)
    expert = sum(p.numel // c.ep for p in params if p.expert)
    return dp_seconds(dense, expert, c.dp, c.ep, cl.gpus_per_node, cl.gpu, cl.eff)


def lower_bound(cfg, c: Candidate, cl: Cluster) -> float:
    """Step time with no bubble and every all-to-all hidden: the compute of the busiest rank."""
    works = _works(cfg, c, cl)
    visits = len(_rank_stages(c)[0]) // (2 if c.schedule == "dualpipe" and c.pp > 1 else 1)
    slow = max(w.f + w.i + w.w for w in works)
    return c.num_micro * visits * slow + _dp_seconds(cfg, c, cl)


def timing(cfg, est: Estimate, cl: Cluster) -> Estimate:
    """Step time (replay of the schedule with the slowest stage's costs + ZeRO-1 traffic),
    tokens/s per GPU, MFU and the bubble share."""
    c = est.cand
    works = _works(cfg, c, cl)
    slow = max(works, key=lambda w: w.f + w.i + w.w + 2 * w.comm)
    tokens = c.micro_batch * cl.seq_len
    crosses = c.dp >= cl.gpus_per_node
    bw = cl.gpu.net_gbps * cl.eff.net if crosses else cl.gpu.nvlink_gbps * cl.eff.nvlink
    p2p = tokens * cfg.model.hidden_size * 2 / (bw * 1e9)
    ov = cfg.parallel.overlap_on(c.ep)
    pipe, busy = pipeline_seconds(c.schedule, c.pp, c.num_micro, stage_costs(slow, ov, p2p), paired=ov)
    step = pipe + _dp_seconds(cfg, c, cl)
    est.step_s = step
    est.tokens_per_s_gpu = cl.global_batch * cl.seq_len / step / cl.gpus
    est.mfu = flops_per_token(cfg, cl.seq_len) * est.tokens_per_s_gpu / (cl.gpu.peak_bf16 * 1e12)
    est.bubble = max(0.0, 1.0 - busy / pipe) if pipe else 0.0
    return est


def fixed_batch(cfg, global_batch: int | None = None):
    """`cfg` at one constant global batch, with micro-batches per step left to the candidates (no
    train.global_batch or its phases); with `global_batch`, that batch as train.global_batch."""
    phases = {k: v for k, v in cfg.schedule.phases.items() if k != "train.global_batch"}
    return dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, phases=phases),
                               train=dataclasses.replace(cfg.train, global_batch=global_batch or 0, grad_accum=1))


def plan(cfg, cl: Cluster, top: int = 10) -> tuple[list[Estimate], list[Estimate], int]:
    """(fitting layouts ranked by tokens/s per GPU, each with its fastest settings; the layouts
    that do not fit, each with its least memory-hungry settings and the reason; how many more
    layouts fit but cannot enter the top `top`, by their lower bound, and were not replayed).
    Ranked at `cl.global_batch` sequences per step, whatever batch the config schedules."""
    cfg = fixed_batch(cfg)
    check_cluster(cfg, cl)
    fitting: dict[tuple, list[Estimate]] = {}
    least: dict[tuple, Estimate] = {}
    for c in candidates(cfg, cl):
        est = memory(cfg, c, cl)
        if est.fits:
            fitting.setdefault(c.key, []).append(est)
        elif c.key not in least or est.total < least[c.key].total:
            least[c.key] = est
    bounds = sorted((min(lower_bound(cfg, e.cand, cl) for e in ests), k) for k, ests in fitting.items())
    ranked: list[Estimate] = []
    for bound, key in bounds:
        if len(ranked) >= top and bound >= sorted(e.step_s for e in ranked)[top - 1]:
            break
        ranked.append(_fastest(cfg, fitting[key], cl))
    ranked.sort(key=lambda e: -e.tokens_per_s_gpu)
    failed = sorted((e for k, e in least.items() if k not in fitting), key=lambda e: e.total)
    return ranked, failed, len(fitting) - len(ranked)


def _fastest(cfg, ests: list[Estimate], cl: Cluster) -> Estimate:
    """The fastest settings of one layout: replay in order of the lower bound, stop when it cannot win.
    Among equal times the one with the least memory wins."""
    bounds = sorted(((lower_bound(cfg, e.cand, cl), e.total, i) for i, e in enumerate(ests)))
    best = None
    for bound, _, i in bounds:
        if best is not None and bound >= best.step_s:
            break
        e = timing(cfg, ests[i], cl)
        if best is None or e.step_s < best.step_s:
            best = e
    return best
