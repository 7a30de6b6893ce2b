"""Pure layout math of parallel.topology: degrees, group rank lists, node split, errors."""
import pytest

from parallel.config import ParallelConfig
from parallel.topology import Topology, plan_layout


def test_pp2_dp4_ep2_groups():
    lay = plan_layout(8, pp=2, ep=2)
    assert (lay.dp, lay.edp) == (4, 2)
    assert lay.groups["dp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.groups["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.groups["edp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_every_rank_in_exactly_one_group_of_each_kind():
    lay = plan_layout(16, pp=2, ep=4, ranks_per_node=2)
    for kind, lists in lay.groups.items():
        flat = sorted(r for ranks in lists for r in ranks)
        assert flat == list(range(16)), kind


def test_ep_split_over_emulated_nodes():
    lay = plan_layout(8, ep=8, ranks_per_node=4)
    assert lay.groups["ep_intra"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.groups["ep_inter"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    lay = plan_layout(8, ep=4, ranks_per_node=2)  # two ep groups, each over two nodes
    assert lay.groups["ep_intra"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.groups["ep_inter"] == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_ep_inside_one_node_has_trivial_inter_groups():
    lay = plan_layout(8, ep=2, ranks_per_node=4)
    assert lay.groups["ep_intra"] == lay.groups["ep"]
    assert all(len(g) == 1 for g in lay.groups["ep_inter"])


def test_coordinates():
    t = Topology(plan_layout(8, pp=2, ep=2, ranks_per_node=2), 6)
    assert (t.pp_rank, t.dp_rank, t.ep_rank, t.edp_rank, t.node) == (1, 2, 0, 1, 3)
    assert t.ranks("ep") == [6, 7] and t.ranks("edp") == [4, 6]
    assert (t.ep_nodes, t.ep_intra_size) == (1, 2)


def test_single_process_without_init():
    topo = Topology.from_config(ParallelConfig(), world_size=1, rank=0)
    assert (topo.dp, topo.pp, topo.ep, topo.edp) == (1, 1, 1, 1)
    assert topo.group("dp") is None and topo.size("ep") == 1


def test_reads_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert Topology.from_config(ParallelConfig()).world_size == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(world_size=6, pp=4), "pp = 4: must divide the world size"),
    (dict(world_size=8, pp=2, dp=3), "pp \\* dp = 6 must equal the world size"),
    (dict(world_size=8, ep=3), "ep = 3: must divide parallel.dp"),
    (dict(world_size=8, ep=2, ranks_per_node=3), "ranks_per_node = 3"),
    (dict(world_size=12, ep=6, ranks_per_node=4), "unequal number of ranks"),
])
def test_bad_layouts_fail_with_one_line(kwargs, match):
    world = kwargs.pop("world_size")
    with pytest.raises(ValueError, match=match) as err:
        plan_layout(world, **kwargs)
    assert "\n" not in str(err.value)


def test_experts_must_divide_over_ep():
    with pytest.raises(ValueError, match="num_experts = 6: must be divisible by parallel.ep"):
        Topology.from_config(ParallelConfig(ep=4, dp=4), world_size=4, rank=0, num_experts=6)


def test_world_above_one_needs_init():
    with pytest.raises(ValueError, match="must be initialised"):
        Topology.from_config(ParallelConfig(), world_size=2, rank=0)
