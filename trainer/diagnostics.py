"""The run's diagnostics, as the loop sees them: one `Monitor` called at step boundaries.

It owns this rank's heartbeat (`parallel.heartbeat`, with every collective traced while
training), the hang watchdog (`parallel.watchdog`), the straggler report (`parallel.straggler`),
the profiler and out-of-memory report (`parallel.profiling`) and a fault injector for tests.
`Monitor.off()` is the do-nothing one a bare `Run` gets.

Fault injection (tests and drills): MOEPIPE_FAULT=KIND:RANK:STEP makes rank RANK, on entering
the forward/backward of step STEP, `stop` (SIGSTOP itself: a hung rank), `kill` (SIGKILL itself:
a dead rank) or `oom` (raise an out-of-memory error); `slow:RANK:SECONDS` makes RANK sleep that
long in every step's forward/backward (a straggler). Several: comma-separated.
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
from parallel.profiling import StepProfiler, is_out_of_memory, oom_report
from parallel.watchdog import Watchdog

log = logging.getLogger("moepipe")


def hang_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "hang")


def record_progress(step: int) -> None:
    """Tell the Slurm launcher (slurm/lib.sh) how far this job got, for its bound on requeues
    that make no progress: the step goes to MOEPIPE_PROGRESS_FILE when that is set."""
    path = os.environ.get("MOEPIPE_PROGRESS_FILE")
    if not path:
        return
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(f"{step}\n")
        os.replace(path + ".tmp", path)
    except OSError as e:
        log.warning("cannot record progress in MOEPIPE_PROGRESS_FILE=%s: %s", path, e)


FAULT_KINDS = ("stop", "kill", "oom", "slow")


def parse_fault(spec: str) -> tuple[str, int, float]:
    """'stop:2:3' -> ('stop', 2, 3.0); raises ValueError naming MOEPIPE_FAULT for anything else."""
    parts = spec.split(":")
    try:
        kind, rank, arg = parts[0], int(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        kind = ""
    if len(parts) != 3 or kind not in FAULT_KINDS:
        raise ValueError(f"MOEPIPE_FAULT = {spec!r}: expected KIND:RANK:STEP with KIND one of "
                         f"{', '.join(FAULT_KINDS)} (slow: KIND:RANK:SECONDS), e.g. stop:2:3")
    return kind, rank, arg


class Monitor:
    """Heartbeat, watchdog, straggler report and fault injection of one rank."""

    def __init__(self, beat: Heartbeat, watchdog: Watchdog | None = None, device=None,
                 straggler_ratio: float = 0.0, every: int = 0, fault: str = "",
                 profiler: StepProfiler | None = None, output_dir: str = ""):
        self.beat, self.watchdog, self.device = beat, watchdog, device
        self.profiler, self.output_dir = profiler, output_dir
        self.straggler_ratio, self.every = straggler_ratio, every
        self.faults = [parse_fault(spec) for spec in fault.split(",") if spec]
        self._stack = contextlib.ExitStack()
        self._steps, self._seconds = 0, 0.0

    @classmethod
    def off(cls) -> "Monitor":
        return cls(Heartbeat(0, 1))

    @classmethod
    def start(cls, cfg, rank: int, world_size: int, device, exit_code: int, model) -> "Monitor":
        beat = Heartbeat(rank, world_size)
        profiler = StepProfiler(cfg.profile, cfg.train.output_dir, rank, model, device.type == "cuda")
        watchdog = None
        if cfg.fault.hang_seconds > 0:
            watchdog = Watchdog(beat, hang_dir(cfg.train.output_dir), cfg.fault.hang_seconds, exit_code,
                                cfg.fault.heartbeat_seconds or None).start()
        mon = cls(beat, watchdog, device, cfg.fault.straggler_ratio if world_size > 1 else 0.0,
                  cfg.logging.every, os.environ.get("MOEPIPE_FAULT", ""), profiler, cfg.train.output_dir)
        if world_size > 1 and (watchdog is not None or mon.straggler_ratio):
            mon._stack.enter_context(traced_collectives(beat))
        return mon

    # ---- the loop's calls ----
    def begin_step(self, step: int) -> None:
        self.beat.begin_step(step)
        if self.profiler is not None:
            self.profiler.begin_step(step)

    def phase(self, name: str) -> None:
        self.beat.set_phase(name)
        if self.faults and name == "forward_backward":
            for spec in self.faults:
                self._inject(*spec)

    def end_step(self, step: int, seconds: float) -> dict:
        """Closes the step; every `logging.every` steps gathers the per-rank split (a collective:
        every rank calls this alike) and returns the metrics.jsonl fields, naming a straggler."""
        self.beat.end_step()
        if self.profiler is not None:
            self.profiler.end_step(step)
        self._steps, self._seconds = self._steps + 1, self._seconds + seconds
        if self.beat.rank == 0 and self.every and (step % self.every == 0 or self.beat.steps_done == 1):
            record_progress(step)
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
        if self.profiler is not None:
            self.profiler.close()
        self._stack.close()
        if self.watchdog is not None:
            self.watchdog.close()

    def on_error(self, error: BaseException, engine) -> None:
        """Training raised `error`. Out of memory: write this rank's memory report, then let it
        propagate. A collective that failed because a peer died: name the peer like a hang and
        exit 75 (does not return). Anything else: nothing to add."""
        if is_out_of_memory(error):
            path = oom_report(error, hang_dir(self.output_dir), self.beat.rank, self.beat.where(), engine.model, engine)
            log.error("rank %d ran out of memory in %s; memory breakdown in %s", self.beat.rank, self.beat.where(), path)
        elif self.watchdog is not None:
            self.watchdog.explain_failure(error)

    # ---- fault injection ----
    def _inject(self, kind: str, rank: int, arg: float) -> None:
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
