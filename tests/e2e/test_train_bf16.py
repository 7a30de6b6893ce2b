"""`train.param_dtype=bf16` through `trainer.train`: a dp 2 x ep 2 run's checkpoint resumes
exactly at its layout (deferred all-gathers, checkpoints and validation included), and in one
process with fp32 parameters close to it (the checkpoint's fp32 masters become the parameters;
the runs then differ by bf16 weights against fp32 ones under the same bf16 autocast)."""
import pytest

from tests.e2e.test_train import copy_checkpoint, losses, one_process, overrides, ranks

ARGS = ["train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=5", "train.micro_batch_size=2",
        "data.seq_len=64", "model.max_seq_len=64", "train.dtype=bf16", "eval.every=2", "eval.batches=1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bf16_data"))


def test_bf16_params_resume_exactly_at_the_layout_and_into_fp32_params(data_root, tmp_path):
    full, same, fp32 = (str(tmp_path / n) for n in ("full", "same", "fp32"))
    bf16 = ["train.param_dtype=bf16", "parallel.ep=2"]
    ranks(2, overrides(data_root, full, *ARGS, *bf16))
    for out in (same, fp32):
        copy_checkpoint(full, 2, out)
    ranks(2, overrides(data_root, same, *ARGS, *bf16))
    one_process(overrides(data_root, fp32, *ARGS, "train.micro_batch_size=4"))
    a, b, c = losses(full), losses(same), losses(fp32)
    assert sorted(b) == sorted(c) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in a[step]:
                assert a[step][key] == b[step][key], (step, key)
        assert c[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-2)
