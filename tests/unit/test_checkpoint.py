"""Checkpoint files: atomic, verified on load, pruned, safe to load."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

from data.identity import sha256_file
from parallel import checkpoint as ckpt
from parallel.checkpointer import AsyncWriter


def test_write_read_round_trip_and_retention(tmp_path):
    root = str(tmp_path)
    for step in (10, 20, 30):
        ckpt.write_checkpoint(root, step, {"step": step, "w": torch.arange(4.0), "n": np.int64(3)}, "a: 1\n", 2)
    names = [os.path.basename(p) for p in ckpt.list_checkpoints(root)]
    assert names == ["step_00000020", "step_00000030"]
    state = ckpt.read_checkpoint(ckpt.latest_checkpoint(root))
    assert state["step"] == 30 and torch.equal(state["w"], torch.arange(4.0)) and state["n"] == 3


def test_partial_write_is_never_picked_up(tmp_path):
    root = str(tmp_path)
    ckpt.write_checkpoint(root, 1, {"x": 1}, "", 3)
    os.makedirs(tmp_path / "step_00000002.tmp-999")  # a save that crashed half-way
    assert ckpt.latest_checkpoint(root).endswith("step_00000001")
    ckpt.write_checkpoint(root, 3, {"x": 3}, "", 3)
    assert ckpt.latest_checkpoint(root).endswith("step_00000003")
    ckpt.remove_partial(root)  # at start-up, by the holder of the output-dir lock
    assert not any(".tmp-" in n for n in os.listdir(root))


def test_corruption_is_detected(tmp_path):
    path = ckpt.write_checkpoint(str(tmp_path), 1, {"w": torch.ones(100)}, "", 1)
    with open(os.path.join(path, "state.pt"), "r+b") as f:
        f.seek(-20, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.read_checkpoint(path)


def test_checkpoint_cannot_run_code(tmp_path):
    path = ckpt.write_checkpoint(str(tmp_path), 1, {"w": 1}, "", 1)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    state_file = os.path.join(path, "state.pt")
    with open(state_file, "wb") as f:
        pickle.dump(Evil(), f)
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(ckpt.CheckpointError, match="no manifest"):
        ckpt.read_checkpoint(path)
    ckpt.write_checkpoint(str(tmp_path / "b"), 1, {"w": 1}, "", 1)
    victim = ckpt.latest_checkpoint(str(tmp_path / "b"))
    with open(os.path.join(victim, "state.pt"), "wb") as f:
        pickle.dump(Evil(), f)
    manifest = os.path.join(victim, "manifest.json")
    import json
    meta = json.load(open(manifest))
    meta["files"]["state.pt"] = {"bytes": os.path.getsize(os.path.join(victim, "state.pt")),
                                 "sha256": sha256_file(os.path.join(victim, "state.pt"))}
    json.dump(meta, open(manifest, "w"))
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded safely"):
        ckpt.read_checkpoint(victim)


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(ckpt.read_checkpoint.__globals__["_to_plain"](state))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_async_writer_surfaces_errors(tmp_path):
    writer = AsyncWriter()
    writer.submit(str(tmp_path), 5, {"w": torch.zeros(3)}, "", 1)
    writer.wait()
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_00000005")
    (tmp_path / "file").write_text("x")
    writer.submit(str(tmp_path / "file"), 6, {}, "", 1)  # root is a file: makedirs fails
    with pytest.raises(OSError):
        writer.wait()


def test_a_corrupt_tensor_item_is_found_by_whoever_reads_it(tmp_path):
    """DCP data files are hashed per item as they are written; `read_dcp` (evaluate, generate,
    export) and `load` check each item they read against the manifest."""
    w = torch.arange(1000.0)
    path = ckpt.write_checkpoint(str(tmp_path), 1, {"step": 1}, "", 1, tensors={"model.w": w, "model.v": w + 1})
    import json
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    data = [n for n, m in manifest["files"].items() if "chunks" in m]
    assert data and all("sha256" in m for n, m in manifest["files"].items() if n not in data)
    torch.testing.assert_close(ckpt.read_dcp(os.path.join(path, "dcp"))["model.w"], w)
    with open(os.path.join(path, data[0]), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(path, data[0])) // 2)
        f.write(b"\x00\x01\x02\x03")
    ckpt.read_checkpoint(path)  # sizes and the small files are fine
    with pytest.raises(ckpt.CheckpointError, match="checksum in manifest.json"):
        ckpt.read_dcp(os.path.join(path, "dcp"))
