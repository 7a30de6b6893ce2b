"""Invariants of a schedule, checked on the data alone (no processes).

`problems(schedule)` returns human-readable violations (empty = valid):
- every (micro, chunk) a rank owns gets exactly one F and one backward (B, or I plus one W);
- on a rank, a chunk's F precedes its backward and an I precedes its W;
- data flows in order: a forward's input was produced earlier (locally, or by a RECV) and
  likewise a backward's output gradient;
- each SEND stream (sender -> receiver) equals the receiver's RECV stream, message by message;
- the lowered lists replay to the end without a deadlock (`simulate.replay`).
"""
from __future__ import annotations

from collections import Counter

from .schedules import Schedule
from .simulate import Deadlock, replay


def _coverage(s: Schedule) -> list[str]:
    out = []
    place = s.placement
    owned = Counter()
    for m, route in enumerate(place.routes):
        for r, c in route:
            owned[(r, m, c)] += 1
    for r, acts in enumerate(s.compute):
        seen = Counter((op, m, c) for a in acts for op, m, c in a.parts())
        for (rr, m, c) in owned:
            if rr != r:
                continue
            nb = seen[("B", m, c)] + seen[("I", m, c)]
            if seen[("F", m, c)] != 1 or nb != 1 or seen[("W", m, c)] != seen[("I", m, c)]:
                out.append(f"rank {r} micro {m} chunk {c}: F x{seen[('F', m, c)]}, backward x{nb}, "
                           f"I x{seen[('I', m, c)]} vs W x{seen[('W', m, c)]}")
        extra = {k for k in seen if (r, k[1], k[2]) not in owned}
        out += [f"rank {r} runs {k} on a stage it does not own" for k in sorted(extra)]
    return out


def _order(s: Schedule) -> list[str]:
    out = []
    place = s.placement
    for r, acts in enumerate(s.lowered):
        have = set()   # ("act"|"grad", micro, local chunk) available on this rank
        done = set()   # (op, micro, chunk) finished on this rank
        for a in acts:
            if a.op == "RECV":
                have.add((a.kind, a.micro, a.chunk))
                continue
            for op, m, c in a.parts():
                if op == "F" and not place.is_first(m, r, c) and ("act", m, c) not in have:
                    out.append(f"rank {r}: {a} runs before its input arrived")
                if op in ("B", "I"):
                    if ("F", m, c) not in done:
                        out.append(f"rank {r}: {op}{m}.{c} before its forward")
                    if not place.is_last(m, r, c) and ("grad", m, c) not in have:
                        out.append(f"rank {r}: {op}{m}.{c} before its output gradient arrived")
                if op == "W" and ("I", m, c) not in done:
                    out.append(f"rank {r}: W{m}.{c} before its I")
            for op, m, c in a.parts():
                done.add((op, m, c))
                nxt, prv = place.next(m, r, c), place.prev(m, r, c)
                if op == "F" and nxt and nxt[0] == r:
                    have.add(("act", m, nxt[1]))
                if op in ("B", "I") and prv and prv[0] == r:
                    have.add(("grad", m, prv[1]))
    return out


def _streams(s: Schedule) -> list[str]:
    out = []
    place = s.placement
    sends, recvs = {}, {}
    for r, acts in enumerate(s.lowered):
        for a in acts:
            if a.op == "SEND":
                dst = place.next(a.micro, r, a.chunk) if a.kind == "act" else place.prev(a.micro, r, a.chunk)
                if dst is None or dst[0] != a.peer:
                    out.append(f"rank {r}: {a} goes to the wrong peer")
                    continue
                sends.setdefault((r, a.peer), []).append((a.kind, a.micro, dst[1]))
            elif a.op == "RECV":
                recvs.setdefault((a.peer, r), []).append((a.kind, a.micro, a.chunk))
    for key in set(sends) | set(recvs):
        if sends.get(key, []) != recvs.get(key, []):
            out.append(f"stream {key[0]}->{key[1]}: sends {sends.get(key, [])[:6]}... "
                       f"!= recvs {recvs.get(key, [])[:6]}...")
    return out


def problems(s: Schedule) -> list[str]:
    """Every invariant violation found in `s` (empty list = valid)."""
    found = _coverage(s) + _order(s) + _streams(s)
    try:
        replay(s)
    except Deadlock as e:
        found.append(str(e))
    return found


def validate(s: Schedule) -> None:
    """Raise ValueError listing the violations, if any."""
    found = problems(s)
    if found:
        raise ValueError(f"schedule {s.name} pp={s.num_ranks} micro={s.num_micro} is invalid:\n"
                         + "\n".join(found[:20]))
