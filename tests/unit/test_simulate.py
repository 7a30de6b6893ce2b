"""The schedule simulator reproduces DeepSeek-V3 Table 2 (F = I = W = 1) and draws a Gantt chart."""
import pytest

from parallel.pipeline.schedules import build_schedule
from parallel.pipeline.simulate import Costs, draw_gantt, main, replay


def _bubbles(name, ranks, n, **costs):
    rp = replay(build_schedule(name, ranks, n), Costs(**costs))
    return [rp.bubble(r) for r in range(ranks)], rp


@pytest.mark.parametrize("pp,want", [(4, 9), (8, 21), (16, 45)])
def test_1f1b_bubble_is_pp_minus_1_times_f_plus_b(pp, want):
    bubbles, rp = _bubbles("1f1b", pp, 2 * pp + 4)
    assert bubbles == [want] * pp == [(pp - 1) * (1 + 2)] * pp
    assert max(rp.peak_activations(r) for r in range(pp)) == pp


@pytest.mark.parametrize("pp,want", [(4, 3), (8, 7), (16, 15)])
def test_zb1p_bubble_is_pp_minus_1_times_f_plus_b_minus_2w(pp, want):
    bubbles, rp = _bubbles("zb1p", pp, 2 * pp + 4)
    assert bubbles == [want] * pp
    assert max(rp.peak_activations(r) for r in range(pp)) == pp


@pytest.mark.parametrize("pp,fb,want", [(4, 2, 1), (8, 2, 3), (16, 2, 7), (4, 3, 2), (8, 3, 6), (16, 3, 14)])
def test_dualpipe_and_v_bubbles(pp, fb, want):
    # (PP/2 - 1)(F&B + B - 3W); DualPipeV runs PP stages on PP/2 ranks
    assert want == (pp // 2 - 1) * (fb + 2 - 3)
    for name, ranks in (("dualpipe", pp), ("dualpipev", pp // 2)):
        bubbles, rp = _bubbles(name, ranks, 2 * pp + 2, FB=fb)
        assert max(bubbles) == want, name
        assert [rp.peak_activations(r) for r in range(ranks)] == [pp + 1] * ranks


def test_parameter_copies():
    assert build_schedule("dualpipe", 4, 8).placement.copies == 2
    assert build_schedule("dualpipev", 4, 8).placement.copies == 1
    assert build_schedule("zb1p", 4, 8).placement.copies == 1


def test_unequal_costs_regression_values():
    # not covered by the closed forms: pinned from this replay
    assert _bubbles("1f1b", 4, 8, F=1, I=1.5, W=0.5, latency=0.1)[0] == pytest.approx([10.6] * 4)
    got = _bubbles("dualpipev", 4, 10, F=1, I=1.5, W=0.5, FB=2.5, latency=0.1)[0]
    assert got == pytest.approx(REGRESSION_DUALPIPEV)


REGRESSION_DUALPIPEV = [9.9, 10.4, 10.9, 11.4]  # pinned from this replay


def test_overlap_costs_make_pairs_cheaper():
    c = Costs.from_overlap(f_compute=1.0, f_comm=0.5, b_compute=2.0, b_comm=1.0)
    assert c.F == 1.5 and c.B == 3.0 and c.pair() == 3.0 < c.F + c.B


def test_cli_prints_table_and_writes_png(tmp_path, capsys):
    png = tmp_path / "g.png"
    rp = main(["--schedule", "dualpipe", "--pp", "8", "--micro", "20", "--FB", "2", "--png", str(png)])
    out = capsys.readouterr().out
    assert "makespan" in out and "bubble" in out and out.count("\n") >= 10
    assert png.stat().st_size > 5000 and rp.makespan > 0


def test_costs_from_a_measured_timeline_are_means_per_action_kind():
    from parallel.pipeline.actions import FB, Action, F
    timeline = [(F(0), 0.0, 2.0), (F(1), 2.0, 6.0), (Action("I", 0, 0), 6.0, 9.0), (Action("W", 0, 0), 9.0, 10.0),
                (FB(2, 0, 1, 0, "I"), 10.0, 15.0), (Action("SEND", 0, 0, peer=1, kind="act"), 15.0, 15.5)]
    c = Costs.from_timeline([timeline], latency=0.5)
    assert (c.F, c.I, c.W, c.FB, c.latency) == (3.0, 3.0, 1.0, 6.0, 0.5)
    one_f_one_b = Costs.from_timeline([[(F(0), 0.0, 1.0), (Action("B", 0, 0), 1.0, 3.0)]])
    assert (one_f_one_b.B, one_f_one_b.FB) == (2.0, None)


def _measured(compute_lists, cost_of):
    """A hand-built timeline per rank: its compute actions back to back, each `cost_of(rank, action)` long."""
    out = []
    for r, acts in enumerate(compute_lists):
        t, tl = 0.0, []
        for a in acts:
            tl.append((a, t, t + cost_of(r, a)))
            t += cost_of(r, a)
        out.append(tl)
    return out


def test_per_stage_costs_make_the_step_follow_the_slow_stage():
    # 1F1B, 2 ranks, 4 micro-batches; stage 1 (the head) costs 4x stage 0: F 1 -> 4, B 2 -> 8
    s = build_schedule("1f1b", 2, 4)
    slow = {0: 1.0, 1: 4.0}
    timelines = _measured(s.compute, lambda r, a: slow[r] * (1.0 if a.op == "F" else 2.0))
    per_stage = Costs.from_timeline(timelines, placement=s.placement)
    assert (per_stage.at("F", 0), per_stage.at("B", 0), per_stage.at("F", 1), per_stage.at("B", 1)) == (1, 2, 4, 8)
    assert (per_stage.F, per_stage.B) == (2.5, 5.0)  # the per-kind means are kept
    assert Costs.from_timeline(timelines[::-1], placement=s.placement, ranks=[1, 0]).stages == per_stage.stages
    # the head stage sets the pace: stage 0's first F, 4 x (F + B) of stage 1, stage 0's last B
    assert replay(s, per_stage).makespan == pytest.approx(1 + 4 * (4 + 8) + 2)
    # per kind, both stages cost the mean: (N + PP - 1)(F + B), well under the slow stage's pace
    assert replay(s, Costs.from_timeline(timelines)).makespan == pytest.approx(5 * 7.5)


def test_per_stage_costs_round_trip_through_a_timeline_with_pairs():
    # costs per stage -> replay -> its spans as the measured timeline -> the same replay
    s = build_schedule("dualpipev", 2, 6)
    truth = Costs(F=1.0, I=1.0, W=0.5, FB=2.0, stages={(3, "F"): 4.0, (3, "I"): 4.0, (3, "W"): 2.0,
                                                      (1, "F"): 1.5})
    rp = replay(s, truth)
    timelines = [[(a, t0, t1) for a, t0, t1 in spans if a.op not in ("SEND", "RECV")] for spans in rp.spans]
    back = Costs.from_timeline(timelines, placement=s.placement)
    assert back.at("F", 3) == 4.0 and back.at("B", 3) == 6.0 and back.at("F", 0) == 1.0
    assert any(a.op == "FB" for tl in timelines for a, _, _ in tl) and back.pairs
    assert replay(s, back).makespan == pytest.approx(rp.makespan)
    assert replay(s, Costs.from_timeline(timelines)).makespan != pytest.approx(rp.makespan)
