"""bench_overlap's simulator prediction, without processes: per-stage costs taken from a 0 ms
timeline, each forward and backward lengthened by its exchanges x latency, an F&B pair costing
its longer half; on the pp = 1 paired schedule that is F' + (N-1) max(F&B, F', B') + B'."""
import sys

import pytest

sys.path.insert(0, "benchmarks")
import bench_overlap  # noqa: E402

from parallel.pipeline.schedules import build_schedule  # noqa: E402


def _timeline(schedule, f=1.0, b=2.0, fb=2.5):
    t, out = 0.0, []
    for a in schedule.compute[0]:
        d = {"F": f, "B": b, "FB": fb}[a.op]
        out.append((a, t, t + d))
        t += d
    return out


@pytest.mark.parametrize("latency", [0.0, 0.1, 1.0])
def test_prediction_of_the_paired_pp1_step(latency):
    o = bench_overlap.Opts(grad_accum=4)
    cfg, s = bench_overlap._cfg_for(o, "pp1", "paired")
    c = bench_overlap._exchanges_per_pass(cfg, s, 0) * latency
    assert bench_overlap._exchanges_per_pass(cfg, s, 0) == 2 * (3 + 1)  # 3 MoE blocks + the MTP block
    f, b = 1.0 + c, 2.0 + c
    want = f + 3 * max(2.5, f, b) + b
    assert bench_overlap.predict(cfg, s, [_timeline(s)], [0], latency) == pytest.approx(want)
