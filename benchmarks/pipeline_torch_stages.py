"""The model's pipeline stages run by torch.distributed.pipelining (`Schedule1F1B`,
`ScheduleDualPipeV`), for the step-time comparison with our runtime (DeepSeek-V3 section 3.2.1).

torch's stages pass tensors only, so `TorchStage` wraps one `ModelStage` (the very module our
runtime runs) with the micro-batch index travelling along with the activation: the first stage
gets the index (torch splits `arange(N)` into N micro-batches), looks its batch up, embeds and
hands (h, index) on; a middle stage maps (h, index) to (h, index); the head stage returns the
loss. The head stage's output is that loss, which `loss_fn` only scales by 1/N: torch's own
`scale_grads` divides every local stage's parameters, so DualPipeV's rank 0, whose two stages
share the embedding (MTP reads it), would divide that gradient twice.

A stage's MoE balance loss cannot leave a torch stage that is not the last one, so the
benchmark runs with `moe.seq_aux_loss_alpha = 0`. `losses` keeps the loss of every micro-batch
whose loss is on this rank, unscaled.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class TorchStage(nn.Module):
    """One ModelStage as a torch pipeline stage module: tensors in, tensors out."""

    def __init__(self, stage, batches: list):
        super().__init__()
        self.stage, self.batches = stage, batches

    def forward(self, *args: Tensor):
        h, micro = (None, args[0]) if self.stage.has_embed and len(args) == 1 else args
        m = int(micro.reshape(-1)[0])
        batch = self.batches[m]
        ctx = self.stage.make_context(batch)
        if h is None:
            h = self.stage.embed_tokens(batch)
        for block in self.stage.blocks():
            h = block(h, ctx)
        if self.stage.has_head:
            return self.stage.head_loss(h, batch, ctx).loss.reshape(1)
        return h, micro


def _examples(stage, batch, cfg, first: bool, last: bool):
    """Static input/output examples (so that torch infers no shapes by running the stage)."""
    B, L = batch.tokens.shape
    h = torch.zeros(B, L, cfg.model.hidden_size, requires_grad=True)
    micro = torch.zeros(1, dtype=torch.int64)
    inputs = (micro,) if first else (h, micro)
    outputs = torch.zeros(1, requires_grad=True) if last else (h, micro)
    return inputs, outputs


class TorchPipeline:
    """torch's Schedule1F1B ("1f1b") or ScheduleDualPipeV ("dualpipev") over our stages.

    `chunks` are our runtime's chunks of the same schedule on this rank (their `model` is the
    ModelStage); `place` the placement of our schedule, whose stage indices torch must share."""

    def __init__(self, name: str, chunks: list, place, batches: list, cfg, pp_group, pp_rank: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV
        n, S = len(batches), place.num_stages
        self.n, self.losses, self.pp_rank = n, {}, pp_rank
        stages = []
        for c, chunk in enumerate(chunks):
            s = place.stage_of(pp_rank, c)
            ins, outs = _examples(chunk.model, batches[0], cfg, s == 0, s == S - 1)
            stages.append(PipelineStage(TorchStage(chunk.model, batches), s, S, torch.device("cpu"),
                                        input_args=ins, output_args=outs, group=pp_group))
        self.first = any(st.is_first for st in stages)
        self.last = any(st.is_last for st in stages)
        loss_fn = lambda out, micro: out.sum() / n  # noqa: E731  (scale here, see the docstring)
        if name == "1f1b":
            self.schedule = Schedule1F1B(stages[0], n, loss_fn=loss_fn, scale_grads=False)
        elif name == "dualpipev":
            self.schedule = ScheduleDualPipeV(stages, n, loss_fn=loss_fn, scale_grads=False)
        else:
            raise ValueError(f"torch schedule {name!r}: this benchmark wraps 1f1b and dualpipev")
        self.chunks = chunks

    def run(self) -> None:
        micro = torch.arange(self.n)
        losses: list[Tensor] = []
        self.schedule.step(*((micro,) if self.first else ()), target=micro if self.last else None,
                           losses=losses if self.last else None, return_outputs=False)
        self.losses = {m: float(l.detach()) * self.n for m, l in enumerate(losses)} if self.last else {}
