"""Hang watchdog: publish every rank's heartbeat, and when this rank stops making progress for
`hang_seconds`, dump its Python stacks, name the rank(s) the others wait for, and exit.

Side channel: each rank's watchdog thread writes its heartbeat (`parallel.heartbeat`) every
`interval` seconds to `<dir>/beats/rank_N.json` (write, then rename: readers never see half a
file). Files in the run's output directory need no process group, so a collective that never
returns cannot block them; a rank that is stopped (SIGSTOP), dead (kill -9, OOM) or whose host is
gone stops writing, and its beat grows stale. The output directory is shared by every node (the
checkpoints need it already).

When the training thread has not moved for `hang_seconds`, every live rank's watchdog (armed once
this process has finished one step: startup skew and the first step's compilation are left to the
process-group timeout) does:
  1. dumps the Python stacks of all its threads (faulthandler) to `<dir>/rank_N.txt`, and the
     Flight Recorder ring buffer of its process groups, where torch keeps one, to `fr_rank_N.json`;
  2. reads every beat and states the hang in one line (`diagnose`), e.g.
     "rank 2 of 4 never entered all_to_all #3 of step 118 (silent for 41 s, last seen in
     forward_backward of step 118: stopped or dead); ranks 0,1,3 wait in it"; the first rank to
     get there writes it to `<dir>/diagnosis.txt`, which the others then repeat;
  3. ends a silent rank of its own host (by pid) so the launcher need not wait out its grace
     period for a stopped process, and leaves with `exit_code` (the requeue code).
A collective that raises because a peer died (gloo reports a closed connection at once) goes
through the same diagnosis from the training thread (`explain_failure`).
"""
from __future__ import annotations

import collections
import faulthandler
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback

from parallel.heartbeat import Heartbeat

log = logging.getLogger("moepipe")


# --------------------------------------------------------------------------- the board of beats
class BeatBoard:
    """Every rank's latest heartbeat, as one small JSON file per rank under `<root>/beats`."""

    def __init__(self, root: str, world_size: int):
        self.root, self.world_size = root, world_size
        self.beats_dir = os.path.join(root, "beats")
        os.makedirs(self.beats_dir, exist_ok=True)

    def path(self, rank: int) -> str:
        return os.path.join(self.beats_dir, f"rank_{rank}.json")

    def publish(self, beat: dict) -> None:
        path = self.path(beat["rank"])
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(beat, f)
        os.replace(tmp, path)

    def read(self) -> dict[int, dict | None]:
        beats = {}
        for rank in range(self.world_size):
            try:
                with open(self.path(rank), encoding="utf-8") as f:
                    beats[rank] = json.load(f)
            except (OSError, ValueError):
                beats[rank] = None
        return beats

    def clear_rank(self, rank: int) -> None:
        """A fresh start: this rank's beat, stack dump and (rank 0) the last diagnosis go."""
        names = [self.path(rank), os.path.join(self.root, f"rank_{rank}.txt"),
                 os.path.join(self.root, f"fr_rank_{rank}.json")]
        if rank == 0:
            names.append(os.path.join(self.root, "diagnosis.txt"))
        for name in names:
            if os.path.exists(name):
                os.remove(name)


# --------------------------------------------------------------------------- the one-line diagnosis
def rank_list(ranks) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    ranks, parts = sorted(ranks), []
    for r in ranks:
        if parts and parts[-1][1] == r - 1:
            parts[-1][1] = r
        else:
            parts.append([r, r])
    return ",".join(f"{a}" if a == b else (f"{a},{b}" if b == a + 1 else f"{a}-{b}") for a, b in parts)


def _who(ranks, world: int) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {rank_list(ranks)} of {world}"


def _where(b: dict) -> str:
    if b.get("collective"):
        return f"{b['collective']} #{b['seq']} of step {b['step']}"
    return f"{b['phase']} of step {b['step']}"


def diagnose(beats: dict[int, dict | None], world: int, now: float, stale_after: float) -> str:
    """One line naming the rank(s) the others wait for, and where everyone is.

    A beat older than `stale_after` seconds (or missing) is silent: that rank is stopped, dead or
    cut off. The collective most live ranks wait in is the one the hang is about; every rank not
    in it is named with where it is instead."""
    silent = {r for r, b in beats.items() if b is None or now - b["time"] > stale_after}
    live = {r: b for r, b in beats.items() if r not in silent}
    waits = collections.Counter((b["step"], b["collective"], b["seq"]) for b in live.values() if b["collective"])
    if not waits:
        parts = [f"{_who(sorted(silent), world)} silent" if silent else ""]
        by_place = collections.defaultdict(list)
        for r, b in live.items():
            by_place[_where(b)].append(r)
        parts += [f"{_who(rs, world)} in {place}" for place, rs in sorted(by_place.items())]
        return "no progress and no rank inside a collective: " + "; ".join(p for p in parts if p)
    (step, name, seq), _ = waits.most_common(1)[0]
    target = f"{name} #{seq} of step {step}"
    waiting = [r for r, b in live.items() if (b["step"], b["collective"], b["seq"]) == (step, name, seq)]
    groups = collections.defaultdict(list)
    for r in sorted(beats):
        b = beats[r]
        if r in waiting:
            continue
        if r in silent:
            what = ("no heartbeat at all: stopped or dead before its watchdog started" if b is None else
                    f"silent for {now - b['time']:.0f} s, last seen in {_where(b)}: stopped or dead")
            groups[f"never entered {target} ({what})"].append(r)
        elif b.get("collective"):
            late = sorted(set(b.get("peers") or []) - set(waiting) - {r})
            with_ = f" (its group: ranks {rank_list(b['peers'])})" if late else ""
            groups[f"waits in {_where(b)}{with_} instead of {target}"].append(r)
        else:
            groups[f"never entered {target} (still in {_where(b)})"].append(r)
    if not groups:
        return f"{_who(waiting, world)} wait in {target} and none of them moves (a slow or lost message?)"
    named = "; ".join(f"{_who(rs, world)} {what}" for what, rs in groups.items())
    return f"{named}; {'ranks' if len(waiting) > 1 else 'rank'} {rank_list(waiting)} wait{'' if len(waiting) > 1 else 's'} in it"


# --------------------------------------------------------------------------- dumps
def dump_stacks(root: str, rank: int, header: str) -> str:
    """Python stacks of every thread of this process to `<root>/rank_N.txt`; returns the path."""
    path = os.path.join(root, f"rank_{rank}.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + "\n\n")
        f.flush()
        faulthandler.dump_traceback(f, all_threads=True)
    return path


def dump_flight_recorder(root: str, rank: int) -> str | None:
    """The process groups' Flight Recorder entries (last collectives, with their sequence ids), when
    this build of torch keeps them (TORCH_FR_BUFFER_SIZE > 0)."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json
        text = _dump_fr_trace_json(True, False)
    except (ImportError, RuntimeError, TypeError):
        return None
    path = os.path.join(root, f"fr_rank_{rank}.json")
    with open(path + ".tmp", "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode())
    os.replace(path + ".tmp", path)
    return path


# --------------------------------------------------------------------------- the thread
class Watchdog:
    """Publishes `beat` every `interval` s; on `hang_seconds` without progress, diagnoses and exits."""

    def __init__(self, beat: Heartbeat, root: str, hang_seconds: float, exit_code: int,
                 interval: float | None = None):
        self.beat, self.root, self.hang_seconds, self.exit_code = beat, root, hang_seconds, exit_code
        self.interval = interval or min(max(hang_seconds / 10, 0.5), 5.0)
        self.stale_after = 3 * self.interval + 2.0
        self.board = BeatBoard(root, beat.world_size)
        self.board.clear_rank(beat.rank)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.firing = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moepipe-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.publish()
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval)

    def publish(self) -> None:
        self.board.publish({**self.beat.snapshot(), "host": self.host, "pid": self.pid, "time": time.time()})

    def _run(self) -> None:
        count, moved = self.beat.count, time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                self.publish()
            except OSError as e:  # a full or flaky disk must not end training; say it once
                log.warning("watchdog: cannot write the heartbeat to %s: %s", self.board.beats_dir, e)
            if self.beat.count != count:
                count, moved = self.beat.count, time.monotonic()
            elif self.beat.steps_done and time.monotonic() - moved > self.hang_seconds and not self.firing.is_set():
                self.fire(f"no progress for {self.hang_seconds:.0f} s (fault.hang_seconds) at {self.beat.where()}")

    # ---- the two ways in: a stall seen by the thread, a failed collective seen by training ----
    def fire(self, reason: str, detail: str = "") -> None:
        """Dump, diagnose, end stopped local ranks, exit. Never returns."""
        self.firing.set()
        try:
            self._report(reason, detail)
        except BaseException as e:  # noqa: BLE001 - whatever happens, the process must leave
            log.error("watchdog: the hang report failed (%s: %s); exiting anyway", type(e).__name__, e)
        finally:
            for handler in log.handlers + logging.getLogger().handlers:
                handler.flush()
            os._exit(self.exit_code)

    def _report(self, reason: str, detail: str) -> None:
        rank = self.beat.rank
        header = f"rank {rank} of {self.beat.world_size} (host {self.host}, pid {self.pid}): {reason}\n{detail}"
        stacks = dump_stacks(self.root, rank, header)
        line, beats, first = self.diagnosis()
        if first or rank == 0:  # one line per job, and one in rank 0's train.log
            log.error("HANG: %s. Stacks: %s (one file per live rank); exit %d for a requeue",
                      line, os.path.join(os.path.dirname(stacks), "rank_*.txt"), self.exit_code)
        recorder = threading.Thread(target=dump_flight_recorder, args=(self.root, rank), daemon=True)
        recorder.start()
        recorder.join(timeout=2.0)  # it may wait on a lock of the stuck collective: best effort
        self.end_silent_local_ranks(beats)

    def explain_failure(self, error: BaseException) -> bool:
        """Training caught `error`: when a collective raised it (a peer died), wait until the dead
        rank's beat is stale, then name it like a hang and exit. False: not a collective failure."""
        if self.beat.failed is None:
            return False
        if self.firing.is_set():  # the thread is on it already
            time.sleep(self.stale_after + 30)
        name, seq, step = self.beat.failed
        self.beat.collective = (name, seq)  # where this rank waited when its peer went away
        self.publish()
        deadline = time.time() + self.stale_after + self.interval
        while time.time() < deadline and not self._someone_silent():
            time.sleep(self.interval / 2)
        self.fire(f"{name} #{seq} of step {step} failed: {' '.join(str(error).split())[:300]}",
                  "Where the training thread was when it failed:\n" + "".join(traceback.format_exception(error)))
        return True  # not reached

    def _someone_silent(self) -> bool:
        now = time.time()
        return any(b is None or now - b["time"] > self.stale_after for b in self.board.read().values())

    def diagnosis(self) -> tuple[str, dict, bool]:
        """The line of the first rank that got here (from diagnosis.txt), else ours, written there;
        with every beat and whether this rank was the first."""
        beats = self.board.read()
        beats[self.beat.rank] = {**self.beat.snapshot(), "host": self.host, "pid": self.pid, "time": time.time()}
        line = diagnose(beats, self.beat.world_size, time.time(), self.stale_after)
        path = os.path.join(self.root, "diagnosis.txt")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with open(path, encoding="utf-8") as f:
                return f.read().strip() or line, beats, False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(line + "\n")
        return line, beats, True

    def end_silent_local_ranks(self, beats: dict) -> None:
        """SIGKILL the stopped (SIGSTOP, state T) silent ranks on this host: a stopped process
        ignores the launcher's SIGTERM, which would hold the job for the launcher's grace period."""
        now = time.time()
        for r, b in beats.items():
            if b and r != self.beat.rank and b.get("host") == self.host and now - b["time"] > self.stale_after \
                    and process_state(int(b["pid"])) == "T":
                try:
                    os.kill(int(b["pid"]), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def process_state(pid: int) -> str | None:
    """The state letter of a local process (R, S, T stopped, Z ...), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
