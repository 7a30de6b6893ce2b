"""A stopped rank and a dead rank on 4 real torchrun ranks (gloo, dp 4 x ep 2, the tiny model):
the job ends on its own, names the rank and the collective, leaves stack dumps of every live rank,
and a requeued run resumes exactly.

Faults are injected by the trainer's own hook (MOEPIPE_FAULT=stop|kill:RANK:STEP), which SIGSTOPs
or SIGKILLs rank 2 as it enters the forward/backward of step 3. With fault.hang_seconds = 5 the job
must end well inside the subprocess timeout; before the watchdog it waited out the 10-minute
process-group timeout (stop) or ended with no line naming the rank (kill).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.test_crash_resume import SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOUR_STEPS = [o.replace("train.steps=8", "train.steps=4") for o in SMALL] + ["parallel.ep=2", "fault.hang_seconds=5",
                                                                             "logging.every=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hang_data"))


def torchrun(out: str, data: str, fault: str = "", timeout: float = 150,
             overrides: list[str] = FOUR_STEPS) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MOEPIPE_FAULT"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **({"MOEPIPE_FAULT": fault} if fault else {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "trainer.train",
           "configs/tiny.yaml", "--set", *overrides, f"train.output_dir={out}", f"data.output_dir={data}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def hang_report(out: str) -> tuple[str, str]:
    with open(os.path.join(out, "hang", "diagnosis.txt")) as f:
        diagnosis = f.read()
    with open(os.path.join(out, "train.log")) as f:
        log = f.read()
    return diagnosis, log


def losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def assert_stacks_of_live_ranks(out: str) -> None:
    for rank in (0, 1, 3):
        with open(os.path.join(out, "hang", f"rank_{rank}.txt")) as f:
            text = f.read()
        assert f"rank {rank} of 4" in text and "trainer/loop.py" in text  # the training thread's stack
    assert not os.path.exists(os.path.join(out, "hang", "rank_2.txt"))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, data_dir):
    """A run whose rank 1 sleeps 0.5 s in every step and whose rank 2 is SIGSTOPped entering step 4:
    (output dir, torchrun result)."""
    out = str(tmp_path_factory.mktemp("hang") / "stop")
    return out, torchrun(out, data_dir, fault="slow:1:0.5,stop:2:4")  # no watchdog: 600 s, past the timeout


@pytest.mark.timeout(240)
def test_stopped_rank_is_named_and_the_job_exits(stopped):
    out, res = stopped
    assert res.returncode != 0
    diagnosis, log = hang_report(out)
    assert diagnosis.startswith("rank 2 of 4 never entered ") and "of step 4 (silent for" in diagnosis, diagnosis
    assert "stopped or dead" in diagnosis and "wait in it" in diagnosis
    assert "HANG: rank 2 of 4 never entered" in log and "exit 75 for a requeue" in log
    assert_stacks_of_live_ranks(out)
    assert sorted(losses(out)) == [1, 2, 3]


def test_slow_rank_is_named_as_the_straggler(stopped):
    out, _ = stopped
    with open(os.path.join(out, "train.log")) as f:
        assert "step 2: straggler: rank 1 of 4 is busy" in f.read()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        row = [r for r in map(json.loads, f) if r["step"] == 2][0]
    assert row["straggler_rank"] == 1 and row["straggler_ratio"] > 1.5
    assert len(row["rank_compute_s"]) == 4 and row["rank_compute_s"][1] >= 0.5
    assert min(row["rank_comm_s"][r] for r in (0, 2, 3)) > row["rank_comm_s"][1]  # the others wait for it


@pytest.mark.timeout(360)
def test_dead_rank_is_named_and_the_requeued_run_resumes_exactly(tmp_path, data_dir, stopped):
    out = str(tmp_path / "kill")
    res = torchrun(out, data_dir, fault="kill:2:3")
    assert res.returncode != 0
    diagnosis, log = hang_report(out)
    assert "rank 2 of 4 never entered " in diagnosis and "stopped or dead" in diagnosis, diagnosis
    assert "HANG: " in log
    assert_stacks_of_live_ranks(out)
    again = torchrun(out, data_dir)  # the requeue: the same command resumes from step 2
    assert again.returncode == 0, again.stderr[-3000:]
    with open(os.path.join(out, "train.log")) as f:
        assert "step_00000002 at step 2" in f.read()
    want, got = losses(stopped[0]), losses(out)  # the stopped run got through step 3 undisturbed
    assert sorted(got) == [1, 2, 3, 4]
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6)
