"""Pipeline chunks of the DeepSeek-V3 model for the runtime, built from a schedule's placement.

Each pipeline rank builds ONE model holding the blocks of all the stages the placement gives it
(with the embedding and the head when it holds the first or the last stage), and each of its
chunks runs one stage of it, `model.stage(layers, embed, head)`. Parameter names are the
single-process ones, so the optimizer, checkpoints and the router-bias update see one module,
and the copies of a parameter held on several ranks (DualPipe's second model copy, the
embedding the head stage uses for MTP) are found by name by `runtime.reduce_shared_grads`.
DualPipeV's two chunks on rank 0 share one `embed.weight`.

A chunk builds its own per-micro-batch context; a stage without the head back-propagates its
MoE balance losses as the chunk's `aux` (model.context) and reports its expert loads, which the
caller sums with the head stage's for the bias update. `ModelChunk` runs the stage's forward in
one piece, or piece by piece (`pieces.stage_steps`) under activation recomputation
(`train.recompute: full`); `overlap.OverlapModelChunk` always runs it in pieces. Selective
recomputation and compile act on the modules themselves (`policies.py`), so every chunk runs them.
"""
from __future__ import annotations

from torch import Tensor

from model.transformer import build_model
from parallel.steps import drain

from .pieces import chunk_output, stage_steps
from .layout import resolve_layout
from .runtime import ChunkOutput
from .schedules import Schedule
from .split import SplitWeightProvider, WeightGradDeferral


def model_layout(cfg, num_stages: int) -> list[list[int]]:
    """Stage -> blocks of the run: `parallel.layout` when set, else the near-equal split."""
    return resolve_layout(cfg.parallel.layout, cfg.model.num_layers, num_stages)


class ModelChunk:
    """One stage of the model (`model`: a `ModelStage`) as a runtime chunk over a fixed list of
    micro-batches. With `recompute` the stage runs in pieces whose compute is recomputed."""

    in_pieces = False  # always run the stage piece by piece (overlap.OverlapModelChunk)
    shared_in_flight = True  # in pieces: the shared experts run while the dispatch travels

    def __init__(self, model, batches: list, deferral: WeightGradDeferral | None = None, recompute: bool = False):
        self.model, self.batches, self.deferral, self.recompute = model, batches, deferral, recompute

    def __call__(self, micro: int, x: Tensor | None) -> ChunkOutput:
        return drain(self.steps(micro, x))

    def steps(self, micro: int, x: Tensor | None):
        """Step generator of the chunk's forward; yields while an all-to-all is in flight."""
        stage, batch = self.model, self.batches[micro]
        if self.in_pieces or self.recompute:
            return (yield from stage_steps(stage, batch, x, self.recompute, self.shared_in_flight))
        ctx = stage.make_context(batch)
        return chunk_output(stage, stage(batch, h=x, ctx=ctx), ctx)

    def named_parameters(self):
        return self.model.named_parameters()


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


def _split_provider(cfg, stages: list, num_stages: int, deferrals: list) -> SplitWeightProvider:
    """Deferrable linears: a block's report to the W deferral of the chunk that runs it, the
    output head's and the MTP modules' to the head stage's chunk (chunk 0 if none)."""
    chunk_of = {i: c for c, (_, layers) in enumerate(stages) for i in layers}
    head_chunk = next((c for c, (s, _) in enumerate(stages) if s == num_stages - 1), 0)

    def deferral_of_layer(layer: int | None) -> WeightGradDeferral:
        if layer is None or layer >= cfg.model.num_layers:
            return deferrals[head_chunk]
        return deferrals[chunk_of[layer]]
    return SplitWeightProvider(deferral_of_layer)


def build_union_chunks(cfg, schedule: Schedule, rank: int, batches: list, split_w: bool = True,
                       provider=None, chunk_cls=ModelChunk):
    """This rank's model (the union of its stages) and its chunks, one stage of it each.

    Returns (model, chunks). With `split_w` (and no `provider`) the linears of each chunk defer
    dW to that chunk's W; a given `provider` (e.g. FP8) is used as is and W stays empty.
    `chunk_cls(stage, batches, deferral, recompute=train.recompute == "full")` builds each chunk.
    Experts are not sharded here (the caller may `parallelize_experts` the model afterwards).
    """
    S = schedule.placement.num_stages
    stages = rank_stages(cfg, schedule, rank)
    if len({s for s, _ in stages}) != len(stages):
        raise ValueError(f"{schedule.name}: rank {rank} holds one stage twice; the union model cannot")
    deferrals = [WeightGradDeferral() if split_w and provider is None else None for _ in stages]
    if split_w and provider is None:
        provider = _split_provider(cfg, stages, S, deferrals)
    model = build_model(cfg, provider=provider, layers=sorted(i for _, ls in stages for i in ls),
                        embed=any(s == 0 for s, _ in stages), head=any(s == S - 1 for s, _ in stages))
    chunks = [chunk_cls(model.stage(layers, embed=s == 0, head=s == S - 1), batches, d,
                        recompute=cfg.train.recompute == "full")
              for (s, layers), d in zip(stages, deferrals)]
    return model, chunks
