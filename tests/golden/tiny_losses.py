"""Golden losses of `configs/tiny.yaml`: the first 50 steps on CPU in fp32, one thread.

Refactors must not change what the model computes. `python -m tests.golden.tiny_losses --update`
rewrites `tiny_losses.json` with the machine it was recorded on (do it only for an intended change
of the numerics, and say so in the commit); `tests/e2e/test_golden.py` runs the same command.

How the comparison works:
- On the recording machine's kind (same torch build, same ATen CPU kernels, same CPU model) every
  value must be equal bit for bit.
- Elsewhere, fp32 rounding differs (AVX2 vs AVX-512 kernels sum in another order), and training
  amplifies that: measured against the recorded file, AVX2 kernels (ATEN_CPU_CAPABILITY=avx2) and
  2 threads drift by at most 1.3e-7 relative over steps 1-10, then a near-tied routing decision
  flips (step 19 in both) and the drift grows to ~1e-4 in losses and ~1e-2 in gradient norm by
  step 50. So: steps 1-10 must agree to EARLY_RTOL (about 80x the largest drift seen), and later
  steps as means over 10-step windows to WINDOW_RTOL (4-10x the largest drift seen). An intended
  numerics change fails both: model.norm_eps 1e-6 -> 1e-5 moves step 1's lm loss by 4e-5 and its
  gradient norm by 1e-1, and the windowed losses by 7e-3 (tests/golden/drift_cases.json holds the
  three recorded runs, tests/unit/test_golden_compare.py checks them).
The run pins one intra-op thread (OMP_NUM_THREADS=1) whatever the suite's own thread count, so the
comparison does not depend on how pytest was started.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "tiny_losses.json")
STEPS = 50
KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "maxvio")
EARLY_STEPS = 10
EARLY_RTOL = 1e-5
WINDOW = 10
WINDOW_RTOL = {"loss": 2e-3, "lm_loss": 2e-3, "mtp_loss": 2e-3, "balance_loss": 2e-2, "grad_norm": 4e-2,
               "maxvio": 1e-1}


def machine() -> dict[str, str]:
    """What decides fp32 rounding here: torch build, ATen's CPU kernel level, CPU model."""
    import torch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu}


def run_tiny(workdir: str, threads: int = 1, extra_env: dict | None = None,
             overrides: tuple[str, ...] = ()) -> dict[int, dict[str, float]]:
    """Train the tiny config for STEPS steps in a fresh process; returns {step: {key: value}}."""
    out = os.path.join(workdir, "run")
    cmd = [sys.executable, "-m", "trainer.train", os.path.join(ROOT, "configs", "tiny.yaml"), "--set",
           f"train.steps={STEPS}", "train.device=cpu", "train.dtype=fp32", "checkpoint.every=0",
           "logging.tensorboard=false", "logging.plots=false", f"train.output_dir={out}", f"data.output_dir={os.path.join(workdir, 'data')}",
           "data.valid_fraction=0", *overrides]  # the split the golden numbers were recorded on (no held-out part)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(extra_env or {}))
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tiny run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: {k: r[k] for k in KEYS} for r in rows}


def read(path: str = GOLDEN) -> tuple[dict, dict[int, dict[str, float]]]:
    """(machine it was recorded on, {step: values})."""
    with open(path) as f:
        data = json.load(f)
    return data.get("machine", {}), {int(k): v for k, v in data["steps"].items()}


def compare(want: dict[int, dict], got: dict[int, dict], exact: bool) -> list[str]:
    """The differences that fail the golden test (empty: it passes)."""
    if sorted(got) != sorted(want):
        return [f"steps {sorted(got)[:3]}... != {sorted(want)[:3]}..."]
    if exact:
        return [f"step {s} {k}: {got[s][k]!r} != {want[s][k]!r}" for s in sorted(want) for k in KEYS
                if got[s][k] != want[s][k]]
    bad = []
    for s in range(1, EARLY_STEPS + 1):
        for k in KEYS:
            rel = abs(got[s][k] - want[s][k]) / max(abs(want[s][k]), 1e-30)
            if rel > EARLY_RTOL:
                bad.append(f"step {s} {k}: {got[s][k]!r} vs {want[s][k]!r} (relative {rel:.1e} > {EARLY_RTOL:g})")
    for start in range(EARLY_STEPS + 1, max(want) + 1, WINDOW):
        steps = [s for s in range(start, start + WINDOW) if s in want]
        for k in KEYS:
            a, b = (sum(d[s][k] for s in steps) / len(steps) for d in (got, want))
            rel = abs(a - b) / max(abs(b), 1e-30)
            if rel > WINDOW_RTOL[k]:
                bad.append(f"steps {steps[0]}-{steps[-1]} mean {k}: {a:.6g} vs {b:.6g} "
                           f"(relative {rel:.1e} > {WINDOW_RTOL[k]:g})")
    return bad


def write(path: str, got: dict[int, dict], recorded_on: dict, note: str = "") -> None:
    with open(path, "w") as f:
        json.dump({"machine": recorded_on, **({"note": note} if note else {}),
                   "steps": {str(k): v for k, v in sorted(got.items())}}, f, indent=1)
        f.write("\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--update", action="store_true", help="rewrite the golden file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        got = run_tiny(tmp)
    if args.update:
        write(GOLDEN, got, machine())
        print(f"wrote {GOLDEN}: {len(got)} steps")
        return
    recorded_on, want = read()
    exact = recorded_on == machine()
    problems = compare(want, got, exact)
    print(f"{'exact' if exact else 'tolerance'} comparison: {len(problems)} differences", *problems[:10], sep="\n")


if __name__ == "__main__":
    main()
