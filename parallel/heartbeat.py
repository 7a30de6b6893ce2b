"""This rank's heartbeat: which step, which phase, which collective (and its number in the step).

The training thread updates a `Heartbeat` at a handful of points per step (`begin_step`, `phase`,
`end_step`) and `traced_collectives` names every torch.distributed call while it runs: entering
`all_to_all_single` for the third time in step 118 sets the beat to "all_to_all #3 of step 118",
returning from it puts the phase back. The updates are plain attribute writes (no I/O, no lock),
so the cost per collective is about a microsecond; a separate thread (`parallel.watchdog`) reads
them and publishes them where a stuck collective cannot block them.

The same bookkeeping splits the step into data, collective wait and compute for the straggler
report (`parallel.straggler`): time spent inside a collective (or waiting on its `Work`) counts
as collective wait, time in the "data" phase as data, the rest as compute.

`traced_collectives` wraps the torch.distributed entry points for as long as it is entered and
restores them on exit, so every module that calls `dist.<collective>(...)` is named without an
object threaded through the engines. Async calls are followed into `Work.wait`.
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch.distributed as dist

# torch.distributed entry point -> the name a person reads in the diagnosis
TRACED = {"all_reduce": "all_reduce", "all_to_all_single": "all_to_all", "all_to_all": "all_to_all",
          "all_gather": "all_gather", "all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
          "reduce_scatter": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
          "reduce_scatter_single": "reduce_scatter", "broadcast": "broadcast", "reduce": "reduce",
          "barrier": "barrier", "send": "send", "recv": "recv", "batch_isend_irecv": "send/recv",
          "all_gather_object": "all_gather_object", "broadcast_object_list": "broadcast_object_list",
          "gather": "gather", "scatter": "scatter"}
TIMED_PHASES = ("data", "forward_backward", "optimizer")  # the phases inside the step timer


class Heartbeat:
    """Progress of one rank. Written by the training thread, read by the watchdog thread."""

    def __init__(self, rank: int, world_size: int, clock=time.perf_counter):
        self.rank, self.world_size, self.clock = rank, world_size, clock
        self.count = 0                  # bumps on every change: the watchdog's sign of progress
        self.steps_done = 0             # steps finished by this process (the watchdog arms after one)
        self.step = 0
        self.phase = "start"
        self.collective: tuple[str, int] | None = None   # (name, number in this step) while inside
        self.peers: list[int] | None = None              # global ranks of its group (None: the world)
        self.failed: tuple[str, int, int] | None = None  # (name, number, step) of a collective that raised
        self.seqs: dict[str, int] = {}
        self.pending: dict[int, tuple[str, int]] = {}    # id(async Work) -> (name, number)
        self.window = {"data": 0.0, "comm": 0.0}         # seconds since the last `take_window`
        self._since = clock()

    # ---- training thread ----
    def begin_step(self, step: int) -> None:
        self._account()
        self.step, self.seqs, self.pending = step, {}, {}
        self._set("data")

    def set_phase(self, phase: str) -> None:
        self._account()
        self._set(phase)

    def end_step(self) -> None:
        self._account()
        self.steps_done += 1
        self._set("step_done")

    def enter(self, name: str, peers: list[int] | None = None) -> tuple[str, int] | None:
        """Mark entering collective `name` over `peers`; returns its (name, number) or None when nested."""
        if self.collective is not None:
            return None
        self._account()
        self.seqs[name] = self.seqs.get(name, 0) + 1
        self.collective, self.peers = (name, self.seqs[name]), peers
        self.count += 1
        return self.collective

    def leave(self, token: tuple[str, int] | None) -> None:
        if token is None:
            return
        self._account(comm=True)
        self.collective = None
        self.count += 1

    def raised(self, token: tuple[str, int] | None) -> None:
        if token is not None:
            self.failed = (*token, self.step)
        self.leave(token)

    def resume_wait(self, work) -> tuple[str, int] | None:
        """`Work.wait` of an async collective: inside it again, under its own name and number."""
        token = self.pending.pop(id(work), None)
        if token is None or self.collective is not None:
            return None
        self._account()
        self.collective = token
        self.count += 1
        return token

    # ---- either thread ----
    def where(self) -> str:
        """Where this rank is, in words: 'all_to_all #3 of step 118' or 'forward_backward of step 118'."""
        c = self.collective
        return f"{c[0]} #{c[1]} of step {self.step}" if c else f"{self.phase} of step {self.step}"

    def snapshot(self) -> dict:
        c = self.collective
        return {"rank": self.rank, "world": self.world_size, "step": self.step, "phase": self.phase,
                "collective": c[0] if c else None, "seq": c[1] if c else None,
                "peers": self.peers if c else None, "count": self.count}

    def take_window(self) -> dict:
        """Seconds of data and collective wait inside timed steps since the previous call."""
        self._account()
        window, self.window = self.window, {"data": 0.0, "comm": 0.0}
        return window

    # ---- internals ----
    def _set(self, phase: str) -> None:
        self.phase = phase
        self.count += 1

    def _account(self, comm: bool = False) -> None:
        now = self.clock()
        if self.phase in TIMED_PHASES:
            key = "comm" if comm else ("data" if self.phase == "data" and self.collective is None else None)
            if key:
                self.window[key] += now - self._since
        self._since = now


def _group_ranks(group, cache: dict) -> list[int] | None:
    """Global ranks of `group` (None for the default group), looked up once per group."""
    if group is None:
        return None
    if id(group) not in cache:
        try:
            cache[id(group)] = dist.get_process_group_ranks(group)
        except (RuntimeError, ValueError):
            cache[id(group)] = None
    return cache[id(group)]


def _traced(fn, name: str, beat: Heartbeat, groups: dict):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        token = beat.enter(name, _group_ranks(kwargs.get("group"), groups))
        try:
            out = fn(*args, **kwargs)
        except BaseException:
            beat.raised(token)
            raise
        if token is not None and out is not None:  # async: the wait resumes the same name
            for work in (out if isinstance(out, list) else [out]):
                beat.pending[id(work)] = token
        beat.leave(token)
        return out
    return call


def _traced_wait(wait, beat: Heartbeat):
    @functools.wraps(wait)
    def call(work, *args, **kwargs):
        token = beat.resume_wait(work)
        try:
            out = wait(work, *args, **kwargs)
        except BaseException:
            beat.raised(token)
            raise
        beat.leave(token)
        return out
    return call


@contextlib.contextmanager
def traced_collectives(beat: Heartbeat):
    """While entered, every torch.distributed collective called through `torch.distributed.<name>`
    (and the `wait` of async ones) is named in `beat`. Restores the originals on exit."""
    originals = {name: getattr(dist, name) for name in TRACED if hasattr(dist, name)}
    wait = dist.Work.wait
    try:
        groups: dict = {}
        for name, fn in originals.items():
            setattr(dist, name, _traced(fn, TRACED[name], beat, groups))
        dist.Work.wait = _traced_wait(wait, beat)
        yield beat
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        dist.Work.wait = wait

