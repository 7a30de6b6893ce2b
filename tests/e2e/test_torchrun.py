"""`torchrun --nproc-per-node N -m trainer.train CONFIG` on one node, on the tiny config."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.e2e.test_slurm import REAL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("torchrun_data"))  # never the repository's cache/


def torchrun(nproc: int, out: str, data: str) -> subprocess.CompletedProcess:
    overrides = [o.replace("train.steps=6", "train.steps=2") for o in REAL] + [f"train.output_dir={out}",
                                                                                f"data.output_dir={data}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "trainer.train", "configs/tiny.yaml", "--set", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun_single_node(tmp_path, nproc, data_dir):
    res = torchrun(nproc, str(tmp_path / "run"), data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / "run" / "train.log") as f:
        assert re.search(r"step +2/2 \| loss", f.read())
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_00000002")
