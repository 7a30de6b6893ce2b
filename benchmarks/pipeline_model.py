"""The pipeline benchmark's model mode: DeepSeek-V3 stages with expert parallelism under our
runtime's schedules and under torch.distributed.pipelining's, all-to-all latency injected
(DeepSeek-V3 sections 3.2.1 and 3.2.2).

On 4 gloo ranks, pp = 2 x ep = 2, every rank builds one model per stage placement (tiny widths,
every block MoE, MTP on the head stage; its parameters those of one single-process model) and
the runtimes that share a placement run the very same stage modules:
  1F1B placement:      ours 1f1b, ours zb1p, torch Schedule1F1B
  DualPipe placement:  ours dualpipe, ours dualpipe overlap
  DualPipeV placement: ours dualpipev, ours dualpipev overlap, torch ScheduleDualPipeV
"overlap" runs F&B pairs with the two micro-batches interleaved at their exchanges
(parallel.pipeline.overlap); the other rows run pairs serially, as torch does.

First one checked step per runtime at zero latency: the losses of every micro-batch and every
gradient (after the shared-parameter reduction) against a full model on the same rank, run
micro-batch by micro-batch with the same all-to-all dispatcher. Then, per injected latency
(`a2a_latency`), `rounds` + 1 rounds, each runtime one step per round (the first round is a
warm-up), so load changes hit all runtimes alike. A schedule that cannot run the micro-batch
count (its constructor raises ValueError) becomes a row reason instead of a crash.

`layouts` (placement -> block counts per stage, `parallel.layout`) cuts a placement's stages
unevenly, e.g. fewer blocks on the stage that also holds the output head and MTP.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from a2a_latency import LatencyInjector
from model.batch import make_batch
from model.transformer import build_model
from parallel.config import ParallelConfig
from parallel.expert import parallelize_experts
from parallel.pipeline.model_stage import build_union_chunks
from parallel.pipeline.overlap import OverlapModelChunk, OverlapPairExecutor
from parallel.pipeline.runtime import PairExecutor, PipelineRuntime, reduce_shared_grads
from parallel.pipeline.schedules import build_schedule
from parallel.topology import Topology
from pipeline_torch_stages import TorchPipeline
from trainer.config import load_config

PP, EP = 2, 2
# label -> (runtime, schedule, overlap)
RUNTIMES = {
    "ours 1f1b": ("ours", "1f1b", False),
    "ours zb1p": ("ours", "zb1p", False),
    "ours dualpipe": ("ours", "dualpipe", False),
    "ours dualpipe overlap": ("ours", "dualpipe", True),
    "ours dualpipev": ("ours", "dualpipev", False),
    "ours dualpipev overlap": ("ours", "dualpipev", True),
    "torch Schedule1F1B": ("torch", "1f1b", False),
    "torch ScheduleDualPipeV": ("torch", "dualpipev", False),
}
PLACEMENT = {"1f1b": "1f1b", "zb1p": "1f1b", "dualpipe": "dualpipe", "dualpipev": "dualpipev"}
TORCH_OF = {"1f1b": "torch Schedule1F1B", "zb1p": "torch Schedule1F1B",
            "dualpipe": "torch ScheduleDualPipeV", "dualpipev": "torch ScheduleDualPipeV"}


@dataclass
class ModelOpts:
    micro: int = 8
    rounds: int = 3
    latencies_ms: tuple = (0.0, 2.0, 5.0, 20.0)
    layers: int = 8          # 4 blocks per rank at pp = 2
    batch: int = 2
    seq: int = 64
    vocab: int = 8192
    labels: tuple = tuple(RUNTIMES)
    config: str = "configs/tiny.yaml"
    overrides: tuple = ()    # further config overrides (the test shrinks the widths)
    layouts: dict = field(default_factory=dict)  # placement -> block counts per stage; absent: even


@dataclass
class Series:
    """What one rank measured for one runtime at one latency, per round (round 0: warm-up)."""

    step: list = field(default_factory=list)       # run + shared-gradient reduction, s
    run: list = field(default_factory=list)        # the schedule alone, s
    blocked: list = field(default_factory=list)    # waiting on row exchanges, s
    timelines: list = field(default_factory=list)  # ours: [(Action, t0, t1)] per round


def bench_config(o: ModelOpts):
    """The tiny config's widths, `layers` MoE blocks, MTP; no sequence-wise balance loss (see
    pipeline_torch_stages) and no bias update (steps are repeated on unchanged weights)."""
    return load_config(o.config, [f"model.num_layers={o.layers}", "model.first_k_dense=0",
                                  f"model.vocab_size={o.vocab}", f"model.max_seq_len={o.seq}",
                                  f"data.seq_len={o.seq}", "moe.seq_aux_loss_alpha=0",
                                  "moe.bias_update_speed=0", f"parallel.pp={PP}", f"parallel.ep={EP}",
                                  *o.overrides])


def micro_batches(o: ModelOpts, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    half = o.seq // 2
    return [make_batch(torch.randint(0, o.vocab, (o.batch, o.seq), generator=g), [[half, o.seq - half]] * o.batch)
            for _ in range(o.micro)]


class OursRunner:
    """Our runtime on one schedule over given chunks; `losses` {micro: loss} of the last run."""

    def __init__(self, schedule, chunks, topo, overlap: bool):
        self.schedule, self.chunks, self.losses = schedule, chunks, {}
        pair = OverlapPairExecutor() if overlap else PairExecutor()
        self.rt = PipelineRuntime(schedule, topo.pp_rank, chunks, group_ranks=topo.ranks("pp"), pair=pair,
                                  record_timeline=True)
        self.mine = [m for m in range(schedule.num_micro) if schedule.placement.routes[m][-1][0] == topo.pp_rank]

    def run(self) -> None:
        results = self.rt.run()
        self.losses = {m: float(loss) for m, (loss, _) in zip(self.mine, results)}


def _placement_chunks(cfg, topo, batches, name: str, layout: list):
    """This rank's chunks of schedule `name`'s placement cut by `layout` ([]: even), experts sharded over ep."""
    s = build_schedule(name, PP, len(batches))
    cfg = copy.deepcopy(cfg)
    cfg.parallel.layout = list(layout)
    model, chunks = build_union_chunks(cfg, s, topo.pp_rank, batches, split_w=True)
    parallelize_experts(model, topo)
    return s, model, chunks


def build_runners(cfg, topo, batches, labels, layouts: dict | None = None) -> tuple[dict, dict]:
    """label -> runner, or -> "n/a: reason"; and label -> the model it runs (grads zeroed per step)."""
    placements, runners, models = {}, {}, {}
    for label in labels:
        kind, name, overlap = RUNTIMES[label]
        try:
            s = build_schedule(name, PP, len(batches))
            key = PLACEMENT[name]
            if key not in placements:
                placements[key] = _placement_chunks(cfg, topo, batches, key, (layouts or {}).get(key, []))
            _, model, chunks = placements[key]
            if kind == "torch":
                runners[label] = TorchPipeline(name, chunks, s.placement, batches, cfg, topo.group("pp"), topo.pp_rank)
            else:
                if overlap:
                    chunks = [OverlapModelChunk(c.model, batches, c.deferral, recompute=False) for c in chunks]
                runners[label] = OursRunner(s, chunks, topo, overlap)
            models[label] = model
        except ValueError as e:
            runners[label] = f"n/a: {' '.join(str(e).split())}"
    return runners, models


def _zero_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def _reduce(runner, topo) -> None:
    reduce_shared_grads(runner.chunks, topo.pp_rank, topo.pp, topo.ranks("pp"), topo.group("pp"))


def reference(cfg, topo, batches):
    """Losses and gradients of the whole model on this rank's micro-batches, one at a time."""
    model = build_model(cfg, layers=None)
    parallelize_experts(model, topo)
    n, losses = len(batches), {}
    for m, b in enumerate(batches):
        out = model(b)
        (out.loss / n).backward()
        losses[m] = float(out.loss.detach())
    return losses, {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def check(runner, model, topo, ref) -> dict:
    """One step: its losses and gradients against the reference's (compared in the parent)."""
    ref_losses, ref_grads = ref
    _zero_grads(model)
    dist.barrier()
    runner.run()
    _reduce(runner, topo)
    names = sorted(k for ch in runner.chunks for k, p in ch.named_parameters() if p.grad is not None)
    grad_err = max((float((p.grad - ref_grads[k]).abs().max() / ref_grads[k].abs().max().clamp(min=1e-12))
                    for ch in runner.chunks for k, p in ch.named_parameters() if p.grad is not None), default=0.0)
    loss_err = max((abs(v - ref_losses[m]) for m, v in runner.losses.items()), default=0.0)
    return {"names": sorted(set(names)), "ref_names": sorted(ref_grads), "grad_err": grad_err,
            "loss_err": loss_err, "micros": sorted(runner.losses)}


def _timed_step(runner, model, topo, lat: LatencyInjector, series: Series) -> None:
    _zero_grads(model)
    dist.barrier()
    t0, b0 = time.perf_counter(), lat.blocked_s
    runner.run()
    t1 = time.perf_counter()
    _reduce(runner, topo)
    t2 = time.perf_counter()
    series.step.append(t2 - t0)
    series.run.append(t1 - t0)
    series.blocked.append(lat.blocked_s - b0)
    if isinstance(runner, OursRunner):
        series.timelines.append(list(runner.rt.timeline))


def model_rank(rank: int, world: int, o: ModelOpts) -> dict:
    """Everything one rank measures: {"checks": {label: ...}, "series": {(ms, label): Series}}."""
    topo = Topology.from_config(ParallelConfig(pp=PP, ep=EP), world_size=world, rank=rank)
    lat = LatencyInjector().install()
    cfg = bench_config(o)
    batches = micro_batches(o, seed=topo.dp_rank)
    runners, models = build_runners(cfg, topo, batches, o.labels, o.layouts)
    live = {k: r for k, r in runners.items() if not isinstance(r, str)}
    ref = reference(cfg, topo, batches)
    checks = {label: check(r, models[label], topo, ref) for label, r in live.items()}
    series = {}
    for ms in o.latencies_ms:
        lat.delay_s = ms / 1000
        for label in live:
            series[(ms, label)] = Series()
        for _ in range(o.rounds + 1):
            for label, r in live.items():
                _timed_step(r, models[label], topo, lat, series[(ms, label)])
    lat.uninstall()
    na = {k: r for k, r in runners.items() if isinstance(r, str)}
    return {"pp_rank": topo.pp_rank, "ep_rank": topo.ep_rank, "na": na, "checks": checks, "series": series}
