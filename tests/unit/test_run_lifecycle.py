"""Runs that cannot hurt each other: output-dir lock, own partial dirs only, checkpoint lineage on a
rewind, disk full during a save, Ctrl-C, atomic pruning, a finished run started again."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket

import pytest
import torch

from tests.unit.test_error_lines import TEXTS, one_error_line, sets
from parallel import checkpoint as ckpt
from trainer import loop
from trainer import train as train_cli
from trainer.run_dir import RunDirLock

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    return root, str(path)


def steps_in(root) -> list[int]:
    return [ckpt.step_of(p) for p in ckpt.list_checkpoints(str(root))]


def save(root, step, keep_last=10):
    return ckpt.write_checkpoint(str(root), step, {"step": step}, "", keep_last)


# 1. two runs in one output dir
def test_second_run_stops_naming_the_holder(corpus, tmp_path, capsys):
    held = RunDirLock(str(tmp_path / "run"))
    held.acquire()
    try:
        rc = train_cli.main(sets(*corpus, f"train.output_dir={tmp_path / 'run'}"))
        line = one_error_line(capsys, rc)
    finally:
        held.release()
    assert f"in use by another run (host {socket.gethostname()}, pid {os.getpid()}" in line
    assert not os.path.exists(tmp_path / "run" / "train.log")  # stopped before touching the directory


def test_lock_of_a_dead_run_is_taken_over(tmp_path):
    (tmp_path / "run.lock").write_text(json.dumps({"host": "gone", "pid": 4242, "since": "then"}))
    lock = RunDirLock(str(tmp_path))
    assert lock.acquire() == {"host": "gone", "pid": 4242, "since": "then"}
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    with pytest.raises(Exception, match="in use by another run"):
        RunDirLock(str(tmp_path)).acquire()
    lock.release()


def test_a_save_removes_only_its_own_partial_directory(tmp_path):
    other = tmp_path / "step_00000002.tmp-424242"  # another run's save in progress
    os.makedirs(other)
    save(tmp_path, 1)
    assert other.is_dir()
    assert ckpt.remove_partial(str(tmp_path)) == ["step_00000002.tmp-424242"]  # what the lock holder does


# 2. rewinding to an older checkpoint starts a new branch
def test_rewind_moves_the_old_branch_aside_and_pruning_follows_the_new_one(tmp_path):
    for step in (60, 70, 80):
        save(tmp_path, step)
    aside = ckpt.start_branch(str(tmp_path), str(tmp_path / "step_00000060"))
    assert sorted(os.listdir(aside)) == ["step_00000070", "step_00000080"]  # kept, not deleted
    save(tmp_path, 65, keep_last=2)
    assert steps_in(tmp_path) == [60, 65]
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_00000065")


def test_resume_from_an_older_step_in_a_run(corpus, tmp_path):
    out = tmp_path / "run"
    assert train_cli.main(sets(*corpus, "train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=5",
                               f"train.output_dir={out}")) == 0
    assert steps_in(out / "checkpoints") == [1, 2, 3]
    assert train_cli.main(sets(*corpus, "train.steps=2", "checkpoint.every=1", "checkpoint.keep_last=5",
                               f"checkpoint.resume={out / 'checkpoints' / 'step_00000001'}",
                               f"train.output_dir={out}")) == 0
    assert steps_in(out / "checkpoints") == [1, 2]  # the new branch's step 2
    aside = [n for n in os.listdir(out / "checkpoints") if n.startswith("abandoned")]
    assert len(aside) == 1 and sorted(os.listdir(out / "checkpoints" / aside[0])) == ["step_00000002",
                                                                                     "step_00000003"]
    assert "moved to" in (out / "train.log").read_text()


# 5. disk full during a save
def test_disk_full_is_one_line_and_leaves_no_partial(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ckpt.CheckpointError) as err:
        save(tmp_path, 2)
    assert "no space left" in str(err.value) and "MiB free" in str(err.value) and "step_00000001" in str(err.value)
    assert "\n" not in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["step_00000001"]


# 6. Ctrl-C
def test_first_ctrl_c_stops_after_the_step_and_the_second_aborts():
    class Run:
        stop_requested: list = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        run = Run()
        run.stop_requested = []
        loop.install_stop_handlers(run)
        os.kill(os.getpid(), signal.SIGINT)
        assert run.stop_requested == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_ctrl_c_saves_and_exits_75(corpus, tmp_path, monkeypatch):
    real = loop.optimizer_step

    def step_then_ctrl_c(run, m, *args):
        if run.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(run, m, *args)
    monkeypatch.setattr(loop, "optimizer_step", step_then_ctrl_c)
    out = tmp_path / "run"
    assert train_cli.main(sets(*corpus, "train.steps=5", "checkpoint.every=0", f"train.output_dir={out}")) == 75
    assert steps_in(out / "checkpoints") == [2]


# 7. pruning is atomic
def test_a_directory_without_a_valid_manifest_is_never_counted_nor_picked(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    os.remove(tmp_path / "step_00000003" / "manifest.json")  # what a kill mid-rmtree used to leave
    assert steps_in(tmp_path) == [1, 2]
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_00000002")
    save(tmp_path, 4, keep_last=2)
    assert steps_in(tmp_path) == [2, 4]


def test_prune_renames_before_deleting(tmp_path, monkeypatch):
    for step in (1, 2):
        save(tmp_path, step)

    def killed(path, *a, **k):
        raise KeyboardInterrupt  # the process dies in the middle of the delete
    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(str(tmp_path), 1)
    monkeypatch.undo()
    assert "step_00000001" not in os.listdir(tmp_path) and steps_in(tmp_path) == [2]
    assert ckpt.remove_partial(str(tmp_path)) == ["step_00000001.pruned"]


# finished run started again; extended train.steps
def test_finished_run_says_complete_and_extension_warns_about_the_schedule(corpus, tmp_path):
    out = tmp_path / "run"
    args = ["checkpoint.every=0", "schedule.warmup_steps=1", f"train.output_dir={out}"]
    assert train_cli.main(sets(*corpus, "train.steps=2", *args)) == 0
    assert train_cli.main(sets(*corpus, "train.steps=2", *args)) == 0
    log = (out / "train.log").read_text()
    assert "this run is complete: step 2 of train.steps = 2" in log and "train.steps=4" in log
    assert train_cli.main(sets(*corpus, "train.steps=3", *args)) == 0
    log = (out / "train.log").read_text()
    assert "the checkpoint's run had 2" in log and "schedule.decay_steps=1" in log
