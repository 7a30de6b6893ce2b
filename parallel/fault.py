"""Fault handling settings: the hang watchdog, the straggler report, and what the process groups
are told (timeout, NCCL watchdog and Flight Recorder) so that their own reports land beside ours.

The pieces: `parallel.heartbeat` (where each rank is), `parallel.watchdog` (publish, detect,
dump, name the stuck rank, exit for a requeue), `parallel.straggler` (per-rank step time split).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from model.config import doc, require

DEFAULT_PG_TIMEOUT_S = 600.0  # the backstop behind the watchdog, never shorter than this


@dataclass(kw_only=True)
class FaultConfig:
    """Hangs, dead ranks and slow ranks: detected, named and dumped (see README, 'When a run hangs')."""

    hang_seconds: float = doc(300.0, "Seconds a rank may go without progress (no step, phase or collective change) before every live rank dumps its Python stacks to output_dir/hang/, one line names the rank(s) the others wait for, and the job exits 75 for a requeue; 0 = no watchdog. Must exceed the longest pause of a healthy step (the first step's compilation, a checkpoint write).")
    heartbeat_seconds: float = doc(0.0, "How often each rank publishes its heartbeat to output_dir/hang/beats/; 0 = hang_seconds / 10, between 0.5 and 5 s (a dead rank is named after about 3 of these, inside the 30 s a launcher waits before killing the rest).")
    straggler_ratio: float = doc(1.5, "Every logging.every steps the per-rank step time split (compute, collective wait, data) is gathered into metrics.jsonl; the log names the slowest rank when its busy time (compute + data) exceeds the median rank's by this ratio. 0 = no gathering.")

    def __post_init__(self):
        require(self.hang_seconds >= 0, "hang_seconds", self.hang_seconds, "must be >= 0 (0 = no watchdog)")
        require(self.heartbeat_seconds >= 0, "heartbeat_seconds", self.heartbeat_seconds, "must be >= 0 (0 = auto)")
        require(self.hang_seconds == 0 or self.heartbeat_seconds * 3 < self.hang_seconds, "heartbeat_seconds",
                self.heartbeat_seconds, f"must be under a third of hang_seconds ({self.hang_seconds})")
        require(self.straggler_ratio == 0 or self.straggler_ratio >= 1, "straggler_ratio", self.straggler_ratio,
                "must be >= 1 (a ratio to the median rank), or 0 for no straggler report")


def process_group_timeout_s(cfg: FaultConfig) -> float:
    """Twice the watchdog's limit, so that the watchdog (which names the rank) speaks first; never
    under the old fixed 10 minutes, which startup and checkpoint barriers are sized for."""
    return max(2.0 * cfg.hang_seconds, DEFAULT_PG_TIMEOUT_S)


def collective_environment(hang_dir: str, cuda: bool) -> dict[str, str]:
    """Environment for torch's own process-group diagnostics; set before the process group starts.

    Every backend: a Flight Recorder ring buffer of the last collectives (the watchdog dumps it
    beside the stacks). NCCL: the watchdog thread tears the process down on a collective error or
    timeout (async error handling), and on a timeout each rank dumps its Flight Recorder to
    `hang_dir/nccl/rank_<N>` (read with `python -m torch.distributed.flight_recorder.fr_trace
    hang_dir/nccl -p rank_`)."""
    env = {"TORCH_FR_BUFFER_SIZE": "2000"}
    if cuda:
        env.update({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
                    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_NCCL_ENABLE_MONITORING": "1",
                    "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": os.path.join(hang_dir, "nccl", "rank_")})
    return env


def set_collective_environment(hang_dir: str, cuda: bool) -> dict[str, str]:
    """Apply `collective_environment` where the user has not set a value; returns what was set."""
    applied = {k: v for k, v in collective_environment(hang_dir, cuda).items() if k not in os.environ}
    os.environ.update(applied)
    if cuda:
        os.makedirs(os.path.join(hang_dir, "nccl"), exist_ok=True)
    return applied
