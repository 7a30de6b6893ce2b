"""Profiler traces and the out-of-memory report on 4 real torchrun ranks at pp = 2 x ep = 2.

One run of the tiny model with `profile.steps=[1,2]`: every rank writes a Chrome trace of steps
1-2 that is valid JSON and holds ranges named after pipeline actions (`pipeline F0.0`) and model
pieces (`model.layers...`). Then rank 0 is made to run out of memory in step 3 (MOEPIPE_FAULT):
it writes its memory breakdown to output_dir/hang/oom_rank_0.txt, and the others, whose
collectives fail with it, name rank 0 in the hang diagnosis.
"""
from __future__ import annotations

import json
import os

import pytest

from tests.e2e.test_hang import FOUR_STEPS, ROOT, torchrun  # noqa: F401  (ROOT: the cwd of runs)

PIPE = [o for o in FOUR_STEPS if o != "parallel.ep=2"] + [
    "parallel.pp=2", "parallel.ep=2", "train.grad_accum=2", "profile.steps=[1,2]"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("profile_data"))


@pytest.mark.timeout(240)
def test_profile_trace_has_pipeline_actions_and_oom_writes_a_memory_report(tmp_path, data_dir):
    out = str(tmp_path / "run")
    res = torchrun(out, data_dir, fault="oom:0:3", overrides=PIPE)
    assert res.returncode != 0
    for rank in range(4):
        with open(os.path.join(out, "profile", f"rank_{rank}_steps_1-2.json")) as f:
            trace = json.load(f)
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert any(n.startswith("pipeline F") for n in names), sorted(names)[:50]
        assert any(n.startswith("pipeline B") or n.startswith("pipeline FB") for n in names)
        assert any(n.startswith("model.layers.") for n in names)
    with open(os.path.join(out, "hang", "oom_rank_0.txt")) as f:
        report = f.read()
    assert report.startswith("rank 0: out of memory in forward_backward of step 3")
    assert "parameters" in report and "optimizer state" in report and "peak RSS" in report
    with open(os.path.join(out, "train.log")) as f:
        assert "rank 0 ran out of memory in forward_backward of step 3; memory breakdown in" in f.read()
