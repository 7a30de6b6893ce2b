"""Pipeline chunks of the DeepSeek-V3 model (model) for the runtime.

A stage is the same `DeepSeekV3` class built with a slice of the blocks (`build_model(cfg,
layers=..., embed=..., head=...)`); parameter names equal the full model's, so shared copies
(DualPipe's second copy, the embedding the head stage keeps for MTP) are found by name by
`runtime.reduce_shared_grads`. Each chunk builds its own per-micro-batch context; a middle
stage back-propagates its MoE balance losses as the chunk's `aux` (model.context) and
reports its expert counts, which the caller sums with the head stage's for the bias update.

Two ways to build a rank's chunks: `build_model_chunks` gives every chunk its own stage model;
`build_union_chunks` (what the trainer uses, trainer.pipeline_run) builds ONE model per rank
with the union of its stages' blocks and runs each chunk as a `StageView` of it, so the
optimizer, checkpoints and the router-bias update see one module with the full model's names.
"""
from __future__ import annotations

from torch import Tensor

from parallel.expert import parallelize_experts
from model.provider import LINEAR_KINDS, LayerProvider
from model.transformer import build_model

from .layout import resolve_layout
from .runtime import ChunkOutput
from .schedules import Schedule
from .split import DeferrableLinear, SplitWeightProvider, WeightGradDeferral


def model_layout(cfg, num_stages: int) -> list[list[int]]:
    """Stage -> blocks of the run: `parallel.layout` when set, else the near-equal split."""
    return resolve_layout(cfg.parallel.layout, cfg.model.num_layers, num_stages)


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
    layout = model_layout(cfg, S)
    chunks = []
    for c in range(place.chunks_per_rank):
        stage = place.stage_of(rank, c)
        deferral = WeightGradDeferral() if split_w else None
        provider = SplitWeightProvider(deferral) if split_w else None
        model = build_model(cfg, provider=provider, dispatcher=dispatcher, layers=layout[stage],
                            embed=stage == 0, head=stage == S - 1)
        if topology is not None and topology.ep > 1 and model.moe_modules():
            parallelize_experts(model, topology)
        chunks.append(chunk_cls(model, batches, deferral, **chunk_kwargs))
    return chunks


class StageView:
    """One stage of a *union* model: the blocks `owned`, the embedding if `has_embed`, the head
    if `has_head`. It answers what ModelChunk / overlap.OverlapModelChunk ask of a model, so one
    `DeepSeekV3` per rank (built with the union of its stages' blocks) serves every chunk of the
    rank: one set of parameters under the full model's names for the optimizer, the checkpoint
    and the router-bias update, and the two DualPipeV chunks on rank 0 share one `embed.weight`."""

    def __init__(self, model, layers: list[int], embed: bool, head: bool):
        missing = [i for i in layers if str(i) not in model.layers]
        assert not missing, f"the union model lacks blocks {missing}"
        assert not head or model.has_head, "a head stage needs a union model built with head=True"
        self.model, self.owned = model, sorted(layers)
        self.has_embed, self.has_head, self.layers = embed, head, model.layers

    def make_context(self, batch):
        return self.model.make_context(batch)

    def embed_tokens(self, batch) -> Tensor:
        return self.model.embed(batch.tokens)

    def head_loss(self, h: Tensor, batch, ctx=None):
        return self.model.head_loss(h, batch, ctx)

    def named_parameters(self):
        """Parameters this stage uses (its blocks, plus embedding / head when it holds them)."""
        prefixes = [f"layers.{i}." for i in self.owned]
        if self.has_embed:
            prefixes.append("embed.")
        if self.has_head:
            prefixes += ["norm.", "head.", "mtp.", "embed."]
        for name, p in self.model.named_parameters():
            if name.startswith(tuple(prefixes)):
                yield name, p


class StageSplitProvider(LayerProvider):
    """Deferrable linears for a union model: each layer's linears report to the W deferral of
    the chunk that runs the layer (the output head and MTP modules to the head stage's)."""

    def __init__(self, deferral_of_layer):
        self.deferral_of_layer = deferral_of_layer

    def linear(self, in_features: int, out_features: int, *, kind: str, layer: int | None):
        if kind not in LINEAR_KINDS:
            raise ValueError(f"linear kind = {kind!r}: must be one of {', '.join(LINEAR_KINDS)}")
        return DeferrableLinear(in_features, out_features, self.deferral_of_layer(layer))


def rank_stages(cfg, schedule: Schedule, rank: int) -> list[tuple[int, list[int]]]:
    """(stage, blocks) of each local chunk of `rank`, in chunk order."""
    place = schedule.placement
    layout = model_layout(cfg, place.num_stages)
    return [(place.stage_of(rank, c), layout[place.stage_of(rank, c)]) for c in range(place.chunks_per_rank)]


def ranks_of_stages(schedule: Schedule) -> list[list[int]]:
    """For each stage, the pipeline ranks that hold it (two for DualPipe's two copies)."""
    place = schedule.placement
    out: list[list[int]] = [[] for _ in range(place.num_stages)]
    for r in range(place.num_ranks):
        for c in range(place.chunks_per_rank):
            out[place.stage_of(r, c)].append(r)
    return [sorted(set(rs)) for rs in out]


def build_union_chunks(cfg, schedule: Schedule, rank: int, batches: list, split_w: bool = True,
                       provider=None, chunk_cls=ModelChunk, **chunk_kwargs):
    """One model per rank holding all its stages, and this rank's chunks as views of it.

    Returns (model, chunks). With `split_w` (and no `provider`) the linears of each chunk defer
    dW to that chunk's W; a given `provider` (e.g. FP8) is used as is and W stays empty.
    Experts are not sharded here (the caller may `parallelize_experts` the model afterwards).
    """
    S = schedule.placement.num_stages
    stages = rank_stages(cfg, schedule, rank)
    if len({s for s, _ in stages}) != len(stages):
        raise ValueError(f"{schedule.name}: rank {rank} holds one stage twice; the union model cannot")
    deferrals = [WeightGradDeferral() if split_w and provider is None else None for _ in stages]
    if provider is None and split_w:
        head_chunk = next((c for c, (s, _) in enumerate(stages) if s == S - 1), 0)
        chunk_of = {i: c for c, (_, layers) in enumerate(stages) for i in layers}

        def deferral_of_layer(layer):
            if layer is None or layer >= cfg.model.num_layers:
                return deferrals[head_chunk]
            return deferrals[chunk_of[layer]]
        provider = StageSplitProvider(deferral_of_layer)
    model = build_model(cfg, provider=provider, layers=sorted(i for _, ls in stages for i in ls),
                        embed=any(s == 0 for s, _ in stages), head=any(s == S - 1 for s, _ in stages))
    chunks = [chunk_cls(StageView(model, layers, embed=s == 0, head=s == S - 1), batches, d, **chunk_kwargs)
              for (s, layers), d in zip(stages, deferrals)]
    return model, chunks
