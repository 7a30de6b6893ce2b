"""Pipeline x ZeRO-1 data x expert parallelism (DeepSeek-V3, arXiv 2412.19437, section 3.2.1).

Every rank builds ONE model holding the blocks of all its pipeline stages
(`parallel.pipeline.model_stage.build_union_chunks`): parameter names are the single-process
ones, so ZeRO-1, checkpoints and the router-bias update work on it unchanged; the runtime's
chunks are views of it (DualPipeV's two chunks on rank 0 share one `embed.weight`). Per step:

1. every pp rank of a dp replica gets the same N micro-batches (its stream reads the same dp
   rank); the schedule runs them through the chunks, each forward piece under the autocast /
   FP8 context;
2. parameters held on several pp ranks (the embedding the head stage keeps for MTP, every
   parameter of DualPipe's two model copies) get their gradients summed over the pp group;
3. losses (lm / MTP from the head stage, balance losses from every stage) and expert loads
   are summed over the pp group, so every rank logs and applies the same values.

ZeRO-1's grad norm sums squares over dp and pp; a parameter held by k pp ranks would count k
times, so `PipelineZeroAdamW` leaves such copies out of the norm on all but the lowest holder.
Everything after the step's forward and backward is the ZeRO engine's (`parallel.engine.zero`).
With `parallel.overlap` on (ep > 1) the chunks run in pieces and every schedule's F&B pairs
(DualPipe's, and 1F1B's / ZB1P's steady state, `schedules.paired_1f1b`) overlap one
micro-batch's all-to-alls with the other's compute (`parallel.pipeline.overlap`).
Validation runs each micro-batch forward-only through the stages in order
(`parallel.pipeline.forward_only`); the losses come out on the rank of the head stage.

Legend: N micro-batches per step (train.grad_accum, or what the global batch schedule gives the step), E routed experts.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.batch import Batch
from model.provider import LayerProvider
from parallel.data_parallel import ZeroAdamW
from parallel.engine.base import ForwardContext, StepMetrics
from parallel.engine.chunk import StageInfo, TrainChunk
from parallel.engine.zero import ZeroEngine
from parallel.expert import AllToAllDispatcher, parallelize_experts
from parallel.pipeline.forward_only import forward_in_stage_order
from parallel.pipeline.layout import describe_layout
from parallel.pipeline.model_stage import ModelChunk, build_union_chunks, model_layout, ranks_of_stages
from parallel.pipeline.overlap import OverlapModelChunk, OverlapPairExecutor
from parallel.pipeline.policies import apply_stage_compile, apply_stage_recompute, describe_paths
from parallel.pipeline.runtime import PairExecutor, PipelineRuntime, reduce_shared_grads
from parallel.pipeline.schedules import Schedule, build_schedule, smallest_micro
from parallel.precision import DTYPES, cast_params_
from parallel.topology import Topology

log = logging.getLogger("moepipe")


class PipelineZeroAdamW(ZeroAdamW):
    """ZeRO-1 whose grad norm counts a parameter held by several pp ranks once.

    `skip_in_norm`: names this rank holds that a lower pp rank holds too (after
    `reduce_shared_grads` all copies carry the same total gradient)."""

    def __init__(self, model, topology, *, skip_in_norm: set[str], **kwargs):
        super().__init__(model, topology, **kwargs)
        self.duplicates = skip_in_norm  # their ZeRO state is checkpointed by the lowest pp holder
        self._norm_masks = []
        for b in self.buckets:
            skipped = [(p, off) for name, p, off in b.params if name in skip_in_norm]
            if not skipped:
                self._norm_masks.append(None)
                continue
            flat = torch.ones(b.numel, dtype=torch.float32, device=b.master.device)
            for p, off in skipped:
                flat[off:off + p.numel()] = 0.0
            self._norm_masks.append(b.my_slice(flat).clone())

    def grad_norm(self) -> float:
        kept = [b.grad for b in self.buckets]
        for b, mask in zip(self.buckets, self._norm_masks):
            if mask is not None:
                b.grad = b.grad * mask
        try:
            return super().grad_norm()
        finally:
            for b, g in zip(self.buckets, kept):
                b.grad = g


def held_lower(model: nn.Module, topology: Topology) -> set[str]:
    """Names of `model`'s parameters that a lower pp rank of my pipeline holds as well."""
    names = sorted(n for n, _ in model.named_parameters())
    gathered = [None] * topology.pp
    dist.all_gather_object(gathered, names, group=topology.group("pp"))
    lower = set().union(*map(set, gathered[:topology.pp_rank]))
    return {n for n in names if n in lower}


class PipelineEngine(ZeroEngine):
    """One rank's pipeline: the runtime runs the schedule's actions on this rank's chunks.

    A step may bring another number of micro-batches than the last (a batch-size ramp): the
    engine then runs the same chunks under the schedule for that count, one runtime per count
    (`make_runtime(n)`), kept so that each keeps its message-shape caches in step on all ranks."""

    def __init__(self, model: nn.Module, zero: ZeroAdamW, topology: Topology, device: torch.device,
                 make_context: ForwardContext, dispatcher: AllToAllDispatcher | None, runtime: PipelineRuntime,
                 batches: list[Batch], num_experts: int, make_runtime=None):
        super().__init__(model, zero, topology, device, make_context, dispatcher)
        self.runtime, self.batches, self.num_experts = runtime, batches, num_experts
        self._runtimes = {runtime.schedule.num_micro: runtime}
        self._make_runtime = make_runtime

    def use_micro_batches(self, n: int) -> None:
        """Run the next steps with `n` micro-batches (same on every rank of the pipeline)."""
        if n not in self._runtimes:
            if self._make_runtime is None:
                raise ValueError(f"this pipeline runs {self.runtime.schedule.num_micro} micro-batches per step, "
                                 f"not {n}")
            self._runtimes[n] = self._make_runtime(n)
        self.runtime = self._runtimes[n]

    def eval_forward(self, batch: Batch):
        """The head stage's output on its rank, None on the others (every pp rank calls it)."""
        topo = self.topology
        self.zero.wait_params()
        stages = [chunk.inner.model for chunk in self.runtime.chunks]
        return forward_in_stage_order(self.runtime.schedule.placement, topo.pp_rank, stages, batch, self.make_context,
                                      topo.ranks("pp"), topo.group("pp"), self.device)

    def forward_backward(self, batches: list[Batch]) -> StepMetrics:
        topo = self.topology
        self.use_micro_batches(len(batches))
        self.batches[:] = self.step_batches(batches)  # the chunks' inputs, with the step's counts
        self.runtime.run()
        reduce_shared_grads([self.model], topo.pp_rank, topo.pp, topo.ranks("pp"), topo.group("pp"))
        out = self._pp_metrics()
        self.runtime.infos.clear()
        self.batches.clear()
        return out

    def _pp_metrics(self) -> StepMetrics:
        """Losses (shares summed over micro-batches) and expert loads (sums), equal on every pp rank."""
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, lm, mtp, balance
        counts = torch.zeros(self.model.n_moe_layers, self.num_experts, device=self.device)
        for info in self.runtime.infos.values():
            if isinstance(info, StageInfo):
                b = info.balance_loss.double()
                sums += torch.stack([b, b.new_zeros(()), b.new_zeros(()), b])
            else:
                sums += torch.stack([info.loss.detach(), info.lm_loss, info.mtp_loss, info.balance_loss]).double()
            counts += info.expert_counts
        group = self.topology.group("pp")
        dist.all_reduce(sums, group=group)
        if counts.numel():
            dist.all_reduce(counts, group=group)
        loss, lm, mtp, balance = sums.tolist()  # shares of the step's losses, summed
        return StepMetrics(loss=loss, lm_loss=lm, mtp_loss=mtp, balance_loss=balance, expert_counts=counts)


def pipeline_schedule(cfg, topology: Topology, n: int | None = None) -> Schedule:
    """The configured schedule for `n` micro-batches (default: train.grad_accum, or the schedule's
    smallest count when train.global_batch decides it); ValueError naming the fields when it cannot run here."""
    name = cfg.parallel.schedule
    if n is None:
        batch_set = cfg.train.global_batch or "train.global_batch" in cfg.schedule.phases
        n = max(cfg.train.grad_accum, smallest_micro(name, topology.pp)) if batch_set else cfg.train.grad_accum
    try:
        schedule = build_schedule(name, topology.pp, n, paired=cfg.parallel.overlap_on(topology.ep))
    except ValueError as e:
        raise ValueError(f"parallel.schedule = {name!r} with parallel.pp = {topology.pp} and "
                         f"train.grad_accum = {n} (micro-batches per step): {e}") from None
    if cfg.model.num_layers < schedule.placement.num_stages:
        raise ValueError(f"model.num_layers = {cfg.model.num_layers}: {name} at parallel.pp = {topology.pp} "
                         f"has {schedule.placement.num_stages} stages and needs at least one block each")
    return schedule


def apply_stage_policies(model: nn.Module, cfg, device: torch.device, split_w: bool) -> None:
    """`train.recompute` (selective; full is the chunks') and `train.compile` on the rank's
    model, after its experts are sharded; logs the path each layer type took (`split_w`: the
    linears defer their weight gradients)."""
    apply_stage_recompute(model, cfg.train.recompute)
    if cfg.train.compile:
        apply_stage_compile(model, device)
    for kind, path in describe_paths(cfg, split_w).items():
        log.info("pipeline %s: %s", kind, path)


def build_pipeline_engine(cfg, topology: Topology, device: torch.device, provider: LayerProvider | None,
                          make_context: ForwardContext) -> PipelineEngine:
    """Union model, chunks, ZeRO-1 and the runtime of a pp > 1 rank."""
    schedule = pipeline_schedule(cfg, topology)
    layout = model_layout(cfg, schedule.placement.num_stages)
    log.info("pipeline stages (%s, %s):\n%s", schedule.name, "parallel.layout" if cfg.parallel.layout else "even split",
             describe_layout(layout, ranks_of_stages(schedule), cfg.mtp.depth))
    has_w = any(a.op == "W" for acts in schedule.compute for a in acts)
    # F&B pairs overlap their all-to-alls only when there are some (ep > 1); 1F1B / ZB1P are then paired
    overlap = cfg.parallel.overlap_on(topology.ep)
    batches: list[Batch] = []
    model, chunks = build_union_chunks(cfg, schedule, topology.pp_rank, batches, split_w=has_w, provider=provider,
                                       chunk_cls=OverlapModelChunk if overlap else ModelChunk)
    model.to(device)
    dispatcher = None
    if topology.ep > 1:
        node_limited = cfg.parallel.node_limited_dispatch
        dispatcher = (parallelize_experts(model, topology, node_limited=node_limited) if model.moe_modules()
                      else AllToAllDispatcher(cfg.moe.num_experts, topology, node_limited))
    apply_stage_policies(model, cfg, device, split_w=has_w and provider is None)
    zero = PipelineZeroAdamW.from_config(model, topology, cfg.optim, skip_in_norm=held_lower(model, topology),
                                         grad_scale=1.0)
    cast_params_(model, DTYPES[cfg.train.param_dtype])  # after ZeRO took its fp32 masters
    if not cfg.train.compile:  # a pre-hook inside a compiled piece would break its graph
        zero.defer_gather(model)
    train_chunks = [TrainChunk(c, make_context) for c in chunks]

    def make_runtime(n: int) -> PipelineRuntime:
        return PipelineRuntime(schedule if n == schedule.num_micro else pipeline_schedule(cfg, topology, n),
                               topology.pp_rank, train_chunks, group_ranks=topology.ranks("pp"),
                               group=topology.group("pp"), device=device,
                               pair=OverlapPairExecutor() if overlap else PairExecutor(),
                               loss_scale=1.0)  # each loss is its share of the step's already
    return PipelineEngine(model, zero, topology, device, make_context, dispatcher, make_runtime(schedule.num_micro),
                          batches, cfg.moe.num_experts, make_runtime)
