"""Pipeline schedules as data: per-rank action lists and their invariants (no processes)."""
import dataclasses

import pytest

from parallel.pipeline.actions import Action
from parallel.pipeline.checks import problems, validate
from parallel.pipeline.schedules import SCHEDULE_NAMES, build_schedule

SIZES = [(name, pp, n) for name in SCHEDULE_NAMES for pp in range(1, 7) for n in range(1, 19)
         if not (name.startswith("dualpipe") and (n < 2 * pp or (name == "dualpipe" and (pp % 2 or n % 2))))]


@pytest.mark.parametrize("name,pp,n", SIZES)
def test_every_valid_size_passes_all_checks(name, pp, n):
    s = build_schedule(name, pp, n)
    assert problems(s) == []


@pytest.mark.parametrize("name,pp,n", [("dualpipe", 3, 12), ("dualpipe", 4, 7), ("dualpipe", 4, 6),
                                       ("dualpipev", 4, 7), ("nope", 2, 4), ("1f1b", 0, 4)])
def test_impossible_sizes_raise(name, pp, n):
    with pytest.raises(ValueError):
        build_schedule(name, pp, n)


def _ops(acts):
    return [(op, m, c) for a in acts for op, m, c in a.parts()]


def test_1f1b_order_on_two_ranks():
    s = build_schedule("1f1b", 2, 3)
    assert [str(a) for a in s.compute[0]] == ["F0.0", "F1.0", "B0.0", "F2.0", "B1.0", "B2.0"]
    assert [str(a) for a in s.compute[1]] == ["F0.0", "B0.0", "F1.0", "B1.0", "F2.0", "B2.0"]
    assert [str(a) for a in s.lowered[1]][:3] == ["Ract0.0<-0", "F0.0", "B0.0"]


def test_zb1p_defers_r_weight_grads():
    s = build_schedule("zb1p", 4, 8)
    for r, acts in enumerate(s.compute):
        pending = peak = 0
        for a in acts:
            pending += (a.op == "I") - (a.op == "W")
            peak = max(peak, pending)
        assert peak == r + 1  # r held back plus the one just produced
        assert acts[-1].op == "W"


def test_dualpipev_places_both_ends_on_rank0_and_turns_locally():
    s = build_schedule("dualpipev", 4, 8)
    route = s.placement.routes[0]
    assert route[0] == (0, 0) and route[-1] == (0, 1) and route[3:5] == ((3, 0), (3, 1))
    # no message crosses from rank 3 to itself; rank 3 never receives chunk-1 activations
    assert not any(a.op == "RECV" and a.kind == "act" and a.chunk == 1 for a in s.lowered[3])
    assert sum(a.op == "FB" for a in s.compute[0]) == 2 * (8 - 8 + 1) + 3


def test_dualpipe_splits_micro_batches_between_directions():
    s = build_schedule("dualpipe", 4, 8)
    assert s.placement.copies == 2
    assert s.placement.routes[0][0] == (0, 0) and s.placement.routes[7][0] == (3, 1)
    for r in range(4):
        fwd = [(m, c) for op, m, c in _ops(s.compute[r]) if op == "F"]
        assert sorted(m for m, c in fwd if c == 0) == [0, 1, 2, 3]
        assert sorted(m for m, c in fwd if c == 1) == [4, 5, 6, 7]
    # the mirrored ranks run the same pattern with the chunks swapped
    swap = [(op, m, 1 - c) for op, m, c in _ops(s.compute[3])]
    assert [op for op, _, _ in swap] == [op for op, _, _ in _ops(s.compute[0])]


def test_eight_phase_counts_match_the_description():
    R, N = 4, 10
    s = build_schedule("dualpipev", R, N)
    for r, acts in enumerate(s.compute):
        assert sum(a.op == "FB" for a in acts) == 2 * (N - 2 * R + r + 1) + (R - r - 1)
        assert [a.op for a in acts[:2 * (R - r - 1)]] == ["F"] * (2 * (R - r - 1))
        assert all(a.op == "W" for a in acts[-(r + 1):])


def _rebuild(s, rank, acts):
    lowered = list(s.lowered)
    lowered[rank] = tuple(acts)
    return dataclasses.replace(s, lowered=tuple(lowered))


def test_checks_catch_a_backward_before_its_forward():
    s = build_schedule("1f1b", 2, 3)
    acts = list(s.compute[1])
    acts[0], acts[1] = acts[1], acts[0]
    compute = list(s.compute)
    compute[1] = tuple(acts)
    bad = dataclasses.replace(s, compute=tuple(compute))
    bad = _rebuild(bad, 1, [a for a in bad.lowered[1]][:1] + [acts[0], acts[1]] + list(s.lowered[1][3:]))
    assert any("before its forward" in p for p in problems(bad))


def test_checks_catch_mismatched_streams_and_deadlock():
    s = build_schedule("1f1b", 3, 4)
    acts = list(s.lowered[2])
    recvs = [i for i, a in enumerate(acts) if a.op == "RECV"]
    acts[recvs[0]], acts[recvs[1]] = acts[recvs[1]], acts[recvs[0]]
    found = problems(_rebuild(s, 2, acts))
    assert any("stream 1->2" in p for p in found)
    # a rank that waits for a gradient before sending the activation that produces it
    acts = [a for a in s.lowered[0] if a.op != "SEND"]
    found = problems(_rebuild(s, 0, acts))
    assert any("no rank can proceed" in p for p in found)
    with pytest.raises(ValueError, match="invalid"):
        validate(_rebuild(s, 0, acts))


def test_checks_catch_a_missing_weight_grad():
    s = build_schedule("zb1p", 2, 4)
    compute = list(s.compute)
    compute[0] = tuple(a for a in compute[0] if a != Action("W", 3, 0))
    assert any("I x1 vs W x0" in p for p in problems(dataclasses.replace(s, compute=tuple(compute))))


@pytest.mark.parametrize("name", ["1f1b", "zb1p"])
@pytest.mark.parametrize("pp, n", [(1, 1), (1, 5), (2, 2), (2, 8), (4, 4), (4, 16)])
def test_paired_linear_schedules_run_every_micro_batch_once_and_gain_from_overlap(name, pp, n):
    from parallel.pipeline.simulate import Costs, replay
    paired, plain = build_schedule(name, pp, n, paired=True), build_schedule(name, pp, n)
    for acts in paired.compute:  # every micro-batch forward once and backward once, pairs of two micro-batches
        parts = [p for a in acts for p in a.parts()]
        assert sorted(m for op, m, _ in parts if op == "F") == list(range(n))
        assert sorted(m for op, m, _ in parts if op in ("B", "I")) == list(range(n))
        assert all(a.micro != a.micro2 for a in acts if a.op == "FB")
    if n >= 2 * pp:  # past the warm-up of 2(pp - r) - 1 forwards every rank pairs
        assert all(any(a.op == "FB" for a in acts) for acts in paired.compute)
    serial_pairs, hidden = Costs(), Costs.from_overlap(1.0, 0.5, 2.0, 0.5)
    if name == "1f1b":  # with nothing to hide, the warm-up keeps 1F1B's makespan
        assert replay(paired, serial_pairs).makespan == replay(plain, serial_pairs).makespan
    if n >= 2 * pp:
        assert replay(paired, hidden).makespan < replay(plain, hidden).makespan


def test_paired_pp1_is_first_forward_pairs_last_backward():
    s = build_schedule("1f1b", 1, 4, paired=True)
    assert " ".join(map(str, s.compute[0])) == "F0.0 F1.0&B0.0 F2.0&B1.0 F3.0&B2.0 B3.0"
