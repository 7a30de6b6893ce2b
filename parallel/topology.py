"""Rank layout and process groups for pipeline x data x expert parallelism.

DeepSeek-V3 (arXiv 2412.19437, section 3.1) trains with pipeline parallelism, ZeRO-1 data
parallelism and expert parallelism carved out of the data-parallel ranks (64-way EP over 8
nodes), no tensor parallelism. Here:

    world = pp * dp,   ep | dp,   edp = dp / ep   (expert-data-parallel degree)
    rank  = pp_rank * dp + dp_rank,   dp_rank = edp_rank * ep + ep_rank

so an expert-parallel group is a run of consecutive ranks (which keeps it on as few nodes as
possible) and a pipeline group strides by dp. Nodes are `ranks_per_node` consecutive ranks
(LOCAL_WORLD_SIZE by default; set it smaller to emulate several nodes on one host). The ep
group is split in two for node-limited dispatch (section 2.1.2 / 3.2.2): `ep_intra` = the ep
ranks on my node, `ep_inter` = the ep ranks on other nodes with my local index (the "same
GPU on every node" rail a token crosses on before fanning out inside the node).

`plan_layout` is pure layout math (no processes); `Topology.from_config` adds this rank's
coordinates and creates every process group from that plan (a world of one has none). No
module-level state; nothing else creates process groups.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch.distributed as dist

GROUP_KINDS = ("dp", "pp", "ep", "edp", "ep_intra", "ep_inter")
# Same ranks as dp / edp on communicators of their own: ZeRO-1's gradient reduce-scatters, issued
# from hooks during backward, never interleave with the expert all-to-alls of that backward.
OWN_GROUP_KINDS = {"dp_grad": "dp", "edp_grad": "edp"}


@dataclass(frozen=True)
class Layout:
    """Pure rank layout: degrees and, per group kind, the list of rank lists."""

    world_size: int
    pp: int
    dp: int
    ep: int
    ranks_per_node: int
    groups: dict[str, list[list[int]]]

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def group_of(self, kind: str, rank: int) -> list[int]:
        """The ranks of the `kind` group that contains `rank`."""
        for ranks in self.groups[kind]:
            if rank in ranks:
                return ranks
        raise AssertionError(f"rank {rank} is in no {kind} group")


def _fail(msg: str):
    raise ValueError(msg)


def _check_degrees(world: int, pp: int, dp: int, ep: int, rpn: int) -> int:
    """Validate degrees; returns dp with -1 resolved. Errors are one line naming the fix."""
    if world < 1:
        _fail(f"world_size = {world}: must be >= 1")
    if world % pp:
        _fail(f"parallel.pp = {pp}: must divide the world size ({world})")
    if dp == -1:
        dp = world // pp
    if pp * dp != world:
        _fail(f"parallel.dp = {dp}, parallel.pp = {pp}: pp * dp = {pp * dp} must equal the world size ({world})")
    if dp % ep:
        _fail(f"parallel.ep = {ep}: must divide parallel.dp ({dp}); experts are spread over data-parallel ranks")
    if rpn < 1 or world % rpn:
        _fail(f"parallel.ranks_per_node = {rpn}: must be >= 1 and divide the world size ({world})")
    return dp


def _split_ep_by_node(ep_ranks: list[int], rpn: int) -> tuple[list[list[int]], list[list[int]]]:
    """Split one ep group into per-node groups (intra) and per-local-index groups (inter)."""
    by_node: dict[int, list[int]] = {}
    for r in ep_ranks:
        by_node.setdefault(r // rpn, []).append(r)
    sizes = {len(v) for v in by_node.values()}
    if len(sizes) != 1:
        _fail(f"parallel.ranks_per_node = {rpn}: the ep group {ep_ranks} puts an unequal number of ranks "
              f"on each node; make ep a multiple or a divisor of ranks_per_node")
    intra = [by_node[n] for n in sorted(by_node)]
    inter = [[grp[i] for grp in intra] for i in range(len(intra[0]))]
    return intra, inter


def plan_layout(world_size: int, *, pp: int = 1, dp: int = -1, ep: int = 1, ranks_per_node: int = 0) -> Layout:
    """Every group's rank lists for a (pp, dp, ep) layout; pure, testable without processes."""
    rpn = ranks_per_node or world_size
    dp = _check_degrees(world_size, pp, dp, ep, rpn)
    edp = dp // ep
    groups: dict[str, list[list[int]]] = {k: [] for k in GROUP_KINDS}
    groups["pp"] = [[p * dp + d for p in range(pp)] for d in range(dp)]
    for p in range(pp):
        base = p * dp
        groups["dp"].append([base + d for d in range(dp)])
        for e in range(edp):
            ep_ranks = [base + e * ep + j for j in range(ep)]
            groups["ep"].append(ep_ranks)
            intra, inter = _split_ep_by_node(ep_ranks, rpn)
            groups["ep_intra"].extend(intra)
            groups["ep_inter"].extend(inter)
        for j in range(ep):
            groups["edp"].append([base + e * ep + j for e in range(edp)])
    return Layout(world_size, pp, dp, ep, rpn, groups)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment {name} = {value!r}: must be an integer") from None


@dataclass
class Topology:
    """This rank's place in the layout and its process groups (None when the group is just me)."""

    layout: Layout
    rank: int
    groups: dict[str, object] = field(default_factory=dict, repr=False)

    # ---- construction
    @classmethod
    def from_config(cls, parallel_cfg, world_size: int | None = None, rank: int | None = None,
                    num_experts: int | None = None) -> "Topology":
        """Build from `ParallelConfig` and WORLD_SIZE / RANK / LOCAL_WORLD_SIZE.

        Creates the process groups when torch.distributed is initialised and world > 1
        (every rank must call this, in the same order). World 1 needs no process group.
        """
        world = world_size if world_size is not None else _env_int("WORLD_SIZE", 1)
        rank = rank if rank is not None else _env_int("RANK", 0)
        rpn = parallel_cfg.ranks_per_node or _env_int("LOCAL_WORLD_SIZE", world)
        layout = plan_layout(world, pp=parallel_cfg.pp, dp=parallel_cfg.dp, ep=parallel_cfg.ep, ranks_per_node=rpn)
        if not 0 <= rank < world:
            _fail(f"RANK = {rank}: must be in [0, {world})")
        if num_experts is not None and num_experts % layout.ep:
            _fail(f"moe.num_experts = {num_experts}: must be divisible by parallel.ep ({layout.ep})")
        topo = cls(layout, rank)
        if world > 1:
            if not dist.is_initialized():
                _fail(f"WORLD_SIZE = {world}: torch.distributed must be initialised before building the topology")
            if dist.get_world_size() != world:
                _fail(f"WORLD_SIZE = {world}: the process group has {dist.get_world_size()} ranks")
            topo.groups = _create_groups(layout, rank)
        return topo

    # ---- degrees and coordinates
    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def edp(self) -> int:
        return self.layout.edp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.ep

    @property
    def node(self) -> int:
        return self.rank // self.layout.ranks_per_node

    @property
    def ep_intra_size(self) -> int:
        """ep ranks per node (G)."""
        return len(self.ranks("ep_intra"))

    @property
    def ep_nodes(self) -> int:
        """Nodes the ep group spans."""
        return len(self.ranks("ep_inter"))

    def ranks(self, kind: str) -> list[int]:
        """Global ranks of my `kind` group."""
        return self.layout.group_of(OWN_GROUP_KINDS.get(kind, kind), self.rank)

    def group(self, kind: str):
        """Process group of `kind` (None in a world of one: collectives are skipped there)."""
        if kind not in GROUP_KINDS and kind not in OWN_GROUP_KINDS:
            raise KeyError(f"unknown group kind {kind!r}; one of {GROUP_KINDS + tuple(OWN_GROUP_KINDS)}")
        return self.groups.get(kind)

    def size(self, kind: str) -> int:
        return len(self.ranks(kind))

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: pp {self.pp_rank}/{self.pp} dp {self.dp_rank}/{self.dp} "
                f"ep {self.ep_rank}/{self.ep} edp {self.edp_rank}/{self.edp} node {self.node}/{self.layout.num_nodes}")


def _create_groups(layout: Layout, rank: int) -> dict[str, object]:
    """new_group for every rank list of every kind, in one order on all ranks; keep mine."""
    mine: dict[str, object] = {}
    made: dict[tuple[int, ...], object] = {}
    for kind in GROUP_KINDS:
        for ranks in layout.groups[kind]:
            key = tuple(ranks)
            if key not in made:
                made[key] = dist.new_group(list(ranks)) if len(ranks) < layout.world_size else dist.group.WORLD
            if rank in ranks:
                mine[kind] = made[key]
    for kind, same_as in OWN_GROUP_KINDS.items():
        for ranks in layout.groups[same_as]:
            group = dist.new_group(list(ranks))
            if rank in ranks:
                mine[kind] = group
    return mine
