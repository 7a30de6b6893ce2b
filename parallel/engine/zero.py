"""Data x expert parallelism with ZeRO-1 (DeepSeek-V3, arXiv 2412.19437, section 3.1).

Every rank builds the full single-process model with the same seeds; with ep > 1,
`parallel.expert.parallelize_experts` keeps this ep rank's experts and installs the all-to-all
dispatcher; `parallel.data_parallel.ZeroAdamW` owns the sharded optimizer state and reduce-
scatters gradient buckets from hooks during the last micro-batch's backward. Every micro-batch's
loss is its share of the step's per-token loss (`base.with_step_counts`), so gradients and logged
losses are summed over dp; expert loads are summed over the world so every rank applies the same
router bias update (section 2.1.2).

Checkpoint tensors: `model.<name>` and `optim.<name>.{master,exp_avg,exp_avg_sq}` at their global
shapes (expert tensors are DTensors sharded on dim 0 over the ep group; each rank's ZeRO shard is
written as chunks of the global per-parameter tensors, `parallel.sharded_state.FlatChunks`, and
read back the same way, never gathered), plus `optim.step`, so any layout can load them.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from model.batch import Batch
from parallel.data_parallel import ZeroAdamW
from parallel.engine.base import (LOSS_KEYS, ForwardContext, StepMetrics, eval_forward, run_micro_batches,
                                  with_step_counts)
from parallel.expert import AllToAllDispatcher, expert_shards, global_expert_counts
from parallel.topology import Topology


class ZeroEngine:
    """ZeRO-1 over dp (experts over edp) with optional expert parallelism."""

    def __init__(self, model: nn.Module, zero: ZeroAdamW, topology: Topology, device: torch.device,
                 make_context: ForwardContext, dispatcher: AllToAllDispatcher | None, paired=None):
        self.model, self.zero, self.topology, self.device = model, zero, topology, device
        self.make_context, self.dispatcher = make_context, dispatcher
        self.paired = paired  # a PairedMicroBatches: micro-batches as overlapped F&B pairs (paired.py)
        self._norm = 0.0

    def eval_forward(self, batch: Batch):
        self.zero.wait_params()
        return eval_forward(self.model, batch, self.make_context)

    def step_batches(self, batches: list[Batch]) -> list[Batch]:
        """This rank's micro-batches with the step's global counts (summed over dp)."""
        group = self.topology.group("dp") if self.topology.size("dp") > 1 else None
        return with_step_counts(batches, self.model.cfg.mtp.depth, group)

    def forward_backward(self, batches: list[Batch]) -> StepMetrics:
        if self.paired is not None:
            return self.paired(self.step_batches(batches))
        # reduce-scatter buckets while the last backward still runs
        return run_micro_batches(self.model, self.step_batches(batches), self.make_context,
                                 before_last=self.zero.overlap_next_backward)

    def reduce_metrics(self, m: StepMetrics) -> StepMetrics:
        """Losses (each rank's share of the step's) summed over dp ranks; expert loads summed over
        the whole world, so every rank applies the same bias update (and MaxVio is the global
        one); all-to-all bytes summed."""
        topo = self.topology
        if topo.size("dp") > 1:
            t = torch.tensor(m.losses(), dtype=torch.float64, device=self.device)
            dist.all_reduce(t, group=topo.group("dp"))
            for key, value in zip(LOSS_KEYS, t.tolist()):
                setattr(m, key, value)
        if m.expert_counts is not None:
            m.expert_counts = global_expert_counts(m.expert_counts, topo)
        if self.dispatcher is not None:
            stats = self.dispatcher.stats
            t = torch.tensor([float(stats.cross_node_bytes), float(stats.intra_node_bytes)], dtype=torch.float64,
                             device=self.device)
            dist.all_reduce(t)
            m.comm = {"a2a_cross_node_MB": t[0].item() / 2**20, "a2a_intra_node_MB": t[1].item() / 2**20}
            stats.reset()
        return m

    def reduce_and_norm(self) -> float:
        self._norm = self.zero.reduce_and_norm()  # global: every rank decides alike on it
        return self._norm

    def apply(self, lr: float) -> None:
        self.zero.apply(lr, self._norm)
        self.model.zero_grad(set_to_none=True)

    def discard(self) -> None:
        self.zero.discard()
        self.model.zero_grad(set_to_none=True)

    def agree_stop(self, requested: bool) -> bool:
        """True when any rank was asked to stop (max over the world, so all ranks stop together)."""
        t = torch.tensor([1.0 if requested else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def reset_comm_stats(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.stats.reset()

    def state_dict(self) -> dict:
        """What this rank writes: views of its tensors, nothing gathered or copied (module doc);
        the ZeRO state of a parameter that a lower pp rank holds too is that rank's to write."""
        self.zero.wait_params()  # the parameters hold the last step's update
        return sharded_state(self.model, self.topology, self.zero, skip=getattr(self.zero, "duplicates", set()))

    def load_targets(self) -> dict:
        """What this rank reads (every shard it holds): DCP reads into these views in place."""
        self.zero.wait_params()  # no all-gather in flight overwrites what is read
        return sharded_state(self.model, self.topology, self.zero)

    def load_state_dict(self, state: dict) -> None:
        """After DCP has read into `load_targets()` (the ZeRO shards in place): the step; when the
        checkpoint holds weights only, the fp32 masters are re-read from the loaded parameters and
        the moments start at zero. Model tensors from elsewhere are copied in. With optimizer
        state the parameters are then the masters' values (cast to the parameters' dtype), so
        that a resume across `train.param_dtype` is exact too."""
        local = {k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in state.items()
                 if k.startswith("model.")}
        with torch.no_grad():
            self.model.load_state_dict({k[len("model."):]: v for k, v in local.items()})
        if "optim.step" not in state:
            self.zero.reset_from_params()
            return
        self.zero.step_count = int(state["optim.step"])
        self.zero.params_from_master()


def _ep_mesh(topology: Topology, device: str) -> DeviceMesh | None:
    if topology.ep == 1:
        return None
    return DeviceMesh.from_group(topology.group("ep"), device_type=device)


def _wrap(t: Tensor, name: str, shards: dict, mesh: DeviceMesh | None):
    """Expert tensors become DTensor shards of their global tensor; the rest stay plain."""
    if name not in shards or mesh is None:
        return t
    n_global = shards[name][1]
    shape = (n_global,) + tuple(t.shape[1:])
    return DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def sharded_state(model: nn.Module, topology: Topology, zero: ZeroAdamW, skip: set[str] = frozenset()) -> dict:
    """Checkpoint tensors of a model whose experts may be sharded over ep and whose optimizer
    state is sharded by ZeRO-1 (see the module doc); `skip`: parameters whose ZeRO state is left out."""
    shards = expert_shards(model)
    mesh = _ep_mesh(topology, next(model.parameters()).device.type)
    state = {f"model.{k}": _wrap(v, k, shards, mesh) for k, v in model.state_dict().items()}
    state["optim.step"] = torch.tensor(zero.step_count, dtype=torch.int64)
    where = {}
    for name, p in model.named_parameters():
        first, n_global = shards.get(name, (0, p.shape[0] if p.dim() else 1))
        shape = (n_global, *p.shape[1:]) if p.dim() else ()
        where[name] = (shape, first * math.prod(p.shape[1:]))
    state.update({f"optim.{k}": v for k, v in zero.shard_chunks(where, skip).items()})
    return state
