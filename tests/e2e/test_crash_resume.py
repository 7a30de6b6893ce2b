"""kill -9 after a seeded random step, resume, and the following losses equal an uninterrupted run's.

Three real `python -m trainer.train configs/tiny.yaml --set ...` processes on a very small
override (8 steps, seq_len 64, checkpoint every 2 steps, a 512-token BPE on 0.05 MB per dump):
  1. the reference, uninterrupted;
  2. the same run killed with SIGKILL right after a seeded random step N (and N's checkpoint when
     one is due) by the loop's own hook (MOEPIPE_KILL_AFTER_STEP=N), so the kill lands at the
     same place on every machine; a fake half-written `step_*.tmp-*` directory is added;
  3. the same command again: it resumes from the newest complete checkpoint (checkpoint.resume
     = auto) and must log, step for step, bit-identical losses and gradient norms to (1).
Then a corrupted checkpoint must stop the run with exit code 2 and a message naming the file.
One thread per process (OMP_NUM_THREADS=1) keeps the runs bit-reproducible and quick.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8
SMALL = ["train.steps=8", "data.seq_len=64", "model.max_seq_len=64", "train.micro_batch_size=2",
         "checkpoint.every=2", "checkpoint.keep_last=2", "data.tokenizer=bpe:512", "model.vocab_size=512",
         "data.bundled_mb=0.05", "model.hidden_size=32", "model.num_layers=2", "model.dense_ffn_size=64",
         "moe.num_experts=4", "moe.n_group=2", "moe.topk_group=1", "moe.expert_ffn_size=32",
         "logging.tensorboard=false", "logging.plots=false", "train.device=cpu"]


def _cmd(out_dir, data_dir, extra=()):
    return [sys.executable, "-m", "trainer.train", os.path.join(ROOT, "configs", "tiny.yaml"), "--set",
            *SMALL, f"train.output_dir={out_dir}", f"data.output_dir={data_dir}", *extra]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "MOEPIPE_KILL_AFTER_STEP"}
    return dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)


def _rows(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _run(cmd, timeout=120):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stderr


def _kill_after(cmd, step, timeout=120):
    """Run until the loop's hook SIGKILLs the process right after `step`; returns the exit code."""
    p = subprocess.run(cmd, cwd=ROOT, env=_env(MOEPIPE_KILL_AFTER_STEP=str(step)), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=timeout)
    return p.returncode


@pytest.mark.timeout(300)
def test_kill_minus_nine_then_resume_matches_uninterrupted(tmp_path):
    data = str(tmp_path / "data")
    ref_dir, crash_dir = str(tmp_path / "ref"), str(tmp_path / "crash")
    rc, err = _run(_cmd(ref_dir, data))
    assert rc == 0, err[-2000:]
    ref = {r["step"]: r for r in _rows(ref_dir)}
    assert sorted(ref) == list(range(1, STEPS + 1))

    kill_step = random.Random(int(os.environ.get("CRASH_SEED", "8"))).randint(3, STEPS - 2)
    assert _kill_after(_cmd(crash_dir, data), kill_step) == -signal.SIGKILL
    seen = len(_rows(crash_dir))
    assert seen == kill_step
    ckpts = os.path.join(crash_dir, "checkpoints")
    os.makedirs(os.path.join(ckpts, "step_00000099.tmp-1"), exist_ok=True)  # a half-written save
    with open(os.path.join(ckpts, "step_00000099.tmp-1", "state.pt"), "wb") as f:
        f.write(b"partial")
    from parallel.checkpoint import list_checkpoints
    complete = [os.path.basename(p) for p in list_checkpoints(ckpts)]  # a kill mid-prune leaves *.pruned
    resume_from = int(complete[-1][5:]) if complete else 0
    assert resume_from == kill_step - kill_step % 2  # checkpoint.every=2: the last one before the kill

    rc, err = _run(_cmd(crash_dir, data))
    assert rc == 0, err[-2000:]
    resumed = _rows(crash_dir)[seen:]
    assert [r["step"] for r in resumed] == list(range(resume_from + 1, STEPS + 1))
    for r in resumed:
        for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "maxvio"):
            assert r[key] == ref[r["step"]][key], (r["step"], key, r[key], ref[r["step"]][key])
    assert not any(".tmp-" in n for n in os.listdir(ckpts))  # the next save cleaned the leftover

    # a corrupted checkpoint is refused with one clear line, exit code 2
    latest = os.path.join(ckpts, f"step_{STEPS:08d}")
    with open(os.path.join(latest, "state.pt"), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    rc, err = _run(_cmd(crash_dir, data, ["train.steps=9"]))
    assert rc == 2 and "state.pt" in err and "checksum" in err, err[-2000:]


@pytest.mark.timeout(300)
def test_kill_during_an_async_multi_rank_save_keeps_the_previous_checkpoint(tmp_path):
    """2 ranks (dp 2) with checkpoint.async_save: every rank is SIGKILLed right after step 4's
    save was handed to its background writer. The newest complete checkpoint is step 4 if the
    write finished first, else step 2 (never a partial one); the resumed run repeats the killed
    run's steps after it exactly."""
    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    extra = ["checkpoint.async_save=true", "train.steps=6"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(random.Random().randint(20000, 40000))]
    cmd = torchrun + _cmd(out, data, extra)[1:]
    rc, err = _run(_cmd(out + "_prep", data, ["train.steps=1"]))  # prepares the data in one process
    assert rc == 0, err[-2000:]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(MOEPIPE_KILL_AFTER_STEP="4"), capture_output=True, text=True,
                       timeout=240)
    assert p.returncode != 0
    killed = {r["step"]: r for r in _rows(out)}
    assert sorted(killed) == [1, 2, 3, 4]
    from parallel.checkpoint import list_checkpoints
    complete = [int(os.path.basename(c)[5:]) for c in list_checkpoints(os.path.join(out, "checkpoints"))]
    assert complete and complete[-1] in (2, 4), complete
    cmd[cmd.index("--master-port") + 1] = str(random.Random().randint(40001, 60000))
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = _rows(out)[4:]
    assert [r["step"] for r in resumed] == list(range(complete[-1] + 1, 7))
    for r in resumed:
        if r["step"] in killed:
            for key in ("loss", "grad_norm"):
                assert r[key] == killed[r["step"]][key], (r["step"], key)
