"""A forward-only pass through the pipeline in stage order, for validation (no schedule, no backward).

Evaluation needs no overlap of micro-batches: each one goes through the stages 0, 1, ..., S-1 of
one model copy, the route its placement gives micro-batch 0. Stage s runs on its rank under
`torch.no_grad`, takes its input from stage s-1 (handed over locally when the same rank holds
both, as at the turn of DualPipeV's V, else received from that rank) and hands its output on.
DualPipe keeps two copies with opposite routes; their weights are equal, and only the copy of
micro-batch 0's route runs. The rank holding that route's last stage gets the model's output
(losses); the other ranks get None.

Every rank of the pipeline walks the same route in the same order, so each blocking send meets
its receive (no deadlock); ranks of one expert-parallel group hold the same stages and run their
all-to-alls in the same order.
"""
from __future__ import annotations

import torch

from .actions import Placement
from .runtime import recv_tensor, send_tensor


@torch.no_grad()
def forward_in_stage_order(placement: Placement, rank: int, stages: list, batch, make_context,
                           group_ranks: list[int], group, device: torch.device):
    """This rank's part of one micro-batch's forward: the head stage's output on the rank that
    holds it, None elsewhere. `stages[c]` is local chunk c's module, called as `stage(batch, h=x)`."""
    route = placement.routes[0]
    out = None
    for i, (r, c) in enumerate(route):
        if r != rank:
            continue
        prev_rank = route[i - 1][0] if i > 0 else None
        if prev_rank is not None and prev_rank != rank:
            out = recv_tensor(group_ranks[prev_rank], device, group)
        with make_context():
            out = stages[c](batch, h=out)
        next_rank = route[i + 1][0] if i + 1 < len(route) else None
        if next_rank is not None and next_rank != rank:
            send_tensor(out, group_ranks[next_rank], group)
            out = None
    last_rank = route[-1][0]
    return out if last_rank == rank else None
