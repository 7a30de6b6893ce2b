"""A token-scheduled run (batch-size ramp and every phased quantity) at three layouts, and its resume.

The recipe in miniature (DeepSeek-V3 section 4.2 in shape): the global batch grows 4 -> 8 -> 12
sequences of 64 tokens as tokens are seen, the MTP weight drops 0.3 -> 0.1, the bias update
speed drops to 0, the lr holds then decays by a cosine, and the run ends at train.tokens = 2,560
(five steps of 4, 4, 8, 12, 12 sequences). The batch stays a multiple of 4, so one process
(micro-batches of 1), dp 4 x ep 2 (one micro-batch of 1 per rank, then 2, then 3) and DualPipeV at
pp 2 (4, 8, 12 micro-batches) all take the same sequences per step:
  - one process, killed with SIGKILL right after step 3 (its last checkpoint is step 2, before
    the batch grows), resumes to bit-identical losses and grad norms;
  - dp 4 x ep 2 (4 ranks) and DualPipeV (2 ranks) match one process to float rounding,
    and DualPipeV resumes its own step-2 checkpoint exactly (the step, tokens seen and data
    position are layout-independent state; exact multi-rank resume at a constant batch is
    tests/e2e/test_train.py's).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.e2e.test_train import ROOT, TINY, copy_checkpoint, losses, one_process, overrides, ranks

PHASES = ("schedule.phases={"
          "train.global_batch: [{until_tokens: 512, value: 4}, {until_tokens: 1024, value: 8}, "
          "{until_tokens: 1M, value: 12}], "
          "mtp.loss_weight: [{until_tokens: 1024, value: 0.3}, {until_tokens: 1M, value: 0.1}], "
          "moe.bias_update_speed: [{until_tokens: 1792, value: 0.001}, {until_tokens: 1M, value: 0}], "
          "optim.lr: [{until_tokens: 1024, value: 3e-3}, {until_tokens: 2560, from: 3e-3, to: 3e-4, shape: cosine}]}")
ARGS = ["train.steps=0", "train.tokens=2560", "schedule.warmup_steps=2", "data.seq_len=64", "model.max_seq_len=64",
        "train.micro_batch_size=1", "logging.every=1", "data.tokenizer=bpe:512", "model.vocab_size=512",
        "checkpoint.every=2", "checkpoint.keep_last=5", PHASES]
KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "maxvio")
STEPS = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ramp_data"))


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ramp_ref"))
    one_process(overrides(data_root, out, *ARGS))
    return out


def assert_close(ref, got, steps):
    assert sorted(got) == steps
    for step in steps:
        for key in KEYS:
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-9), (step, key)
        # float64 sums in another order; after four AdamW steps at lr 3e-3 measured 1.0e-4 relative
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=5e-4), step
        assert got[step]["global_batch"] == ref[step]["global_batch"] and got[step]["tokens"] == ref[step]["tokens"]


def assert_exact(full, resumed, steps):
    assert sorted(resumed) == steps
    for step in steps:
        for key in (*KEYS, "grad_norm", "lr", "global_batch", "tokens", "mtp_loss_weight"):
            assert resumed[step][key] == full[step][key], (step, key)


def test_one_process_follows_every_phase_and_resumes_exactly_after_a_kill(data_root, reference, tmp_path):
    ref = losses(reference)
    assert [ref[s]["global_batch"] for s in STEPS] == [4, 4, 8, 12, 12]
    assert [ref[s]["grad_accum"] for s in STEPS] == [4, 4, 8, 12, 12]
    assert [ref[s]["tokens"] for s in STEPS] == [256, 512, 1024, 1792, 2560]
    assert [ref[s]["mtp_loss_weight"] for s in STEPS] == [0.3, 0.3, 0.3, 0.1, 0.1]
    assert [ref[s]["bias_update_speed"] for s in STEPS] == [0.001] * 4 + [0.0]
    assert [ref[s]["lr"] for s in STEPS[:4]] == [1.5e-3, 3e-3, 3e-3, 3e-3] and ref[5]["lr"] < 3e-3
    assert ref[4]["phase"] == "lr 2/2 batch 3/3 gamma 1/2 lambda 2/2"
    # the MTP weight is applied: loss = lm + lambda * mtp + balance
    for s in (3, 4):
        r = ref[s]
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["mtp_loss_weight"] * r["mtp_loss"] + r["balance_loss"],
                                          rel=1e-6)
    log = open(os.path.join(reference, "train.log")).read()
    assert "tokens 1.792K | batch 12 (12 mb) | phase lr 2/2 batch 3/3" in log

    crash = str(tmp_path / "crash")
    cmd = [sys.executable, "-m", "trainer.train", TINY, "--set", *overrides(data_root, crash, *ARGS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "MOEPIPE_KILL_AFTER_STEP": "3"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert sorted(losses(crash)) == [1, 2, 3]
    with open(os.path.join(crash, "metrics.jsonl")) as f:
        kept = f.readlines()
    one_process(overrides(data_root, crash, *ARGS))   # resumes from step 2: tokens 512, batch 4 -> 8 -> 12
    with open(os.path.join(crash, "metrics.jsonl")) as f:
        after = f.readlines()[len(kept):]
    assert len(after) == 3
    assert_exact(ref, losses(crash), STEPS)


def test_data_x_expert_parallel_ramp_equals_one_process(data_root, reference, tmp_path):
    full = str(tmp_path / "full")
    ranks(4, overrides(data_root, full, *ARGS, "parallel.ep=2", "parallel.ranks_per_node=2", "checkpoint.every=0"))
    a = losses(full)
    assert [a[s]["grad_accum"] for s in STEPS] == [1, 1, 2, 3, 3]
    assert_close(losses(reference), a, STEPS)


def test_dualpipev_ramp_equals_one_process_and_resumes(data_root, reference, tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    pp = ("parallel.pp=2", "parallel.schedule=dualpipev")
    ranks(2, overrides(data_root, full, *ARGS, *pp))
    a = losses(full)
    assert [a[s]["grad_accum"] for s in STEPS] == [4, 4, 8, 12, 12]
    assert_close(losses(reference), a, STEPS)
    copy_checkpoint(full, 2, resumed)
    ranks(2, overrides(data_root, resumed, *ARGS, *pp))
    assert_exact(a, losses(resumed), [3, 4, 5])
