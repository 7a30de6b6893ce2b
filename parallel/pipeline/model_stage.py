"""Pipeline chunks of the DeepSeek-V3 model (trainer.model) for the runtime.

A stage is the same `DeepSeekV3` class built with a slice of the blocks (`build_model(cfg,
layers=..., embed=..., head=...)`); parameter names equal the full model's, so shared copies
(DualPipe's second copy, the embedding the head stage keeps for MTP) are found by name by
`runtime.reduce_shared_grads`. Each chunk builds its own per-micro-batch context; a middle
stage back-propagates its MoE balance losses as the chunk's `aux` (trainer.model.context) and
reports its expert counts, which the caller sums with the head stage's for the bias update.
"""
from __future__ import annotations

from torch import Tensor

from parallel.expert import parallelize_experts
from trainer.model.transformer import build_model

from .runtime import ChunkOutput
from .schedules import Schedule
from .split import SplitWeightProvider, WeightGradDeferral


def stage_layers(num_layers: int, num_stages: int, stage: int) -> list[int]:
    """Blocks of `stage` when num_layers are cut into num_stages contiguous, near-equal parts."""
    if num_layers < num_stages:
        raise ValueError(f"model.num_layers = {num_layers}: a pipeline of {num_stages} stages needs "
                         f"at least one block per stage")
    lo = stage * num_layers // num_stages
    hi = (stage + 1) * num_layers // num_stages
    return list(range(lo, hi))


class ModelChunk:
    """One stage of the model as a runtime chunk over a fixed list of micro-batches."""

    def __init__(self, model, batches: list, deferral: WeightGradDeferral | None = None):
        self.model, self.batches, self.deferral = model, batches, deferral

    def __call__(self, micro: int, x: Tensor | None) -> ChunkOutput:
        model, batch = self.model, self.batches[micro]
        ctx = model.make_context(batch)
        h = model.embed_tokens(batch) if x is None else x
        for i in model.owned:
            h = model.layers[str(i)](h, ctx)
        if model.has_head:
            out = model.head_loss(h, batch, ctx)
            return ChunkOutput(loss=out.loss, info=out)
        return ChunkOutput(out=h, aux=ctx.balance_loss(), info=ctx.expert_counts.detach())

    def named_parameters(self):
        return self.model.named_parameters()


def build_model_chunks(cfg, schedule: Schedule, rank: int, batches: list, split_w: bool = True,
                       dispatcher=None, topology=None, chunk_cls=ModelChunk, **chunk_kwargs) -> list:
    """This rank's chunks for `schedule`; with split_w their linears can defer dW to W.

    With a `topology` whose ep > 1 each chunk's experts are sharded over the ep group
    (`parallel.expert.parallelize_experts`). `chunk_cls(model, batches, deferral, **chunk_kwargs)`
    builds the chunk (e.g. overlap.OverlapModelChunk).
    """
    place = schedule.placement
    S = place.num_stages
    chunks = []
    for c in range(place.chunks_per_rank):
        stage = place.stage_of(rank, c)
        deferral = WeightGradDeferral() if split_w else None
        provider = SplitWeightProvider(deferral) if split_w else None
        model = build_model(cfg, provider=provider, dispatcher=dispatcher,
                            layers=stage_layers(cfg.model.num_layers, S, stage),
                            embed=stage == 0, head=stage == S - 1)
        if topology is not None and topology.ep > 1 and model.moe_modules():
            parallelize_experts(model, topology)
        chunks.append(chunk_cls(model, batches, deferral, **chunk_kwargs))
    return chunks
