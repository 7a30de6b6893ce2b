"""Pipeline schedules as pure functions: (pp ranks, N micro-batches) -> per-rank action lists.

- 1F1B (PipeDream-Flush, Narayanan et al. 2021): rank r warms up with R-r-1 forwards, then
  alternates one forward and one backward, then drains the remaining backwards.
- ZB1P (ZB-H1 of Zero Bubble PP, Qi et al. 2023, section 3): the 1F1B order of forwards and
  input-gradient backwards I, with the weight-gradient halves W postponed so that they fill
  the drain: rank r holds back its r latest W's, which then plug the gaps of its drain.
- Paired 1F1B / ZB1P (`paired=True`, the F&B overlap of DeepSeek-V3 section 3.2.1 on a linear
  pipeline, as Megatron-core's combined 1F1B): in the steady state rank r runs its forward of
  one micro-batch and its backward of an older one as one F&B pair. A pair waits for both its
  inputs and sends its activation only at its end, so rank r warms up with 2(R-r)-1 forwards
  (the slack that keeps the pairs of neighbouring ranks from waiting on each other; with
  F&B = F + B the makespan is 1F1B's) and then runs F(i+2(R-r)-1)&B(i). The cost: the first
  rank holds up to 2R activations instead of R, as DualPipe does. pp = 1 (micro-batches only,
  no pipeline) gives F0, F1&B0, F2&B1, ..., B(N-1).
- DualPipe (DeepSeek-V3 report section 3.2.1 and the DualPipe description): two copies of the
  model, micro-batches enter from both ends; each rank runs the eight-phase pattern below for
  its two chunks, the steady state being overlapped F&B pairs.
- DualPipeV: the same pattern with a single copy folded into a V: rank r holds stage r
  (chunk 0, going down) and stage 2R-1-r (chunk 1, coming back).

The eight phases (rank r of R, N micro-batches; for DualPipe r is the distance to the nearer
end, R the half of the ranks and N the micro-batches of one direction):
  1. 2(R-r-1) x F0     2. (r+1) x F0 F1      3. (R-r-1) x I1 W F1
  4. (N-2R+r+1) x [F0&B1] [F1&B0]           5. (R-r-1) x B1 [F1&B0]
  6. (r+1) x B1 B0, the last r+1 of these backwards input-gradient only
  7. (R-r-1) x W I0    8. (r+1) x W
W's always retire the oldest pending I (first in, first out).
"""
from __future__ import annotations

from dataclasses import dataclass

from .actions import FB, Action, F, Placement, lower_comms

SCHEDULE_NAMES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Schedule:
    """A named schedule: where stages live, the compute lists and the lists with comms."""

    name: str
    placement: Placement
    compute: tuple[tuple[Action, ...], ...]
    lowered: tuple[tuple[Action, ...], ...]

    @property
    def num_ranks(self) -> int:
        return self.placement.num_ranks

    @property
    def num_micro(self) -> int:
        return self.placement.num_micro


def linear_placement(pp: int, n: int) -> Placement:
    return Placement(pp, 1, tuple(tuple((r, 0) for r in range(pp)) for _ in range(n)))


def v_placement(pp: int, n: int) -> Placement:
    route = tuple([(r, 0) for r in range(pp)] + [(r, 1) for r in reversed(range(pp))])
    return Placement(pp, 2, tuple(route for _ in range(n)))


def bidirectional_placement(pp: int, n: int) -> Placement:
    down = tuple((r, 0) for r in range(pp))
    up = tuple((r, 1) for r in reversed(range(pp)))
    return Placement(pp, 2, tuple(down if m < n // 2 else up for m in range(n)), copies=2)


def one_f_one_b(pp: int, n: int, split_w: bool = False) -> list[list[Action]]:
    """1F1B per rank; with split_w every backward is I followed at once by its W."""
    lists = []
    for r in range(pp):
        warm = min(pp - r - 1, n)
        acts = [F(m) for m in range(warm)]
        for i in range(n - warm):
            acts.append(F(warm + i))
            acts += [Action("I", i, 0), Action("W", i, 0)] if split_w else [Action("B", i, 0)]
        for i in range(n - warm, n):
            acts += [Action("I", i, 0), Action("W", i, 0)] if split_w else [Action("B", i, 0)]
        lists.append(acts)
    return lists


def paired_1f1b(pp: int, n: int, split_w: bool = False) -> list[list[Action]]:
    """1F1B (split_w: ZB1P) with its steady state as F&B pairs of different micro-batches:
    rank r runs w = 2(R-r)-1 forwards, then F(i+w)&B(i), then the remaining backwards. With split_w the
    backwards are input-gradient only and rank r holds back its r latest W's, as in `zb1p`."""
    lists = []
    for r in range(pp):
        warm, pending = min(2 * (pp - r) - 1, n), []
        acts = [F(m) for m in range(warm)]
        for i in range(n):
            op = "I" if split_w else "B"
            acts.append(FB(warm + i, 0, i, 0, op) if warm + i < n else Action(op, i, 0))
            if split_w:
                pending.append(i)
                if len(pending) > r:
                    acts.append(Action("W", pending.pop(0), 0))
        acts += [Action("W", m, 0) for m in pending]
        lists.append(acts)
    return lists


def zb1p(pp: int, n: int) -> list[list[Action]]:
    """ZB-H1: 1F1B order of F and I; rank r keeps its r most recent W's pending.

    The later a rank sits in the pipeline, the more of its W's it postpones, so that its
    I's (which the ranks before it wait for) go out early; the held W's fill the drain.
    """
    lists = []
    for r in range(pp):
        warm = min(pp - r - 1, n)
        acts = [F(m) for m in range(warm)]
        pending: list[int] = []
        for i in range(n):
            if warm + i < n:
                acts.append(F(warm + i))
            acts.append(Action("I", i, 0))
            pending.append(i)
            if len(pending) > r:
                acts.append(Action("W", pending.pop(0), 0))
        acts += [Action("W", m, 0) for m in pending]
        lists.append(acts)
    return lists


class _PhaseBuilder:
    """Emits one rank's eight-phase DualPipe(V) list, tracking micro ids per chunk and W's."""

    def __init__(self, chunk_of_phase: tuple[int, int], micros: tuple[list[int], list[int]]):
        self.chunk = chunk_of_phase
        self.micros = micros  # per phase: the micro-batch ids in the order they flow
        self.nf = [0, 0]
        self.nb = [0, 0]
        self.pending: list[tuple[int, int]] = []
        self.acts: list[Action] = []

    def _next_f(self, p: int) -> tuple[int, int]:
        m = self.micros[p][self.nf[p]]
        self.nf[p] += 1
        return m, self.chunk[p]

    def _next_b(self, p: int, split: bool) -> tuple[int, int, str]:
        m = self.micros[p][self.nb[p]]
        self.nb[p] += 1
        if split:
            self.pending.append((m, self.chunk[p]))
        return m, self.chunk[p], "I" if split else "B"

    def f(self, p: int):
        self.acts.append(F(*self._next_f(p)))

    def b(self, p: int, split: bool = False):
        m, c, op = self._next_b(p, split)
        self.acts.append(Action(op, m, c))

    def fb(self, pf: int, pb: int):
        fm, fc = self._next_f(pf)
        bm, bc, op = self._next_b(pb, False)
        self.acts.append(FB(fm, fc, bm, bc, op))

    def w(self):
        m, c = self.pending.pop(0)
        self.acts.append(Action("W", m, c))


def _eight_phases(b: _PhaseBuilder, R: int, r: int, N: int) -> list[Action]:
    for _ in range(2 * (R - r - 1)):             # 1: nF0
        b.f(0)
    for _ in range(r + 1):                       # 2: nF0F1
        b.f(0), b.f(1)
    for _ in range(R - r - 1):                   # 3: nI1WF1 (zero bubble)
        b.b(1, split=True), b.w(), b.f(1)
    for _ in range(N - 2 * R + r + 1):           # 4: n[F0&B1][F1&B0] (main step)
        b.fb(0, 1), b.fb(1, 0)
    for _ in range(R - r - 1):                   # 5: nB1[F1&B0]
        b.b(1), b.fb(1, 0)
    for i in range(2 * (r + 1)):                 # 6: nB1B0, second half input-grad only
        b.b(1 - i % 2, split=i >= r + 1)
    for _ in range(R - r - 1):                   # 7: nWI0 (zero bubble)
        b.w(), b.b(0, split=True)
    for _ in range(r + 1):                       # 8: nW
        b.w()
    assert not b.pending and b.nf == b.nb == [N, N], (b.nf, b.nb)
    return b.acts


def dualpipev(pp: int, n: int) -> list[list[Action]]:
    """DualPipeV on pp ranks (2*pp stages): chunk 0 = stage r, chunk 1 = stage 2pp-1-r."""
    micros = list(range(n))
    return [_eight_phases(_PhaseBuilder((0, 1), (micros, micros)), pp, r, n) for r in range(pp)]


def dualpipe(pp: int, n: int) -> list[list[Action]]:
    """DualPipe on pp ranks, two model copies: micro-batches [0, n/2) go down, [n/2, n) go up."""
    half, down, up = pp // 2, list(range(n // 2)), list(range(n // 2, n))
    lists = []
    for r in range(pp):
        if r < half:  # phase 0 = the direction that enters at rank 0 (chunk 0)
            b = _PhaseBuilder((0, 1), (down, up))
        else:         # mirrored: phase 0 = the direction entering at rank pp-1 (chunk 1)
            b = _PhaseBuilder((1, 0), (up, down))
        lists.append(_eight_phases(b, half, min(r, pp - 1 - r), n // 2))
    return lists


def check_sizes(name: str, pp: int, n: int) -> None:
    """Raise ValueError for (pp, micro) pairs a schedule cannot run."""
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"schedule = {name!r}: must be one of {', '.join(SCHEDULE_NAMES)}")
    if pp < 1 or n < 1:
        raise ValueError(f"pp = {pp}, micro = {n}: both must be >= 1")
    if name == "dualpipev" and n < 2 * pp:
        raise ValueError(f"micro = {n}: dualpipev needs at least 2 * pp = {2 * pp} micro-batches")
    if name == "dualpipe":
        if pp % 2 or n % 2:
            raise ValueError(f"pp = {pp}, micro = {n}: dualpipe needs an even number of ranks and of micro-batches")
        if n < 2 * pp:
            raise ValueError(f"micro = {n}: dualpipe needs at least 2 * pp = {2 * pp} micro-batches")


def smallest_micro(name: str, pp: int) -> int:
    """Fewest micro-batches per step that `name` runs on `pp` ranks (see check_sizes)."""
    return 2 * pp if name in ("dualpipe", "dualpipev") and pp > 1 else 1


def build_schedule(name: str, pp: int, n: int, paired: bool = False) -> Schedule:
    """The schedule `name` for `pp` pipeline ranks and `n` micro-batches, with comms lowered.
    `paired`: 1F1B / ZB1P with their steady state as F&B pairs (DualPipe's always are)."""
    check_sizes(name, pp, n)
    if name in ("1f1b", "zb1p") and paired:
        place, compute = linear_placement(pp, n), paired_1f1b(pp, n, split_w=name == "zb1p")
    elif name == "1f1b":
        place, compute = linear_placement(pp, n), one_f_one_b(pp, n)
    elif name == "zb1p":
        place, compute = linear_placement(pp, n), zb1p(pp, n)
    elif name == "dualpipev":
        place, compute = v_placement(pp, n), dualpipev(pp, n)
    else:
        place, compute = bidirectional_placement(pp, n), dualpipe(pp, n)
    lowered = lower_comms(compute, place)
    return Schedule(name, place, tuple(map(tuple, compute)), tuple(map(tuple, lowered)))


def format_table(s: Schedule) -> str:
    """One line per rank, compute actions only (e.g. `F0.0 F1.0 B0.0 ...`)."""
    return "\n".join(f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(s.compute))
