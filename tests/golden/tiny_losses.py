"""Golden losses of `configs/tiny.yaml`: the first 50 steps on CPU in fp32, one thread.

Refactors must not change what the model computes. `python -m tests.golden.tiny_losses --update`
rewrites `tiny_losses.json` (do it only for an intended change of the numerics, and say so in the
commit); `tests/e2e/test_golden.py` runs the same command and compares every value exactly.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_losses.json")
STEPS = 50
KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "maxvio")


def run_tiny(workdir: str, threads: int = 1, extra_env: dict | None = None,
             overrides: tuple[str, ...] = ()) -> dict[int, dict[str, float]]:
    """Train the tiny config for STEPS steps in a fresh process; returns {step: {key: value}}."""
    out = os.path.join(workdir, "run")
    cmd = [sys.executable, "-m", "trainer.train", os.path.join(ROOT, "configs", "tiny.yaml"), "--set",
           f"train.steps={STEPS}", "train.device=cpu", "train.dtype=fp32", "checkpoint.every=0",
           "logging.tensorboard=false", f"train.output_dir={out}", f"data.output_dir={os.path.join(workdir, 'data')}",
           "data.valid_fraction=0", *overrides]  # the split the golden numbers were recorded on (no held-out part)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(extra_env or {}))
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tiny run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: {k: r[k] for k in KEYS} for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--update", action="store_true", help="rewrite the golden file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        got = run_tiny(tmp)
    if args.update:
        with open(GOLDEN, "w") as f:
            json.dump({str(k): v for k, v in sorted(got.items())}, f, indent=1)
            f.write("\n")
        print(f"wrote {GOLDEN}: {len(got)} steps")


if __name__ == "__main__":
    main()
