"""What every training engine offers the loop, and the pieces the engines share.

DeepSeek-V3 (arXiv 2412.19437, section 3.1) trains with pipeline x ZeRO-1 data x expert
parallelism. The loop does not know which of these a run uses: it hands an `Engine` the step's
micro-batches and asks it, in order, for `forward_backward` (summed losses and expert loads),
`reduce_metrics` (losses averaged over data-parallel ranks, expert loads and all-to-all bytes
summed over the world), `reduce_and_norm` (the global gradient norm), then `apply(lr)` or
`discard()`; checkpoints go through `state_dict` / `load_state_dict`, whose tensors carry the
single-process names and global shapes whatever the layout (see `parallel.checkpoint`).
Validation calls `eval_forward(batch)` on every rank: the model's output (losses) without
autograd, or None on a pipeline rank that does not hold the head stage.

Legend: N micro-batches of one step, E routed experts.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.batch import Batch, target_counts
from parallel.topology import Topology

ForwardContext = Callable[[], ContextManager]
LOSS_KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss")


@dataclass
class StepMetrics:
    """One step's losses (shares summed over its N micro-batches: see `with_step_counts`; after
    `reduce_metrics`, over the data-parallel ranks too) and expert loads (sums)."""

    loss: float
    lm_loss: float
    mtp_loss: float
    balance_loss: float
    expert_counts: Tensor | None            # [n_moe_layers, E]; global after reduce_metrics
    comm: dict[str, float] = field(default_factory=dict)  # all-to-all MB of the step, if any

    def losses(self) -> list[float]:
        return [getattr(self, k) for k in LOSS_KEYS]


class Engine(Protocol):
    """One layout's way of running a step (local, ZeRO-1 over dp x ep, pipeline)."""

    model: nn.Module
    topology: Topology
    device: torch.device
    make_context: ForwardContext   # autocast / FP8 around a forward (validation uses it too)

    def eval_forward(self, batch: Batch): ...

    def forward_backward(self, batches: list[Batch]) -> StepMetrics: ...

    def reduce_metrics(self, m: StepMetrics) -> StepMetrics: ...

    def reduce_and_norm(self) -> float: ...

    def apply(self, lr: float) -> None: ...

    def discard(self) -> None: ...

    def agree_stop(self, requested: bool) -> bool: ...

    def reset_comm_stats(self) -> None: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


def forward_context(device: torch.device, autocast_dtype: torch.dtype | None,
                    fp8_context: ForwardContext | None) -> ForwardContext:
    """() -> context manager for forward passes: autocast to `autocast_dtype` and FP8 if on."""
    if autocast_dtype is None and fp8_context is None:
        return contextlib.nullcontext

    def make():
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None))
        if fp8_context is not None:
            stack.enter_context(fp8_context())
        return stack
    return make


@torch.no_grad()
def eval_forward(model: nn.Module, batch: Batch, make_context: ForwardContext):
    """The model's output on `batch` without autograd (validation), under the forward context."""
    with make_context():
        return model(batch)


def with_step_counts(batches: list[Batch], mtp_depth: int, dp_group=None) -> list[Batch]:
    """The step's micro-batches, each carrying the step's global rows and target counts (summed
    over them and, with `dp_group`, over the data-parallel ranks: one all-reduce per step, before
    any forward). The model divides by these, so every micro-batch's loss is its share of the
    step's per-token loss (`model.loss`) and the shares of all micro-batches and ranks sum to the
    loss one process computes on the whole batch, whatever dp, ep, pp, micro-batch size, number
    of micro-batches and padding are. Gradients are therefore summed, never averaged, over them."""
    counts = torch.stack([target_counts(b, mtp_depth) for b in batches]).sum(0)
    if dp_group is not None:
        dist.all_reduce(counts, group=dp_group)
    return [dataclasses.replace(b, step_counts=counts) for b in batches]


def run_micro_batches(model: nn.Module, batches: list[Batch], make_context: ForwardContext,
                      before_last: Callable[[], None] | None = None) -> StepMetrics:
    """Forward and backward of every micro-batch (each carries its step's counts, so its loss is
    its share of the step's: `with_step_counts`); losses are summed. `before_last` runs before
    the last one (ZeRO-1 arms its reduce-scatter hooks there)."""
    n = len(batches)
    assert all(b.step_counts is not None for b in batches), "micro-batches need with_step_counts"
    sums, counts = None, None
    for i, batch in enumerate(batches):
        if before_last is not None and i == n - 1:
            before_last()
        with make_context():
            out = model(batch)
        out.loss.backward()
        # summed on the device in float64 (the same arithmetic as Python floats): no host sync per micro-batch
        vals = torch.stack([getattr(out, key).detach().double() for key in LOSS_KEYS])
        sums = vals if sums is None else sums + vals
        counts = out.expert_counts if counts is None else counts + out.expert_counts
    return StepMetrics(*sums.tolist(), expert_counts=counts)  # one host sync per step
