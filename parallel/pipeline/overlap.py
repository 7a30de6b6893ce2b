"""Overlapped F&B pairs: one micro-batch's all-to-all travels while the other one computes.

DeepSeek-V3 (section 3.2.1, Figure 4) pairs the forward of one micro-batch with the backward
of another so that the communication of each hides behind the computation of the other:

- `OverlapModelChunk` runs its stage piece by piece (`pieces.stage_steps`: attention,
  dispatch, MLP, combine, every boundary an autograd cut); its step generator yields right
  after an exchange is issued, and so does its backward (`pieces.Tape.backward_steps`).
- `OverlapPairExecutor` alternates the two step generators of an F&B pair
  (`runtime.backward_steps` first, then `runtime.forward_steps`): each runs until it has
  something in flight, then the other runs. Both ep peers of a stage run the same schedule
  and thus issue their collectives in the same order, which gloo and NCCL need.
"""
from __future__ import annotations

from .model_stage import ModelChunk
from .runtime import PairExecutor


class OverlapModelChunk(ModelChunk):
    """A model stage whose MoE blocks run as attention / dispatch / MLP / combine pieces."""

    in_pieces = True


class OverlapPairExecutor(PairExecutor):
    """Runs an F&B pair with the two micro-batches interleaved at their exchanges.

    `overlapped` counts the exchanges that were in flight while the other half computed."""

    def __init__(self):
        self.overlapped = 0

    def __call__(self, rt, a) -> None:
        # the backward leads: its first exchange (combine's gradients) then hides behind the
        # forward's attention, and its last compute (attention backward) behind the forward's
        # final combine, so no exchange of the pair waits with nothing to hide behind
        live = [rt.backward_steps(a.micro2, a.chunk2, a.bop), rt.forward_steps(a.micro, a.chunk)]
        while live:
            for gen in list(live):
                try:
                    next(gen)
                    self.overlapped += len(live) == 2
                except StopIteration:
                    live.remove(gen)
