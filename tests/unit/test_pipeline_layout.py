"""Pipeline layouts: stage -> blocks lists, validated, balanced, described."""
import pytest

from parallel.pipeline.layout import balanced_layout, describe_layout, even_layout, num_stages, resolve_layout
from parallel.pipeline.model_stage import rank_stages, ranks_of_stages
from parallel.pipeline.schedules import build_schedule
from trainer.config import ConfigError, load_config


def test_even_layout_matches_the_near_equal_split():
    assert even_layout(61, 16)[0] == [0, 1, 2] and len(even_layout(61, 16)[-1]) == 4
    assert [i for s in even_layout(61, 16) for i in s] == list(range(61))


def test_counts_and_lists_resolve_to_the_same_layout():
    assert resolve_layout([1, 3], 4, 2) == resolve_layout([[0], [1, 2, 3]], 4, 2) == [[0], [1, 2, 3]]
    assert resolve_layout([], 4, 2) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("spec, why", [
    ([[0], [0, 1, 2, 3]], "block 0 is listed twice"),
    ([[0], [1, 2]], "blocks [3] are in no stage"),
    ([[0, 2], [1, 3]], "in order"),
    ([[0], [1, 2, 3, 4]], "block 4 does not exist"),
    ([1, 2], "sum to 3"),
    ([4, 0], "at least one block"),
    ([1, 1, 2], "3 stages, but the pipeline has 2"),
])
def test_bad_layouts_are_one_line_naming_value_and_fix(spec, why):
    with pytest.raises(ValueError) as e:
        resolve_layout(spec, 4, 2)
    msg = str(e.value)
    assert why in msg and str(spec) in msg and "e.g. [2, 2]" in msg and "\n" not in msg


def test_config_rejects_a_layout_that_does_not_cover_the_blocks_once():
    with pytest.raises(ConfigError, match=r"parallel\.layout = \[\[0\], \[0, 1, 2, 3\]\]: block 0 is listed twice"):
        load_config(None, ["parallel.pp=2", "parallel.layout=[[0],[0,1,2,3]]"])
    with pytest.raises(ConfigError, match="parallel.layout = \\[2, 2\\]: 2 stages, but the pipeline has 4"):
        load_config(None, ["parallel.pp=2", "parallel.schedule=dualpipev", "train.grad_accum=4",
                           "parallel.layout=[2,2]"])
    assert load_config(None, ["parallel.pp=2", "parallel.layout=[1,3]"]).parallel.layout == [1, 3]


def test_num_stages_per_schedule():
    assert [num_stages(s, 4) for s in ("1f1b", "zb1p", "dualpipe", "dualpipev")] == [4, 4, 4, 8]
    assert num_stages("dualpipev", 1) == 1


def test_rank_stages_follow_the_configured_layout():
    cfg = load_config(None, ["parallel.pp=2", "parallel.schedule=dualpipev", "train.grad_accum=4",
                             "parallel.layout=[1,1,1,1]"])
    sched = build_schedule("dualpipev", 2, 4)
    assert rank_stages(cfg, sched, 0) == [(0, [0]), (3, [3])]
    cfg = load_config(None, ["parallel.pp=2", "parallel.layout=[3,1]"])
    assert rank_stages(cfg, build_schedule("1f1b", 2, 2), 1) == [(1, [3])]


def test_balanced_layout_minimises_the_largest_stage():
    # 61 equal blocks on 16 stages, embedding + head/MTP worth one and two blocks
    layout = balanced_layout([1.0] * 61, 16, first_extra=1.0, last_extra=2.0)
    costs = [len(b) + (1.0 if s == 0 else 0) + (2.0 if s == 15 else 0) for s, b in enumerate(layout)]
    assert [i for b in layout for i in b] == list(range(61))
    assert max(costs) == 4.0  # ceil((61 + 3) / 16)
    assert len(layout[-1]) == 2 and len(layout[0]) == 3
    assert balanced_layout([5, 1, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4, 5]]


def test_describe_layout_names_ranks_and_extras():
    sched = build_schedule("dualpipe", 2, 4)
    text = describe_layout([[0, 1], [2, 3]], ranks_of_stages(sched), mtp_depth=1)
    assert text.splitlines() == ["stage 0 (rank 0, 1): embedding + blocks 0-1",
                                 "stage 1 (rank 0, 1): blocks 2-3 + norm, head, MTP"]
