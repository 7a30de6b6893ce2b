"""`python -m trainer.prepare CONFIG [--tasks N] [--slurm [--partition P]] [--set section.key=value ...]`.

Prepares a run's data only. Reads the training YAML (its `data:` and `dedup:` sections, with
`base:` inheritance and overrides) and runs the sharded stages of `data.prepare` (sign,
buckets, clusters, tokenizer, tokenize; see `data.stages`):
  * by default on this machine, `--tasks` processes at a time (default data.workers), then
    prints the summary tables;
  * with `--slurm`, as one job array per stage (each afterok on the previous) through
    `slurm/prepare.sbatch`, printing the job ids and how to watch them.
When the output directory already holds this config's data and no input changed since, it says
so and does nothing (`--force` prepares again from scratch). An interrupted preparation run
again keeps every finished unit and redoes the rest.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from data.executors import run_task, slurm_commands, submit_slurm
from data.prepare import plan, prepare, prepared_dir, stale_reason, stage_units, summary_text
from trainer.cli import user_errors

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.prepare", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=None,
                   help="training YAML (its data: and dedup: sections are used); none = defaults")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="dotted overrides")
    p.add_argument("--force", action="store_true", help="prepare again from scratch even when nothing changed")
    p.add_argument("--tasks", type=int, default=0,
                   help="local: processes at a time (default data.workers); --slurm: array tasks per stage")
    p.add_argument("--slurm", action="store_true", help="submit one Slurm job array per stage instead")
    p.add_argument("--partition", default=None, help="Slurm partition (with --slurm)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch argument for every stage, e.g. --sbatch-arg=--mem=8G (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: print the sbatch lines only")
    p.add_argument("--run-task", default=None, metavar="STAGE", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--task", type=int, default=0, help=argparse.SUPPRESS)
    return p


@user_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    if args.run_task:  # one array task, inside Slurm (slurm/prepare.sbatch)
        ran = run_task(args.out, args.run_task, args.task, args.tasks)
        print(f"stage {args.run_task} task {args.task}/{args.tasks}: {ran} unit(s) run")
        return 0
    from trainer.config import load_config  # imports the model config (torch): not needed by array tasks
    cfg = load_config(args.config, args.set)
    data_cfg = dataclasses.replace(cfg.data, output_dir=prepared_dir(cfg.data, cfg.dedup))
    reason = stale_reason(data_cfg.output_dir, data_cfg, cfg.dedup)
    if reason is None and not args.force:
        print(f"up to date: {data_cfg.output_dir} holds this config's data and no input changed; "
              "nothing to do (--force prepares again)")
        return 0
    if reason != "not prepared yet":
        print(f"preparing again: {reason}", file=sys.stderr)
    if args.slurm:
        return _submit(args, data_cfg, cfg.dedup)
    report = prepare(data_cfg, cfg.dedup, tasks=args.tasks or None, fresh=args.force)
    print(summary_text(report))
    print(f"\nwrote {data_cfg.output_dir} (report: {os.path.join(data_cfg.output_dir, 'report.json')}) "
          f"in {report['seconds']:.1f}s")
    return 0


def _submit(args, data_cfg, dedup_cfg) -> int:
    out = os.path.abspath(plan(data_cfg, dedup_cfg, fresh=args.force))
    tasks = args.tasks or 8
    extra = ([f"--partition={args.partition}"] if args.partition else []) + list(args.sbatch_arg)
    script = os.path.join(_REPO, "slurm", "prepare.sbatch")
    units = stage_units(out)
    if args.dry_run:
        for cmd in slurm_commands(out, tasks, script, extra):
            print(" ".join(cmd))
        return 0
    env = {**os.environ, "MOEPIPE_ROOT": os.environ.get("MOEPIPE_ROOT", _REPO)}
    ids = submit_slurm(out, tasks, script, extra, env)
    for (stage, n), job in zip(list(units.items()) + [("finalize", 1)], ids):
        print(f"submitted {stage:>9}: job {job} ({min(tasks, n)} array task(s) over {n} unit(s))")
    print(f"watch: squeue -j {','.join(ids)}   logs: {out}/work/logs/   "
          f"done when {out}/_COMPLETE.json exists (sacct -j {ids[-1]} shows COMPLETED); "
          "rerun the same command to redo only failed units")
    return 0


if __name__ == "__main__":
    sys.exit(main())
