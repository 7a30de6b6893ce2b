"""A runtime chunk of a training engine: a model chunk run under the forward context.

The context (autocast / FP8) wraps each resumption of the chunk's step generator only, never
the other half of an overlapped F&B pair (`parallel.steps.in_context`). A chunk without the
output head reports its expert loads and balance losses as `StageInfo`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from parallel.engine.base import ForwardContext
from parallel.pipeline.runtime import chunk_steps
from parallel.steps import in_context


@dataclass
class StageInfo:
    """What a chunk without the head reports per micro-batch."""

    expert_counts: Tensor   # [n_moe_layers, E], rows of other stages zero
    balance_loss: Tensor    # scalar, detached: this stage's sequence-wise balance losses


class TrainChunk:
    """A runtime chunk around a model chunk: forward under the autocast/FP8 context; a chunk
    without the head returns `StageInfo` (counts and balance loss) as its info."""

    def __init__(self, inner, make_context: ForwardContext):
        self.inner, self.make_context, self.deferral = inner, make_context, inner.deferral

    def steps(self, micro: int, x):
        # the context wraps each resumption only, never the other half of an overlapped F&B pair
        res = yield from in_context(chunk_steps(self.inner, micro, x), self.make_context)
        if res.loss is None:
            counts = res.info
            balance = res.aux.detach() if res.aux is not None else counts.new_zeros(())
            res.info = StageInfo(counts, balance)
        return res

    def named_parameters(self):
        return self.inner.named_parameters()
