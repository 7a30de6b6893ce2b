"""Replay a schedule's action lists with per-action costs: makespan, bubbles, memory, Gantt.

The replay walks every rank's lowered list (compute + SEND/RECV) in order. A compute action
costs `Costs.of(op, stage)`; a SEND is free and stamps the time its message leaves; a RECV waits for
the matching SEND plus `latency`. A rank that reaches a RECV whose SEND has not run yet waits;
if no rank can move, the schedule deadlocks (`Deadlock`). This is the same replay the checks
use, so a schedule that simulates is also one that runs. Costs are per action kind, or per
model stage and kind where the stages differ (the stage holding the output head and MTP costs
several plain stages), the stage of an action being its placement's `stage_of(rank, chunk)`.

Reported per rank: busy time, bubble = makespan - busy, peak live activations (a forward's
activations live from its F until its B or I; W-only leftovers are not counted, as in
DeepSeek-V3 Table 2) and the model-parameter copies. With F = I = W = 1 the bubbles equal the
closed forms of DeepSeek-V3 Table 2 (section 3.2.1): 1F1B (PP-1)(F+B), ZB1P (PP-1)(F+B-2W),
DualPipe (PP/2-1)(F&B+B-3W); DualPipeV matches DualPipe with PP = 2 x ranks (its stages).
`Costs.from_timeline` takes the costs from a measured run (`PipelineRuntime(record_timeline=True)`).

Paired 1F1B / ZB1P (`build_schedule(..., paired=True)`, what `parallel.overlap` runs with
ep > 1) replay their F&B pairs at the FB cost like DualPipe's; with pp = 1 they are the paired
micro-batches of a data x expert parallel run (F0, F1&B0, ..., B(N-1)).

CLI: python -m parallel.pipeline.simulate --schedule dualpipe --pp 8 --micro 20 [--png out.png]
     python -m parallel.pipeline.simulate --schedule zb1p --paired --pp 4 --micro 16 --FB 1.5
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from .actions import Action
from .schedules import SCHEDULE_NAMES, Schedule, build_schedule


class Deadlock(RuntimeError):
    """No rank can make progress: some RECV waits for a SEND that never comes."""


@dataclass
class Costs:
    """Time units per action. FB = the cost of an overlapped F&B pair (default F + B: no overlap).

    `stages` optionally refines F, I and W per model stage: (stage, op) -> cost, op one of "F",
    "I", "W"; and `pairs` an F&B pair per (stage of its F, stage of its backward). A stage or pair
    missing there costs the per-kind value (a missing pair: its F + B scaled like FB / (F + B))."""

    F: float = 1.0
    I: float = 1.0
    W: float = 1.0
    FB: float | None = None
    latency: float = 0.0
    stages: dict[tuple[int, str], float] = field(default_factory=dict)
    pairs: dict[tuple[int, int], float] = field(default_factory=dict)

    @property
    def B(self) -> float:
        return self.I + self.W

    def pair(self) -> float:
        return self.F + self.B if self.FB is None else self.FB

    def at(self, op: str, stage: int = -1) -> float:
        """F, I, W or B of one stage (the per-kind value where the stage has none)."""
        if op == "B":
            return self.at("I", stage) + self.at("W", stage)
        return self.stages.get((stage, op), getattr(self, op))

    def pair_at(self, stage: int = -1, stage2: int = -1) -> float:
        """A full F&B pair whose F runs on `stage` and whose backward runs on `stage2`."""
        if (stage, stage2) in self.pairs:
            return self.pairs[(stage, stage2)]
        if not self.stages:
            return self.pair()
        serial = self.at("F", stage) + self.at("B", stage2)
        if self.FB is None or self.F + self.B == 0:
            return serial
        return serial * self.FB / (self.F + self.B)

    def of(self, a: Action, stage: int = -1, stage2: int = -1) -> float:
        """Cost of action `a`; `stage`/`stage2` = the model stages of its chunk/chunk2 (-1: per kind)."""
        if a.op == "FB":
            return self.pair_at(stage, stage2) - (self.at("W", stage2) if a.bop == "I" else 0.0)
        if a.op in ("F", "B", "I", "W"):
            return self.at(a.op, stage)
        return 0.0

    @classmethod
    def from_overlap(cls, f_compute: float, f_comm: float, b_compute: float, b_comm: float,
                     w_share: float = 0.5, latency: float = 0.0) -> "Costs":
        """Chunks = compute + all-to-all; a pair hides the comm of one under the compute of the other."""
        f, b = f_compute + f_comm, b_compute + b_comm
        w = w_share * b_compute
        pair = max(f_compute + b_compute, f_comm + b_comm, max(f, b))
        return cls(F=f, I=b - w, W=w, FB=pair, latency=latency)

    @classmethod
    def from_timeline(cls, timelines: list, latency: float = 0.0, placement=None,
                      ranks: list[int] | None = None) -> "Costs":
        """Mean measured seconds per action kind from runtimes' `timeline`s (one per rank).

        W and I come from the measured W and I; without them a measured B is all I (W = 0). An
        F&B pair whose backward is I-only is counted as if it had done its W too. With the
        `placement` the timelines ran on, also the means per model stage (`stages`, `pairs`);
        `ranks[i]` = the pipeline rank of `timelines[i]` (default: i)."""
        ranks = list(range(len(timelines))) if ranks is None else ranks
        assert len(ranks) == len(timelines), (len(ranks), len(timelines))
        kind, stage, pair = {}, {}, {}
        for r, timeline in zip(ranks, timelines):
            for a, t0, t1 in timeline:
                if a.op not in ("F", "B", "I", "W", "FB"):
                    continue
                kind.setdefault(a.op, []).append((a, t1 - t0))
                if placement is None:
                    continue
                s = placement.stage_of(r, a.chunk)
                if a.op == "FB":
                    pair.setdefault((s, placement.stage_of(r, a.chunk2)), []).append((a, t1 - t0))
                else:
                    stage.setdefault(s, {}).setdefault(a.op, []).append((a, t1 - t0))
        f, i, w = _kind_means(kind)
        fb = _pair_mean(kind.get("FB", []), w)
        out = cls(F=f, I=i, W=w, FB=fb, latency=latency)
        for s, spans in sorted(stage.items()):
            out.stages[(s, "F")], out.stages[(s, "I")], out.stages[(s, "W")] = _kind_means(spans, f, i, w)
        for (s, s2), spans in sorted(pair.items()):
            out.pairs[(s, s2)] = _pair_mean(spans, out.at("W", s2))
        return out


def _mean(spans: list) -> float:
    return sum(t for _, t in spans) / len(spans)


def _kind_means(spans: dict, f: float = 0.0, i: float = 0.0, w: float = 0.0) -> tuple:
    """(F, I, W) from {op: [(action, seconds)]}; f, i, w = the values where nothing says more."""
    w = _mean(spans["W"]) if "W" in spans else (w if "I" in spans else 0.0)
    if "I" in spans:
        i = _mean(spans["I"])
    elif "B" in spans:
        i = _mean(spans["B"]) - w
    f = _mean(spans["F"]) if "F" in spans else f
    return f, i, w


def _pair_mean(spans: list, w: float) -> float | None:
    """Mean full F&B pair: an I-only pair is counted as if it had done its W (`w`) too."""
    if not spans:
        return None
    return sum(t + (w if a.bop == "I" else 0.0) for a, t in spans) / len(spans)


@dataclass
class Replay:
    """Start/end time of every action of every rank (lowered lists), and the summary."""

    schedule: Schedule
    costs: Costs
    spans: list[list[tuple[Action, float, float]]] = field(default_factory=list)

    @property
    def makespan(self) -> float:
        return max((e for rank in self.spans for _, _, e in rank), default=0.0)

    def busy(self, r: int) -> float:
        return sum(e - s for a, s, e in self.spans[r] if a.op not in ("SEND", "RECV"))

    def bubble(self, r: int) -> float:
        return self.makespan - self.busy(r)

    def peak_activations(self, r: int) -> int:
        live = peak = 0
        for a in self.schedule.compute[r]:
            for op, _, _ in a.parts():
                if op == "F":
                    live += 1
                    peak = max(peak, live)
                elif op in ("B", "I"):
                    live -= 1
        return peak


def replay(schedule: Schedule, costs: Costs | None = None) -> Replay:
    """Run the lowered lists against each other; raise Deadlock if they cannot all finish."""
    costs = costs or Costs()
    lists = schedule.lowered
    R = len(lists)
    ptr, clock = [0] * R, [0.0] * R
    sent: dict[tuple[int, int], list[float]] = {}   # (src, dst) -> send times in order
    taken: dict[tuple[int, int], int] = {}          # (src, dst) -> RECVs consumed so far
    out = Replay(schedule, costs, [[] for _ in range(R)])
    while any(ptr[r] < len(lists[r]) for r in range(R)):
        moved = False
        for r in range(R):
            while ptr[r] < len(lists[r]):
                a = lists[r][ptr[r]]
                start = clock[r]
                if a.op == "SEND":
                    sent.setdefault((r, a.peer), []).append(start)
                elif a.op == "RECV":
                    k = taken.get((a.peer, r), 0)
                    times = sent.get((a.peer, r), [])
                    if k >= len(times):
                        break  # blocked on the peer
                    taken[(a.peer, r)] = k + 1
                    start = max(start, times[k] + costs.latency)
                end = start + costs.of(a, *_stages(schedule.placement, r, a))
                out.spans[r].append((a, start, end))
                clock[r] = end
                ptr[r] += 1
                moved = True
        if not moved:
            stuck = {r: str(lists[r][ptr[r]]) for r in range(R) if ptr[r] < len(lists[r])}
            raise Deadlock(f"{schedule.name}: no rank can proceed; waiting at {stuck}")
    return out


def _stages(place, r: int, a: Action) -> tuple[int, int]:
    """The model stages of a compute action's chunk and chunk2 on rank r (-1 where none)."""
    if a.op not in ("F", "B", "I", "W", "FB"):
        return -1, -1
    return place.stage_of(r, a.chunk), place.stage_of(r, a.chunk2) if a.op == "FB" else -1


def summary_rows(rp: Replay) -> list[dict]:
    s = rp.schedule
    return [{"rank": r, "busy": rp.busy(r), "bubble": rp.bubble(r),
             "peak_act": rp.peak_activations(r), "param_copies": _param_copies(s)} for r in range(s.num_ranks)]


def _param_copies(s: Schedule) -> str:
    """Model-parameter footprint relative to one copy of the model spread over the ranks."""
    return f"{s.placement.copies}x"


def format_report(rp: Replay) -> str:
    c = rp.costs
    head = (f"{rp.schedule.name}: pp={rp.schedule.num_ranks} micro={rp.schedule.num_micro} "
            f"F={c.F:g} I={c.I:g} W={c.W:g} (B=I+W={c.B:g}) F&B={c.pair():g} latency={c.latency:g}  "
            f"makespan={rp.makespan:g}")
    lines = [head, f"{'rank':>4} {'busy':>8} {'bubble':>8} {'bubble%':>8} {'peak_act':>8} {'params':>6}"]
    for row in summary_rows(rp):
        frac = 100 * row["bubble"] / rp.makespan if rp.makespan else 0.0
        lines.append(f"{row['rank']:>4} {row['busy']:>8g} {row['bubble']:>8g} {frac:>7.1f}% "
                     f"{row['peak_act']:>8} {row['param_copies']:>6}")
    return "\n".join(lines)


_COLORS = {"F": "#4c9be8", "B": "#e8854c", "I": "#e8b04c", "W": "#7cc47c", "FB": "#a06cd5"}


def plot_gantt(rp: Replay, ax, title: str | None = None) -> None:
    """Draw `rp` on a matplotlib axis: one row per rank, one box per compute action, labelled
    with its micro-batch. Works for a measured timeline too (a Replay built from its spans)."""
    import matplotlib.pyplot as plt

    R = rp.schedule.num_ranks
    for r, spans in enumerate(rp.spans):
        for a, s, e in spans:
            if a.op in ("SEND", "RECV") or e <= s:
                continue
            ax.barh(R - 1 - r, e - s, left=s, color=_COLORS[a.op], edgecolor="black", linewidth=0.5)
            label = f"{a.micro}|{a.micro2}" if a.op == "FB" else str(a.micro)
            ax.text((s + e) / 2, R - 1 - r, label, ha="center", va="center", fontsize=7)
    ax.set_yticks(range(R), [f"rank {r}" for r in reversed(range(R))])
    ax.set_xlabel("time")
    ax.set_title(title or f"{rp.schedule.name}  pp={R}  micro={rp.schedule.num_micro}  makespan={rp.makespan:g}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=col) for col in _COLORS.values()]
    ax.legend(handles, ["F", "B", "I", "W", "F&B"], loc="upper right", ncol=5, fontsize=7)


def draw_gantt(rp: Replay, path: str) -> None:
    """`plot_gantt` of `rp` alone, written as a PNG to `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8.0, rp.makespan * 0.35), 0.55 * rp.schedule.num_ranks + 1.2))
    plot_gantt(rp, ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Replay:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedule", choices=SCHEDULE_NAMES, default="dualpipe")
    p.add_argument("--pp", type=int, default=8, help="pipeline ranks")
    p.add_argument("--micro", type=int, default=20, help="micro-batches per step")
    p.add_argument("--F", type=float, default=1.0, help="cost of a forward chunk")
    p.add_argument("--I", type=float, default=1.0, help="cost of a backward chunk's input-gradient part")
    p.add_argument("--W", type=float, default=1.0, help="cost of a backward chunk's weight-gradient part (B = I + W)")
    p.add_argument("--FB", type=float, default=None, help="overlapped F&B pair cost (default F+B)")
    p.add_argument("--latency", type=float, default=0.0, help="cost of each send/recv between ranks")
    p.add_argument("--paired", action="store_true", help="1f1b / zb1p with F&B pairs (parallel.overlap on)")
    p.add_argument("--png", default=None, help="write a Gantt chart here")
    p.add_argument("--actions", action="store_true", help="also print each rank's action list")
    args = p.parse_args(argv)
    try:
        s = build_schedule(args.schedule, args.pp, args.micro, paired=args.paired)
    except ValueError as e:
        p.error(str(e))
    rp = replay(s, Costs(args.F, args.I, args.W, args.FB, args.latency))
    print(format_report(rp))
    if args.actions:
        from .schedules import format_table
        print(format_table(s))
    if args.png:
        draw_gantt(rp, args.png)
        print(f"wrote {args.png}")
    return rp


if __name__ == "__main__":
    main()
