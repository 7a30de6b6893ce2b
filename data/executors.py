"""Who runs the units of a stage: a local process pool, or one Slurm job array per stage.

Both run the same code (`data.tasks.ensure_unit` over `data.stages`), and a unit is skipped
when its marker is intact, so an interrupted preparation resumes where it stopped on either.

  LocalExecutor(tasks)   `tasks` processes (forked) take the stage's units one at a time;
                         tasks = 1 runs them in this process.
  submit_slurm(...)      `sbatch --array` per stage, each depending (afterok) on the previous
                         one; array task t of N runs units t, t+N, ... through
                         `slurm/prepare.sbatch`; a last one-task job writes the report.
Slurm does the scheduling; nothing here polls or retries beyond what a rerun does.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess

from data.report import StageProgress
from data.stages import ORDER, STAGES, n_units
from data.tasks import ensure_unit, load_context


def _unit_job(args: tuple[str, str, int]) -> tuple[dict, bool]:
    out_dir, stage, unit = args
    return ensure_unit(load_context(out_dir), stage, unit, STAGES[stage])


class LocalExecutor:
    """Runs each stage's pending units in a pool of `tasks` processes on this machine."""

    def __init__(self, tasks: int = 1, quiet: bool = False):
        if tasks < 1:
            raise ValueError(f"--tasks = {tasks}: must be >= 1")
        self.tasks, self.quiet = tasks, quiet
        self.ran: dict[str, list[int]] = {}

    def run(self, out_dir: str, stage: str) -> float:
        """Run (or skip) every unit of `stage`; returns the stage's wall seconds."""
        total = n_units(load_context(out_dir), stage)
        jobs = [(out_dir, stage, u) for u in range(total)]
        progress = StageProgress(stage, total, self.quiet)
        self.ran[stage] = []
        workers = min(self.tasks, total)
        if workers <= 1:
            results = map(_unit_job, jobs)
            self._collect(results, jobs, progress, stage)
        else:
            if stage == "tokenize":  # import megatron-core (seconds) once, before the workers fork
                from data.indexed import _megatron
                _megatron()
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                self._collect(pool.imap(_unit_job, jobs), jobs, progress, stage)
        return progress.close()

    def _collect(self, results, jobs, progress: StageProgress, stage: str) -> None:
        for (_, _, unit), (stats, ran) in zip(jobs, results):
            if ran:
                self.ran[stage].append(unit)
            progress.update(stats)


def run_task(out_dir: str, stage: str, task: int, tasks: int) -> int:
    """Array task `task` of `tasks`: its units of `stage` (finished ones skipped); returns how many ran."""
    ctx = load_context(out_dir)
    if stage == "finalize":
        from data.summary import finalize
        finalize(out_dir)
        return 1
    ran = 0
    for unit in range(task, n_units(ctx, stage), tasks):
        ran += ensure_unit(ctx, stage, unit, STAGES[stage])[1]
    return ran


def slurm_commands(out_dir: str, tasks: int, script: str, sbatch_args: list[str]) -> list[list[str]]:
    """The sbatch command of each stage (dependencies are added at submission)."""
    ctx = load_context(out_dir)
    logs = os.path.join(out_dir, "work", "logs")
    cmds = []
    for stage in ORDER + ("finalize",):
        n = 1 if stage == "finalize" else min(tasks, n_units(ctx, stage))
        cmds.append(["sbatch", "--parsable", f"--array=0-{n - 1}", f"--job-name=prepare-{stage}",
                     f"--output={logs}/%x-%A_%a.out", *sbatch_args, script, out_dir, stage, str(n)])
    return cmds


def submit_slurm(out_dir: str, tasks: int, script: str, sbatch_args: list[str], env: dict | None = None) -> list[str]:
    """Submit one job array per stage, each afterok on the previous; returns the job ids in stage order."""
    os.makedirs(os.path.join(out_dir, "work", "logs"), exist_ok=True)
    ids: list[str] = []
    for cmd in slurm_commands(out_dir, tasks, script, sbatch_args):
        if ids:
            cmd = cmd[:2] + [f"--dependency=afterok:{ids[-1]}", "--kill-on-invalid-dep=yes"] + cmd[2:]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}; "
                               f"jobs already submitted: {', '.join(ids) or 'none'}")
        ids.append(res.stdout.strip().split(";")[0])
    return ids
