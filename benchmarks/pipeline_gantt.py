"""The simulator held against the measured timeline (DeepSeek-V3 section 3.2.1, Table 2).

For each of our runtimes at one injected latency: the measured timeline (`PipelineRuntime`'s
`timeline`, every action's start and end on every rank) and the simulator's replay of the same
lowered action lists, fed `Costs.from_timeline` of each measured round (mean milliseconds per
model stage and action kind over all ranks of that round; no point-to-point latency; the median
replay over rounds is the prediction), and for comparison the replay fed one mean per action
kind (every stage alike). Reported: predicted vs
measured step time (the schedule alone, slowest rank, median over rounds), the bubble fraction
of each (the worst rank's idle share of the step; measured: the pipeline of ep rank 0, median
over rounds) and whether the two order the schedules alike: a pair of schedules is out of order
when the measurement separates them by more than `TIE` (one percentage point of bubble, below
what this benchmark repeats to) and the prediction separates them the other way by more than
`TIE`; closer pairs are ties on that side and agree with any order. `draw` puts the measured Gantt
(the median round) next to the simulated one, one row of panels per runtime, as a PNG.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from parallel.pipeline.schedules import build_schedule
from parallel.pipeline.simulate import Costs, Replay, plot_gantt, replay
from pipeline_model import PP, RUNTIMES


@dataclass
class SimRow:
    label: str
    measured_ms: float
    predicted_ms: float
    measured_bubble: float
    predicted_bubble: float
    per_kind_ms: float    # the replay with one cost per action kind
    per_kind_bubble: float
    measured: Replay      # the median round, pipeline of ep rank 0, ms from its first action
    simulated: Replay

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1

    @property
    def per_kind_error(self) -> float:
        return self.per_kind_ms / self.measured_ms - 1


def _bubble(rp: Replay) -> float:
    return max(rp.bubble(r) for r in range(rp.schedule.num_ranks)) / rp.makespan if rp.makespan else 0.0


def _measured_replay(schedule, timelines: list) -> Replay:
    """A Replay of one round's measured spans (timelines in pp-rank order), ms from the first start."""
    t0 = min(t for tl in timelines for _, t, _ in tl)
    spans = [[(a, 1000 * (s - t0), 1000 * (e - t0)) for a, s, e in tl] for tl in timelines]
    return Replay(schedule, Costs(), spans)


def sim_row(label: str, micro: int, ranks: list) -> SimRow:
    """ranks: per rank {"pp_rank", "ep_rank", "series": Series of this label at this latency}.

    Each timed round is replayed with that round's own costs and the median replay is compared
    with the median measured round, so a slow round (a loaded machine) weighs on both sides alike."""
    s = build_schedule(RUNTIMES[label][1], PP, micro)
    rounds = range(1, len(ranks[0]["series"].run))
    pp_ranks = [r["pp_rank"] for r in ranks]
    simulated, per_kind = [], []
    for i in rounds:
        in_ms = [[(a, 1000 * t0, 1000 * t1) for a, t0, t1 in r["series"].timelines[i]] for r in ranks]
        simulated.append(replay(s, Costs.from_timeline(in_ms, placement=s.placement, ranks=pp_ranks)))
        per_kind.append(replay(s, Costs.from_timeline(in_ms)))
    simulated, per_kind = _median_replay(simulated), _median_replay(per_kind)
    runs = [max(r["series"].run[i] for r in ranks) for i in rounds]
    pipe0 = sorted((r for r in ranks if r["ep_rank"] == 0), key=lambda r: r["pp_rank"])
    measured = [_measured_replay(s, [r["series"].timelines[i] for r in pipe0]) for i in rounds]
    median_round = sorted(range(len(runs)), key=runs.__getitem__)[len(runs) // 2]
    return SimRow(label, 1000 * statistics.median(runs), simulated.makespan,
                  statistics.median(_bubble(m) for m in measured), _bubble(simulated),
                  per_kind.makespan, _bubble(per_kind), measured[median_round], simulated)


def _median_replay(replays: list[Replay]) -> Replay:
    """The replay of median makespan (the upper one of an even count, as for the measured rounds)."""
    return sorted(replays, key=lambda rp: rp.makespan)[len(replays) // 2]


def stage_costs(c: Costs) -> list[float]:
    """F + B of each stage that has per-stage costs, in stage order."""
    stages = sorted({s for s, _ in c.stages})
    return [c.at("F", s) + c.at("B", s) for s in stages]


TIE = 0.01  # bubble fractions closer than one percentage point are a tie


def ranking(rows: list[SimRow], key) -> list[str]:
    return [r.label for r in sorted(rows, key=key)]


def out_of_order(rows: list[SimRow], measured, predicted, tie: float = TIE) -> list[tuple[str, str]]:
    """Pairs (a, b): measured a < b by more than `tie`, predicted b < a by more than `tie`."""
    return [(a.label, b.label) for a in rows for b in rows
            if measured(b) - measured(a) > tie and predicted(a) - predicted(b) > tie]


def format_sim(rows: list[SimRow], ms: float) -> str:
    lines = [f"simulator vs measured at {ms:g} ms: costs = measured mean ms per stage and action kind "
             f"(per kind: one mean per action kind, every stage alike)",
             f"{'runtime':<24} {'measured ms':>11} {'predicted ms':>12} {'error':>7} {'per kind':>8} "
             f"{'bubble meas.':>12} {'bubble pred.':>12} {'per kind':>8}"]
    for r in rows:
        lines.append(f"{r.label:<24} {r.measured_ms:>11.1f} {r.predicted_ms:>12.1f} {100 * r.error:>+6.1f}% "
                     f"{100 * r.per_kind_error:>+7.1f}% {100 * r.measured_bubble:>11.1f}% "
                     f"{100 * r.predicted_bubble:>11.1f}% {100 * r.per_kind_bubble:>7.1f}%")
    lines.append("measured F + B ms per stage (embedding side first): " + "; ".join(
        f"{r.label.removeprefix('ours ')} {' / '.join(f'{v:.0f}' for v in stage_costs(r.simulated.costs))}"
        for r in rows))
    meas = ranking(rows, lambda r: r.measured_bubble)
    for name, key in (("per stage", lambda r: r.predicted_bubble), ("per kind", lambda r: r.per_kind_bubble)):
        pred = ranking(rows, key)
        bad = out_of_order(rows, lambda r: r.measured_bubble, key)
        same = "yes" if meas == pred else f"yes, up to ties within {100 * TIE:g} points" if not bad else "no"
        lines.append(f"bubble ranking (least first), {name} costs, predicted == measured: {same}")
        if meas != pred:
            lines += [f"  measured:  {' < '.join(meas)}", f"  predicted: {' < '.join(pred)}"]
        lines += [f"  out of order: {a} < {b} measured, the reverse predicted" for a, b in bad]
    return "\n".join(lines)


def draw(rows: list[SimRow], ms: float, path: str) -> None:
    """Measured (left) and simulated (right) Gantt charts, one row per runtime, same time axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(18, 1.9 * len(rows) + 0.6), squeeze=False)
    for (left, right), r in zip(axes, rows):
        plot_gantt(r.measured, left, f"{r.label}: measured {r.measured.makespan:.0f} ms (ep rank 0)")
        plot_gantt(r.simulated, right, f"{r.label}: simulated {r.simulated.makespan:.0f} ms")
        end = 1.02 * max(r.measured.makespan, r.simulated.makespan)
        for ax in (left, right):
            ax.set_xlim(0, end)
            ax.set_xlabel("ms")
    fig.suptitle(f"pp=2 x ep=2, injected all-to-all latency {ms:g} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
