"""End to end on the real bundled corpus: resume equals an uninterrupted run (bit-exact in one
process; exact at the same layout and close across layouts on real gloo ranks, one process
included both ways). That the tiny model learns is checked by tests/e2e/test_golden.py."""
import json
import os
import shutil

import pytest
import torch

from tests.distributed.spawn import run_ranks
from trainer.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("e2e_data"))


def overrides(data_root, out, *extra):
    return [f"data.output_dir={data_root}", "data.bundled_mb=0.05", "data.seq_len=128", "model.max_seq_len=128",
            "train.micro_batch_size=4", "logging.tensorboard=false", "logging.plots=false", "logging.every=10",
            f"train.output_dir={out}", *extra]


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_resume_is_bit_exact_in_one_process(data_root, tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    args = ["train.steps=6", "checkpoint.every=3", "checkpoint.keep_last=5"]
    assert main([TINY, "--set", *overrides(data_root, full, *args)]) == 0
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(os.path.join(full, "checkpoints", "step_00000003"),
                    os.path.join(resumed, "checkpoints", "step_00000003"))
    assert main([TINY, "--set", *overrides(data_root, resumed, *args)]) == 0
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "maxvio"):
            assert a[step][key] == b[step][key], (step, key)


def one_process(args):
    """trainer.train in this process with one thread, as each of the ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([TINY, "--set", *args]) == 0
    finally:
        torch.set_num_threads(threads)


def copy_checkpoint(src_run, step, dst_run):
    name = os.path.join("checkpoints", f"step_{step:08d}")
    os.makedirs(os.path.join(dst_run, "checkpoints"))
    shutil.copytree(os.path.join(src_run, name), os.path.join(dst_run, name))


def _train_rank(rank, world, argv):
    from trainer.train import main
    return main(argv)


def ranks(nproc, args):
    """`trainer.train`'s main on `nproc` real gloo ranks with torchrun's environment, one thread
    each. The ranks fork from the test fork server (tests/distributed/spawn.py), which has
    imported torch and the trainer once: a launch costs about a second instead of three
    processes' start-up. torchrun itself is run by tests/e2e/test_torchrun.py, test_hang.py,
    test_crash_resume.py and the Slurm tests."""
    codes = run_ranks(_train_rank, nproc, [TINY, "--set", *args], timeout=600, group=False)
    if codes != [0] * nproc:  # the ranks' stderr is the fork server's; train.log says how far they got
        out = next(a.split("=", 1)[1] for a in args if a.startswith("train.output_dir="))
        log = os.path.join(out, "train.log")
        tail = open(log).read()[-3000:] if os.path.exists(log) else "(none)"
        raise AssertionError(f"exit codes {codes}; {log}:\n{tail}")


def test_multi_rank_resume_same_layout_exact_and_other_layout_close(data_root, tmp_path):
    """A dp 2 x ep 2 checkpoint resumes exactly at its layout and to 1e-5 at ep 1 and in one
    process (4 sequences per step there, as the 2 ranks x 2 together; at seq_len 64, where the
    mean over a step's tokens equals the mean of the ranks' means: no padding)."""
    full, same, other, one = (str(tmp_path / n) for n in ("full", "same", "other", "one"))
    args = ["train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=5", "train.micro_batch_size=2",
            "data.seq_len=64", "model.max_seq_len=64"]
    ranks(2, overrides(data_root, full, *args, "parallel.ep=2"))
    for out in (same, other, one):
        copy_checkpoint(full, 2, out)
    ranks(2, overrides(data_root, same, *args, "parallel.ep=2"))
    ranks(2, overrides(data_root, other, *args, "parallel.ep=1"))   # resharded: experts replicated
    one_process(overrides(data_root, one, *args, "train.micro_batch_size=4"))
    a, b, c, d = losses(full), losses(same), losses(other), losses(one)
    assert sorted(b) == sorted(c) == sorted(d) == [3, 4]
    for step in (3, 4):
        assert a[step]["loss"] == b[step]["loss"] and a[step]["grad_norm"] == b[step]["grad_norm"]
        for resumed in (c, d):
            assert resumed[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
            assert resumed[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4)


def test_data_and_expert_parallel_run_equals_one_process(data_root, tmp_path):
    """2 ranks x 2 sequences with ep=2 (two emulated nodes) see the same global batch as one process
    with 4 sequences: losses, grad norms (both summed in float64) and MaxVio agree to 1e-5, from
    scratch and resumed from the one process's checkpoint of step 1."""
    one, two, resumed = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "resumed")
    args = ["train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=5", "data.seq_len=64",
            "model.max_seq_len=64"]
    one_process(overrides(data_root, one, *args))
    two_ranks = ("train.micro_batch_size=2", "parallel.ep=2", "parallel.ranks_per_node=1")
    ranks(2, overrides(data_root, two, *args, *two_ranks))
    copy_checkpoint(one, 1, resumed)
    ranks(2, overrides(data_root, resumed, *args, *two_ranks))
    a, b, c = losses(one), losses(two), losses(resumed)
    assert sorted(c) == [2, 3]
    for got, steps in ((b, (1, 2, 3)), (c, (2, 3))):
        for step in steps:
            for key in ("loss", "grad_norm", "maxvio"):
                assert got[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
    assert b[1]["a2a_cross_node_MB"] > 0
