"""Paired micro-batches without a pipeline (pp = 1): one micro-batch's all-to-all hides behind
another's compute (DeepSeek-V3 section 3.2.1, Figure 4, on a data x expert parallel layout).

With expert parallelism a micro-batch's dispatch and combine block on the network. The ZeRO
engine instead runs a step's N micro-batches as the pp = 1 paired schedule
(`schedules.paired_1f1b`): F0, F1&B0, F2&B1, ..., B(N-1), each F&B pair run by the pipeline's
own `OverlapPairExecutor` on the model cut into pieces (`OverlapModelChunk`): the forward of
micro-batch i+1 and the backward of micro-batch i alternate at their exchanges. The first
forward and the last backward run alone; inside every micro-batch the shared experts still run
while its dispatch travels (pieces.py). One F&B pair implementation serves DualPipe, paired
1F1B / ZB1P and this.

The gradients are those of the serial order: each micro-batch's loss is its share of the step's
per-token loss (`base.with_step_counts`) and is back-propagated as it is, as `base.run_micro_batches`
does; only the order of the gradient sums changes. ZeRO-1's
reduce-scatter is not started from hooks during the last backward here (it runs in
`reduce_and_norm`): a piecewise backward accumulates a parameter used by two pieces (the
embedding with MTP) twice, which the hooks would count as two.

Legend: N micro-batches of one step.
"""
from __future__ import annotations

import torch
from torch import nn

from model.batch import Batch
from parallel.engine.base import LOSS_KEYS, ForwardContext, StepMetrics
from parallel.engine.chunk import TrainChunk
from parallel.pipeline.overlap import OverlapModelChunk, OverlapPairExecutor
from parallel.pipeline.runtime import PipelineRuntime
from parallel.pipeline.schedules import build_schedule


class PairedMicroBatches:
    """Runs a step's micro-batches through the whole model as overlapped F&B pairs."""

    def __init__(self, model: nn.Module, make_context: ForwardContext, recompute: bool = False):
        self.batches: list[Batch] = []
        stage = model.stage(model.owned, embed=True, head=True)
        self.chunk = TrainChunk(OverlapModelChunk(stage, self.batches, None, recompute=recompute), make_context)
        self.pair = OverlapPairExecutor()
        self._runtimes: dict[int, PipelineRuntime] = {}   # per N (grad_accum may change between steps)

    def runtime(self, n: int) -> PipelineRuntime:
        if n not in self._runtimes:
            self._runtimes[n] = PipelineRuntime(build_schedule("1f1b", 1, n, paired=True), 0, [self.chunk],
                                                pair=self.pair, loss_scale=1.0)  # losses are shares already
        return self._runtimes[n]

    def __call__(self, batches: list[Batch]) -> StepMetrics:
        """Forward and backward of every micro-batch (each carrying the step's counts: its loss is
        its share of the step's); the step's metrics, shares summed."""
        rt = self.runtime(len(batches))
        self.batches[:] = batches
        try:
            outs = [info for _, info in rt.run()]
        finally:
            rt.infos.clear()
            self.batches.clear()
        vals = torch.stack([torch.stack([getattr(o, k).detach().double() for k in LOSS_KEYS]) for o in outs]).sum(0)
        counts = sum(o.expert_counts for o in outs)
        return StepMetrics(*vals.tolist(), expert_counts=counts)  # one host sync per step
