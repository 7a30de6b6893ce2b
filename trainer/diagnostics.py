"""The run's diagnostics, as the loop sees them: one `Monitor` called at step boundaries.

It owns this rank's heartbeat (`parallel.heartbeat`, with every collective traced while
training), the hang watchdog (`parallel.watchdog`), the straggler report (`parallel.straggler`)
and a fault injector for tests. `Monitor.off()` is the do-nothing one a bare `Run` gets.

Fault injection (tests and drills): MOEPIPE_FAULT=KIND:RANK:STEP makes rank RANK, on entering
the forward/backward of step STEP, `stop` (SIGSTOP itself: a hung rank), `kill` (SIGKILL itself:
a dead rank) or `oom` (raise an out-of-memory error); `slow:RANK:SECONDS` makes RANK sleep that
long in every step's forward/backward (a straggler).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

import torch

from parallel import straggler
from parallel.heartbeat import Heartbeat, traced_collectives
from parallel.watchdog import Watchdog

log = logging.getLogger("moepipe")


def hang_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "hang")


class Monitor:
    """Heartbeat, watchdog, straggler report and fault injection of one rank."""

    def __init__(self, beat: Heartbeat, watchdog: Watchdog | None = None, device=None,
                 straggler_ratio: float = 0.0, every: int = 0, fault: str = ""):
        self.beat, self.watchdog, self.device = beat, watchdog, device
        self.straggler_ratio, self.every = straggler_ratio, every
        self.fault = fault.split(":") if fault else []
        self._stack = contextlib.ExitStack()
        self._steps, self._seconds = 0, 0.0

    @classmethod
    def off(cls) -> "Monitor":
        return cls(Heartbeat(0, 1))

    @classmethod
    def start(cls, cfg, rank: int, world_size: int, device, exit_code: int) -> "Monitor":
        beat = Heartbeat(rank, world_size)
        watchdog = None
        if cfg.fault.hang_seconds > 0:
            watchdog = Watchdog(beat, hang_dir(cfg.train.output_dir), cfg.fault.hang_seconds, exit_code,
                                cfg.fault.heartbeat_seconds or None).start()
        mon = cls(beat, watchdog, device, cfg.fault.straggler_ratio if world_size > 1 else 0.0,
                  cfg.logging.every, os.environ.get("MOEPIPE_FAULT", ""))
        if world_size > 1:
            mon._stack.enter_context(traced_collectives(beat))
        return mon

    # ---- the loop's calls ----
    def begin_step(self, step: int) -> None:
        self.beat.begin_step(step)

    def phase(self, name: str) -> None:
        self.beat.set_phase(name)
        if self.fault and name == "forward_backward":
            self._inject()

    def end_step(self, step: int, seconds: float) -> dict:
        """Closes the step; every `logging.every` steps gathers the per-rank split (a collective:
        every rank calls this alike) and returns the metrics.jsonl fields, naming a straggler."""
        self.beat.end_step()
        self._steps, self._seconds = self._steps + 1, self._seconds + seconds
        if not self.straggler_ratio or step % self.every:
            return {}
        window, n = self.beat.take_window(), self._steps
        mine = straggler.split(self._seconds / n, window["comm"] / n, window["data"] / n)
        self._steps, self._seconds = 0, 0.0
        row, line = straggler.report(straggler.gather(mine, self.device, self.beat.world_size),
                                     self.straggler_ratio)
        if line and self.beat.rank == 0:
            log.warning("step %d: %s", step, line)
        return row

    def close(self) -> None:
        self._stack.close()
        if self.watchdog is not None:
            self.watchdog.close()

    def explain_failure(self, error: BaseException) -> bool:
        """A collective failed because a peer died: name it like a hang and exit (never returns
        True); False for any other error."""
        return self.watchdog is not None and self.watchdog.explain_failure(error)

    # ---- fault injection ----
    def _inject(self) -> None:
        kind, rank, arg = self.fault[0], int(self.fault[1]), float(self.fault[2])
        if rank != self.beat.rank:
            return
        if kind == "slow":
            time.sleep(arg)
        elif int(arg) == self.beat.step:
            log.warning("MOEPIPE_FAULT: rank %d injects '%s' in step %d", rank, kind, self.beat.step)
            if kind == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            elif kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "oom":
                raise torch.OutOfMemoryError(f"injected out-of-memory error on rank {rank} (MOEPIPE_FAULT)")
