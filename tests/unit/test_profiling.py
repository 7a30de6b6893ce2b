"""parallel.profiling without processes: the window from the config and from the PROFILE file,
named model-piece ranges in the trace, config checks, and the out-of-memory report."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from parallel.profiling import ProfileConfig, StepProfiler, is_out_of_memory, oom_report


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 2)))


def run_steps(prof, m, steps):
    for step in steps:
        prof.begin_step(step)
        m(torch.ones(3, 4)).sum().backward()
        prof.end_step(step)


def names(path):
    with open(path) as f:
        return {e.get("name", "") for e in json.load(f)["traceEvents"]}


def test_config_window_writes_a_trace_with_model_piece_ranges(tmp_path):
    m = model()
    prof = StepProfiler(ProfileConfig(steps=[2, 3]), str(tmp_path), 0, m, cuda=False)
    run_steps(prof, m, range(1, 5))
    traces = sorted(os.listdir(tmp_path / "profile"))
    assert traces == ["rank_0_steps_2-3.json"]
    got = names(tmp_path / "profile" / traces[0])
    assert {"model.0", "model.2", "model.2.0"} <= got
    assert not m[0]._forward_pre_hooks  # the hooks are gone after the window


def test_profile_file_toggles_a_window_at_the_next_step(tmp_path):
    m = model()
    prof = StepProfiler(ProfileConfig(), str(tmp_path), 1, m, cuda=False)
    run_steps(prof, m, [1, 2])
    assert not (tmp_path / "profile").exists()
    (tmp_path / "PROFILE").write_text("3\n")
    run_steps(prof, m, [3, 4, 5, 6, 7])
    assert os.listdir(tmp_path / "profile") == ["rank_1_steps_3-5.json"]
    run_steps(prof, m, [8, 9])  # the same file again: no new window
    assert len(os.listdir(tmp_path / "profile")) == 1


@pytest.mark.parametrize("steps", [[3], [0, 1], [5, 4], ["a", 2]])
def test_bad_windows_are_rejected(steps):
    with pytest.raises(ValueError, match="steps"):
        ProfileConfig(steps=steps)


def test_oom_report_names_where_and_the_memory_held(tmp_path):
    m = model()
    m(torch.ones(3, 4)).sum().backward()
    holder = type("Engine", (), {})()
    holder.state = {"exp_avg": torch.zeros(2**20), "step": [torch.zeros(2**19)]}  # 6 MiB of "optimizer state"
    err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_out_of_memory(err) and not is_out_of_memory(RuntimeError("shape mismatch"))
    path = oom_report(err, str(tmp_path), 3, "forward_backward of step 7", m, holder)
    text = open(path).read()
    assert text.startswith("rank 3: out of memory in forward_backward of step 7\nCUDA out of memory.")
    params = sum(p.numel() * 4 for p in m.parameters())
    assert f"parameters        {params / 2**20:,.1f} MiB" in text
    assert "optimizer state and other tensors of the engine  6.0 MiB" in text
