"""Pipeline actions as plain data, where stages live, and the lowering that adds sends/receives.

A schedule (see `schedules.py`) is, per pipeline rank, an ordered list of compute actions:
F (forward of one micro-batch through one local chunk), B (full backward), I (input-gradient
half of a backward), W (the deferred weight-gradient half, Zero Bubble PP, Qi et al. 2023,
section 2) and FB (a forward of one micro-batch overlapped with a backward of another, the
"F&B" pair of DeepSeek-V3 section 3.2.1). Which rank/chunk runs which stage is a `Placement`:
each micro-batch follows a *route*, the list of (rank, chunk) it visits in forward order.

`lower_comms` turns compute lists into full lists with SEND/RECV actions. For every ordered
pair of ranks the receiver posts its RECVs in exactly the sender's SEND order (NCCL matches
point-to-point messages in issue order), each RECV placed just before the first action that
needs it or a later message from the same peer. Hand-offs between two chunks of one rank (the
turn of DualPipeV on its last rank) stay local and need no message.

Legend: R = pipeline ranks, N = micro-batches, C = chunks per rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

COMPUTE_OPS = ("F", "B", "I", "W", "FB")
COMM_OPS = ("SEND", "RECV")


@dataclass(frozen=True)
class Action:
    """One step of one rank. `micro`/`chunk` name the micro-batch and the local chunk.

    FB: (micro, chunk) is the forward half, (micro2, chunk2) the backward half and `bop`
    says whether that backward is a full B or an input-gradient-only I.
    SEND/RECV: `kind` is "act" (forward activation) or "grad" (input gradient), `peer` the
    other rank; (micro, chunk) name the local chunk that produces / consumes the message.
    """

    op: str
    micro: int
    chunk: int
    micro2: int = -1
    chunk2: int = -1
    bop: str = ""
    peer: int = -1
    kind: str = ""

    def __str__(self) -> str:
        if self.op == "FB":
            return f"F{self.micro}.{self.chunk}&{self.bop}{self.micro2}.{self.chunk2}"
        if self.op in COMM_OPS:
            arrow = "->" if self.op == "SEND" else "<-"
            return f"{self.op[0]}{self.kind}{self.micro}.{self.chunk}{arrow}{self.peer}"
        return f"{self.op}{self.micro}.{self.chunk}"

    def parts(self) -> list[tuple[str, int, int]]:
        """The compute pieces (op, micro, chunk) this action performs, forward first."""
        if self.op == "FB":
            return [("F", self.micro, self.chunk), (self.bop, self.micro2, self.chunk2)]
        if self.op in COMPUTE_OPS:
            return [(self.op, self.micro, self.chunk)]
        return []


def F(m: int, c: int = 0) -> Action:
    return Action("F", m, c)


def FB(fm: int, fc: int, bm: int, bc: int, bop: str = "B") -> Action:
    return Action("FB", fm, fc, bm, bc, bop)


@dataclass(frozen=True)
class Placement:
    """Where stages live: `routes[m]` = [(rank, chunk), ...] micro-batch m visits in forward order."""

    num_ranks: int
    chunks_per_rank: int
    routes: tuple[tuple[tuple[int, int], ...], ...]
    copies: int = 1  # DualPipe keeps two copies of the model (parameters 2x)
    _hop: dict = field(default_factory=dict, compare=False, repr=False)
    _stage: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        for m, route in enumerate(self.routes):
            for i, rc in enumerate(route):
                self._hop[(m, rc)] = i
                self._stage.setdefault(rc, i)

    @property
    def num_stages(self) -> int:
        """Stages of one model copy (a route's length)."""
        return max(len(r) for r in self.routes)

    def stage_of(self, rank: int, chunk: int) -> int:
        """Which stage of the model (0 = embedding side) this rank's chunk holds."""
        return self._stage[(rank, chunk)]

    @property
    def num_micro(self) -> int:
        return len(self.routes)

    def prev(self, m: int, rank: int, chunk: int) -> tuple[int, int] | None:
        """The (rank, chunk) that feeds this one in forward, None at the route's start."""
        i = self._hop[(m, (rank, chunk))]
        return self.routes[m][i - 1] if i > 0 else None

    def next(self, m: int, rank: int, chunk: int) -> tuple[int, int] | None:
        """The (rank, chunk) this one feeds in forward, None at the loss stage."""
        i = self._hop[(m, (rank, chunk))]
        route = self.routes[m]
        return route[i + 1] if i + 1 < len(route) else None

    def is_first(self, m: int, rank: int, chunk: int) -> bool:
        return self.prev(m, rank, chunk) is None

    def is_last(self, m: int, rank: int, chunk: int) -> bool:
        return self.next(m, rank, chunk) is None


def _messages(compute: list[list[Action]], place: Placement) -> tuple[list, dict]:
    """Per rank, the SENDs in production order; and for each consumer the message it needs."""
    sends = [[] for _ in compute]
    for r, actions in enumerate(compute):
        for a in actions:
            for op, m, c in a.parts():
                if op == "F" and (nxt := place.next(m, r, c)) and nxt[0] != r:
                    sends[r].append(Action("SEND", m, c, peer=nxt[0], kind="act"))
                if op in ("B", "I") and (prv := place.prev(m, r, c)) and prv[0] != r:
                    sends[r].append(Action("SEND", m, c, peer=prv[0], kind="grad"))
    # index of each message in its sender's per-peer stream, keyed by what the receiver needs
    order = {}
    for r, lst in enumerate(sends):
        per_peer = {}
        for s in lst:
            k = per_peer.setdefault(s.peer, 0)
            per_peer[s.peer] = k + 1
            if s.kind == "act":
                dst = place.next(s.micro, r, s.chunk)
                order[(s.peer, "act", s.micro, dst[1])] = (r, k, s)
            else:
                dst = place.prev(s.micro, r, s.chunk)
                order[(s.peer, "grad", s.micro, dst[1])] = (r, k, s)
    return sends, order


def _needs(a: Action, r: int, place: Placement) -> list[tuple[str, int, int]]:
    """Messages (kind, micro, local chunk) the action consumes from other ranks."""
    out = []
    for op, m, c in a.parts():
        if op == "F" and (prv := place.prev(m, r, c)) and prv[0] != r:
            out.append(("act", m, c))
        if op in ("B", "I") and (nxt := place.next(m, r, c)) and nxt[0] != r:
            out.append(("grad", m, c))
    return out


def lower_comms(compute: list[list[Action]], place: Placement) -> list[list[Action]]:
    """Insert SEND after each producing action and RECVs (in the sender's order) before consumers."""
    sends, order = _messages(compute, place)
    streams = {}  # (sender, receiver) -> [SEND actions in order]
    for r, lst in enumerate(sends):
        for s in lst:
            streams.setdefault((r, s.peer), []).append(s)
    lowered = []
    for r, actions in enumerate(compute):
        posted = {}  # sender -> how many of its messages to r are already received
        out = []
        for a in actions:
            for kind, m, c in _needs(a, r, place):
                src, k, _ = order[(r, kind, m, c)]
                stream = streams[(src, r)]
                while posted.get(src, 0) <= k:
                    s = stream[posted.get(src, 0)]
                    dst = place.next(s.micro, src, s.chunk) if s.kind == "act" else place.prev(s.micro, src, s.chunk)
                    out.append(Action("RECV", s.micro, dst[1], peer=src, kind=s.kind))
                    posted[src] = posted.get(src, 0) + 1
            out.append(a)
            for op, m, c in a.parts():
                if op == "F" and (nxt := place.next(m, r, c)) and nxt[0] != r:
                    out.append(Action("SEND", m, c, peer=nxt[0], kind="act"))
                if op in ("B", "I") and (prv := place.prev(m, r, c)) and prv[0] != r:
                    out.append(Action("SEND", m, c, peer=prv[0], kind="grad"))
        lowered.append(out)
    return lowered
