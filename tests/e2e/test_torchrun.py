"""`torchrun --nproc-per-node N -m trainer.train CONFIG` on one node, on the tiny config, and the
README's order of commands: a single-process run first, then torchrun on its output directory."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.e2e.test_slurm import REAL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWO_STEPS = [o.replace("train.steps=6", "train.steps=2") for o in REAL]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("torchrun_data"))  # never the repository's cache/


def torchrun(nproc: int, out: str, data: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "trainer.train", "configs/tiny.yaml", "--set", *TWO_STEPS, f"train.output_dir={out}",
           f"data.output_dir={data}", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun_single_node(tmp_path, nproc, data_dir):
    res = torchrun(nproc, str(tmp_path / "run"), data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / "run" / "train.log") as f:
        assert re.search(r"step +2/2 \| loss", f.read())
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_00000002")


def test_torchrun_resumes_the_checkpoint_of_one_process(tmp_path, data_dir):
    """checkpoint.resume=auto under torchrun (dp 2 x ep 2) picks up the single-process checkpoint."""
    out = str(tmp_path / "run")
    one = subprocess.run([sys.executable, "-m", "trainer.train", "configs/tiny.yaml", "--set", *TWO_STEPS,
                          f"train.output_dir={out}", f"data.output_dir={data_dir}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    res = torchrun(2, out, data_dir, "train.steps=3", "parallel.ep=2")
    assert res.returncode == 0, res.stderr[-3000:]
    with open(os.path.join(out, "train.log")) as f:
        log = f.read()
    assert "resumed from" in log and "step_00000002 at step 2" in log
    assert re.search(r"step +3/3 \| loss", log)
    assert os.path.isdir(os.path.join(out, "checkpoints", "step_00000003"))
