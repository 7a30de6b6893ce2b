"""Config-driven ablation sweeps: `python -m trainer.sweep SWEEP.yaml [--dry-run] [--slurm]`.

A sweep file names a base config, overrides shared by every run (`set:`), named variants
(`runs:`), a grid of values (`grid:`, a Cartesian product) and `seeds:`. Every variant is
crossed with the grid and the seeds; each combination is one run with its own name and its own
`train.output_dir` under the sweep's `output_dir`. The runs are plain `python -m trainer.train`
invocations, so everything the trainer does (resume, checkpoints, metrics.jsonl) holds per run.

Runs execute locally one after another, or as one Slurm job array (`slurm/sweep.sbatch`, one
array task per unfinished run, each launched like `slurm/train.sbatch`). A run counts as finished
when its metrics.jsonl has reached `train.steps`; finished runs are skipped, so re-running a
sweep after a crash or preemption only does what is missing. Results (final metrics per run as
CSV + Markdown, loss curves and metric-vs-swept-value plots) come from `trainer/sweep_report.py`.

The shipped example, `configs/sweeps/balance_ablation.yaml`, reproduces in miniature the
DeepSeek-V3 ablation of auxiliary-loss-free balancing against an auxiliary balance loss
(DeepSeek-V3 report section 4.5.2, Table 5; Wang et al. 2024, "Auxiliary-Loss-Free Load
Balancing"): loss and MaxVio per strategy.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys

import yaml

from trainer.config import ConfigError, load_config
from trainer.cli import user_errors

SWEEP_KEYS = {"base", "output_dir", "set", "runs", "grid", "seeds", "seed_key", "metrics",
              "plot_x", "summary_window", "slurm"}
SLURM_KEYS = {"sbatch_args", "max_parallel", "script"}
EXIT_USER_ERROR = 2


class SweepError(ValueError):
    """A user error in a sweep file; the message names the key, the value and the fix."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its name, its overrides (dotted key -> value) and where it writes."""

    index: int
    name: str
    overrides: dict
    output_dir: str
    seed: int | None = None

    def set_args(self) -> list[str]:
        """`section.key=value` strings for `python -m trainer.train CONFIG --set ...`."""
        out = [f"{k}={format_value(v)}" for k, v in self.overrides.items()]
        return out + [f"train.output_dir={self.output_dir}"]


@dataclasses.dataclass
class Sweep:
    path: str
    base: str
    output_dir: str
    common: dict
    variants: dict
    grid: dict
    seeds: list
    seed_key: str
    metrics: list
    plot_x: str | None
    summary_window: int
    slurm: dict

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    @property
    def swept_keys(self) -> list[str]:
        """Every dotted key some run sets differently from another (the table's columns)."""
        keys: list[str] = []
        for ov in [*self.variants.values(), self.grid]:
            keys += [k for k in ov if k not in keys]
        return keys


def format_value(value) -> str:
    """A YAML scalar/list text that the config loader parses back to the same value."""
    return json.dumps(value) if not isinstance(value, str) else value


def _mapping(raw, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SweepError(f"{where} = {raw!r}: must be a mapping of section.key: value")
    for key in raw:
        if not isinstance(key, str) or key.count(".") != 1:
            raise SweepError(f"{where}: key {key!r} must be a dotted 'section.key', e.g. moe.topk")
    return dict(raw)


def _variants(raw) -> dict:
    if raw is None:
        return {"": {}}
    if not isinstance(raw, dict) or not raw:
        raise SweepError(f"runs = {raw!r}: must be a non-empty mapping of run name -> overrides")
    out = {}
    for name, ov in raw.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)):
            raise SweepError(f"runs: name {name!r} must use letters, digits, '_', '.', '-' only")
        out[str(name)] = _mapping(ov, f"runs.{name}")
    return out


def _grid(raw) -> dict:
    grid = _mapping(raw, "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid.{key} = {values!r}: must be a non-empty list of values")
    return grid


def load_sweep(path: str) -> Sweep:
    """Read and validate a sweep file (paths inside it are relative to the file)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise SweepError(f"sweep file {path!r}: {e.strerror}") from e
    if not isinstance(raw, dict):
        raise SweepError(f"sweep file {path!r}: must be a YAML mapping")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise SweepError(f"sweep file {path!r}: unknown key(s) {unknown}; valid: {sorted(SWEEP_KEYS)}")
    if "base" not in raw:
        raise SweepError(f"sweep file {path!r}: 'base' (the config file every run starts from) is missing")
    base = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), str(raw["base"])))
    seeds = raw.get("seeds", [])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise SweepError(f"seeds = {seeds!r}: must be a list of integers")
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict) or set(slurm) - SLURM_KEYS:
        raise SweepError(f"slurm = {slurm!r}: valid keys are {sorted(SLURM_KEYS)}")
    window = raw.get("summary_window", 10)
    if not isinstance(window, int) or window < 1:
        raise SweepError(f"summary_window = {window!r}: must be a positive integer (steps averaged)")
    return Sweep(path=path, base=base, output_dir=str(raw.get("output_dir", f"runs/sweeps/{_stem(path)}")),
                 common=_mapping(raw.get("set"), "set"), variants=_variants(raw.get("runs")),
                 grid=_grid(raw.get("grid")), seeds=seeds, seed_key=str(raw.get("seed_key", "train.seed")),
                 metrics=list(raw.get("metrics", ["loss", "lm_loss", "maxvio"])),
                 plot_x=raw.get("plot_x"), summary_window=window, slurm=slurm)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _short_keys(keys: list[str]) -> dict:
    """'moe.topk_group' -> 'topk_group' unless two swept keys share the last part."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _slug(value) -> str:
    text = format_value(value) if not isinstance(value, float) else repr(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def expand(sweep: Sweep) -> list[RunSpec]:
    """variants x grid x seeds, in a stable order (the Slurm array index is the position here)."""
    keys = list(sweep.grid)
    short = _short_keys(keys)
    combos = list(itertools.product(*(sweep.grid[k] for k in keys))) or [()]
    seeds = sweep.seeds or [None]
    runs: list[RunSpec] = []
    for vname, vset in sweep.variants.items():
        for combo, seed in itertools.product(combos, seeds):
            parts = [vname] if vname else []
            parts += [f"{short[k]}={_slug(v)}" for k, v in zip(keys, combo)]
            if seed is not None:
                parts.append(f"seed{seed}")
            name = "__".join(parts) or "run"
            overrides = {**sweep.common, **vset, **dict(zip(keys, combo))}
            if seed is not None:
                overrides[sweep.seed_key] = seed
            runs.append(RunSpec(len(runs), name, overrides, os.path.join(sweep.output_dir, name), seed))
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"run names {dupes} repeat: give the variants in 'runs:' distinct names")
    return runs


def validate(sweep: Sweep, runs: list[RunSpec]) -> list:
    """Load every run's full config (strict), so a typo fails before anything trains."""
    configs = []
    for run in runs:
        try:
            configs.append(load_config(sweep.base, run.set_args()))
        except ConfigError as e:
            raise SweepError(f"run {run.name!r}: {e}") from e
    return configs


def last_step(output_dir: str) -> int:
    """Highest step recorded in output_dir/metrics.jsonl (0 when there is none)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    best = 0
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                best = max(best, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                continue  # a line cut short by a kill; the resumed run rewrites that step
    return best


def last_tokens(output_dir: str) -> int:
    """Most tokens seen recorded in output_dir/metrics.jsonl (0 when there is none)."""
    from trainer.metrics import read_metrics
    return max((int(r.get("tokens", 0)) for r in read_metrics(output_dir)), default=0)


def is_finished(run: RunSpec, total_steps: int, total_tokens: int = 0) -> bool:
    """The run reached train.steps or train.tokens (0 = that limit is off)."""
    return bool(total_steps and last_step(run.output_dir) >= total_steps
                or total_tokens and last_tokens(run.output_dir) >= total_tokens)


def train_command(sweep: Sweep, run: RunSpec) -> list[str]:
    return [sys.executable, "-m", "trainer.train", sweep.base, "--set", *run.set_args()]


def run_local(sweep: Sweep, runs: list[RunSpec], configs: list) -> int:
    """Run the unfinished runs one after another; returns how many failed."""
    failed = 0
    for run, cfg in zip(runs, configs):
        if is_finished(run, cfg.train.steps, cfg.train.tokens):
            print(f"[{run.index}] {run.name}: finished, skipped")
            continue
        os.makedirs(run.output_dir, exist_ok=True)
        console = os.path.join(run.output_dir, "console.log")
        print(f"[{run.index}] {run.name}: training ({cfg.train.steps} steps), output in {console}", flush=True)
        with open(console, "a", encoding="utf-8") as out:
            rc = subprocess.call(train_command(sweep, run), stdout=out, stderr=subprocess.STDOUT)
        if rc != 0:
            failed += 1
            with open(console, encoding="utf-8", errors="replace") as f:
                tail = f.readlines()[-5:]
            print(f"[{run.index}] {run.name}: FAILED with exit code {rc}; last lines:\n  "
                  + "  ".join(tail), flush=True)
    return failed


def submit_slurm(sweep: Sweep, runs: list[RunSpec], configs: list, dry_run: bool = False) -> str | None:
    """One sbatch job array over the unfinished runs; returns the sbatch command line's output."""
    todo = [r.index for r, c in zip(runs, configs) if not is_finished(r, c.train.steps, c.train.tokens)]
    if not todo:
        print("every run is finished; nothing to submit")
        return None
    array = ",".join(map(str, todo))
    if sweep.slurm.get("max_parallel"):
        array += f"%{int(sweep.slurm['max_parallel'])}"
    script = sweep.slurm.get("script", "slurm/sweep.sbatch")
    os.makedirs(os.path.join(sweep.output_dir, "slurm"), exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--array={array}", f"--job-name={sweep.name}",
           f"--output={os.path.join(sweep.output_dir, 'slurm', '%x-%A_%a.out')}",
           *map(str, sweep.slurm.get("sbatch_args", [])), script, os.path.abspath(sweep.path)]
    print(" ".join(cmd))
    if dry_run:
        return None
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    print(f"submitted job array {out} ({len(todo)} runs); collect later with "
          f"python -m trainer.sweep {sweep.path} --collect")
    return out


def print_runs(sweep: Sweep, runs: list[RunSpec], configs: list) -> None:
    for run, cfg in zip(runs, configs):
        done = is_finished(run, cfg.train.steps, cfg.train.tokens)
        state = "finished" if done else f"at step {last_step(run.output_dir)}"
        print(f"[{run.index}] {run.name} ({state})\n    python {shlex.join(train_command(sweep, run)[1:])}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.sweep", description=__doc__.splitlines()[0])
    p.add_argument("sweep", help="sweep YAML file (see configs/sweeps/)")
    p.add_argument("--dry-run", action="store_true", help="print the runs (and the sbatch line) only")
    p.add_argument("--slurm", action="store_true", help="submit the unfinished runs as one Slurm job array")
    p.add_argument("--collect", action="store_true", help="only collect results (tables and plot)")
    p.add_argument("--run-args", type=int, metavar="INDEX",
                   help="print run INDEX's train arguments one per line (used by slurm/sweep.sbatch)")
    return p.parse_args(argv)


@user_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    sweep = load_sweep(args.sweep)
    runs = expand(sweep)
    if args.run_args is not None:
        if not 0 <= args.run_args < len(runs):
            raise SweepError(f"--run-args {args.run_args}: the sweep has runs 0..{len(runs) - 1}")
        run = runs[args.run_args]
        print("\n".join([sweep.base, "--set", *run.set_args()]))
        return 0
    configs = validate(sweep, runs)
    from trainer.sweep_report import collect_and_report
    if args.dry_run and not args.slurm:
        print_runs(sweep, runs, configs)
        return 0
    if args.slurm:
        submit_slurm(sweep, runs, configs, dry_run=args.dry_run)
        return 0
    failed = 0 if args.collect else run_local(sweep, runs, configs)
    collect_and_report(sweep, runs, configs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
