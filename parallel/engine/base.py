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
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Protocol

import torch
from torch import Tensor, nn

from model.batch import Batch
from parallel.topology import Topology

ForwardContext = Callable[[], ContextManager]
LOSS_KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss")


@dataclass
class StepMetrics:
    """One step's losses (means over its N micro-batches) and expert loads (sums)."""

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


def run_micro_batches(model: nn.Module, batches: list[Batch], make_context: ForwardContext,
                      before_last: Callable[[], None] | None = None) -> StepMetrics:
    """Forward and backward of every micro-batch (loss scaled by 1/N); `before_last` runs
    before the last one (ZeRO-1 arms its reduce-scatter hooks there)."""
    n = len(batches)
    sums, counts = None, None
    for i, batch in enumerate(batches):
        if before_last is not None and i == n - 1:
            before_last()
        with make_context():
            out = model(batch)
        (out.loss / n).backward()
        # summed on the device in float64 (the same arithmetic as Python floats): no host sync per micro-batch
        vals = torch.stack([getattr(out, key).detach().double() for key in LOSS_KEYS]) / n
        sums = vals if sums is None else sums + vals
        counts = out.expert_counts if counts is None else counts + out.expert_counts
    return StepMetrics(*sums.tolist(), expert_counts=counts)  # one host sync per step
