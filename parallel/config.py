"""Parallel layout config: data, pipeline and expert parallel degrees and the schedule.

DeepSeek-V3 trained with pipeline x data parallelism and expert parallelism carved out of
the data-parallel ranks (no tensor parallelism): world = pp * dp, ep divides dp, and the
expert-data-parallel degree is dp / ep. `parallel.topology` turns this into process groups.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.config import doc, require
from parallel.pipeline.schedules import SCHEDULE_NAMES

OVERLAP_MODES = ("auto", "off")


@dataclass(kw_only=True)
class ParallelConfig:
    """How ranks are arranged. Degrees of 1 everywhere is a single-process run."""

    dp: int = doc(-1, "Data-parallel degree; -1 = world_size / pp.")
    pp: int = doc(1, "Pipeline-parallel degree (ranks per pipeline).")
    ep: int = doc(1, "Expert-parallel degree; must divide dp. Routed experts are spread over ep ranks.")
    ranks_per_node: int = doc(0, "Ranks that share a node; 0 = LOCAL_WORLD_SIZE. Set it to emulate nodes on one host.")
    schedule: str = doc("1f1b", "Pipeline schedule: 1f1b, zb1p, dualpipe or dualpipev.")
    backend: str = doc("auto", "torch.distributed backend: auto (nccl on CUDA, else gloo), nccl or gloo.")
    node_limited_dispatch: bool = doc(True, "Two-stage all-to-all: a token crosses to a remote node once, then fans out inside it.")
    overlap: str = doc("auto", "F&B overlap of expert all-to-alls: auto (on when ep > 1) or off. On: paired micro-batches (F(i+1)&B(i)) without a pipeline, 1F1B / ZB1P steady states and DualPipe(V) as overlapped F&B pairs, the shared experts during each dispatch; paired 1F1B / ZB1P warm up with more forwards (more activations held).")
    layout: list = doc([], "Blocks of each pipeline stage, embedding side first: block counts ([3, 4, 4, 3]) or block-index lists ([[0, 1, 2], [3, 4, 5, 6], ...]); [] = near-equal split. Stages: pp, or 2 x pp for dualpipev. `python -m trainer.plan` proposes one.")

    def __post_init__(self):
        require(self.dp == -1 or self.dp >= 1, "dp", self.dp, "must be >= 1, or -1 for world_size / pp")
        require(self.pp >= 1, "pp", self.pp, "must be >= 1")
        require(self.ep >= 1, "ep", self.ep, "must be >= 1")
        require(self.ranks_per_node >= 0, "ranks_per_node", self.ranks_per_node, "must be >= 0 (0 = LOCAL_WORLD_SIZE)")
        require(self.schedule in SCHEDULE_NAMES, "schedule", self.schedule,
                f"must be one of {', '.join(SCHEDULE_NAMES)}")
        require(self.overlap in OVERLAP_MODES, "overlap", self.overlap, "must be auto (on when ep > 1) or off")
        require(self.backend in ("auto", "nccl", "gloo"), "backend", self.backend, "must be auto, nccl or gloo")
        require(all(isinstance(x, (int, list)) and not isinstance(x, bool) for x in self.layout), "layout",
                self.layout, "must be a list of block counts or of block-index lists, e.g. [3, 4, 4, 3]")

    def overlap_on(self, ep: int) -> bool:
        """Whether F&B overlap runs at expert-parallel degree `ep`: auto = when ep > 1."""
        return self.overlap == "auto" and ep > 1
