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

The same executor runs the F&B pairs of DualPipe(V), of paired 1F1B / ZB1P
(`schedules.paired_1f1b`) and of paired micro-batches without a pipeline
(`parallel.engine.paired`); `overlap_path` says in words which path a run takes.
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


def overlap_path(on: bool, schedule: str, pp: int, ep: int) -> str:
    """One line for the start-up log: how this layout's all-to-alls meet its compute."""
    if ep == 1:
        return "no expert all-to-all (ep = 1): nothing to overlap"
    if not on:
        return "every dispatch and combine blocks; F&B pairs run serially, shared experts after the routed ones"
    shared = "shared experts during each dispatch"
    if pp == 1:
        return f"micro-batches paired F0, F1&B0, ..., B(N-1), all-to-alls of one hidden behind the other; {shared}"
    if schedule in ("1f1b", "zb1p"):
        return (f"{schedule} paired: warm-up 2(pp-r)-1 forwards, steady-state F&B pairs overlapped "
                f"(more activations held on early ranks); {shared}")
    return f"{schedule}: F&B pairs overlapped; {shared}"
