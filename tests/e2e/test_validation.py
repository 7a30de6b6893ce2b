"""Validation during training: in the log, metrics.jsonl and the plots, and equal (1e-5 relative) to
`trainer.evaluate` run in one process on the checkpoint of the same step, in one process, on
real gloo ranks with dp 2 x ep 2 and with pipeline parallelism (pp 2) under every schedule."""
import json
import os

import pytest

from tests.e2e.test_train import TINY, losses, overrides, ranks
from trainer.evaluate import evaluate
from trainer.plot import read_series
from trainer.train import main

EVAL = ["data.valid_fraction=0.1", "eval.every=2", "eval.batches=2", "train.steps=4", "checkpoint.every=2",
        "checkpoint.keep_last=5"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("e2e_val_data"))


def _check_against_standalone(out, data_root, step, val_steps=(2, 4)):
    m = losses(out)
    assert sorted(s for s in m if "val_loss" in m[s]) == list(val_steps)
    ckpt = os.path.join(out, "checkpoints", f"step_{step:08d}")
    (_, standalone), = evaluate(ckpt, batches=2, overrides=[f"data.output_dir={data_root}"])
    assert m[step]["val_tokens"] == standalone["val_tokens"] > 0  # each target token counted once
    assert m[step]["val_loss"] == pytest.approx(standalone["val_loss"], rel=1e-5)
    assert m[step]["val_mtp_loss"] == pytest.approx(standalone["val_mtp_loss"], rel=1e-5)
    assert m[step]["val_ppl"] == pytest.approx(standalone["val_ppl"], rel=1e-5)
    return m


def test_one_process_validation_equals_standalone_evaluate(data_root, tmp_path):
    out = str(tmp_path / "run")
    assert main([TINY, "--set", *overrides(data_root, out, *EVAL), "logging.plots=true"]) == 0
    m = _check_against_standalone(out, data_root, 4)
    assert m[4]["val_loss"] < m[2]["val_loss"] + 0.5 and "expert_load" in m[4]
    with open(os.path.join(out, "train.log")) as f:
        log = f.read()
    assert "| val " in log and "ETA" in log and "best validation loss" in log
    assert read_series(os.path.join(out, "plots", "loss.png"))["val_loss"]["step"] == [2, 4]


def test_dp_ep_validation_equals_one_process_on_the_same_checkpoint(data_root, tmp_path):
    out = str(tmp_path / "run")
    ranks(2, overrides(data_root, out, *EVAL, "parallel.ep=2", "train.micro_batch_size=2"))
    _check_against_standalone(out, data_root, 4)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert all(json.loads(line)["step"] for line in f)


# 4 micro-batches of 1 sequence per step (DualPipe and DualPipeV need 2 x pp); 2 steps, validated at step 2
PP = [*EVAL, "train.steps=2", "train.micro_batch_size=1", "train.grad_accum=4", "parallel.pp=2"]


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe"])
def test_pipeline_validation_equals_one_process_on_the_same_checkpoint(data_root, tmp_path, schedule):
    out = str(tmp_path / "run")
    ranks(2, overrides(data_root, out, *PP, f"parallel.schedule={schedule}"))
    with open(os.path.join(out, "train.log")) as f:
        assert "no validation" not in f.read()
    _check_against_standalone(out, data_root, 2, val_steps=[2])


def test_dualpipev_with_dp_ep_validation_equals_one_process(data_root, tmp_path):
    """pp 2 x dp 2 x ep 2 on 4 ranks: stages 0 and 3 on pp rank 0 (the V), experts sharded, the
    sums added over both pipelines."""
    out = str(tmp_path / "run")
    ranks(4, overrides(data_root, out, *PP, "parallel.schedule=dualpipev", "parallel.ep=2",
                          "parallel.ranks_per_node=2"))
    _check_against_standalone(out, data_root, 2, val_steps=[2])
