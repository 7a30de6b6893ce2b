"""Runtime bookkeeping that needs no processes: the per-message shape cache refuses a changed
shape (which the receiver could not know about) unless the runtime sends headers every time;
the action timeline is recorded only when asked."""
import pytest
import torch

from torch import nn

from parallel.pipeline.runtime import ModuleChunk, PipelineRuntime, drain
from parallel.pipeline.schedules import build_schedule


def _rt(**kw):
    return PipelineRuntime(build_schedule("1f1b", 2, 2), 0, [lambda m, x: None], **kw)


def test_cached_shape_sends_no_header_and_a_changed_shape_raises():
    rt, key, ops = _rt(), (1, "act", 0, 0), []
    rt._sent_meta[key] = ((2, 3), torch.float32)
    rt._send_header(torch.zeros(2, 3), key, 1, ops)
    assert ops == []  # known shape: the bare tensor goes alone
    with pytest.raises(ValueError, match="dynamic_shapes=True"):
        rt._send_header(torch.zeros(4, 3), key, 1, ops)
    with pytest.raises(ValueError, match="dynamic_shapes=True"):
        rt._send_header(torch.zeros(2, 3, dtype=torch.float64), key, 1, ops)


def test_drain_returns_the_generator_value():
    def gen():
        yield 1
        yield 2
        return "done"
    assert drain(gen()) == "done"


def test_timeline_records_every_action_in_order_only_when_asked():
    s = build_schedule("1f1b", 1, 3)
    inputs = [torch.randn(2, 4) for _ in range(3)]
    chunk = ModuleChunk(nn.Linear(4, 4), inputs, loss_fn=lambda m, y: y.square().mean())
    rt = PipelineRuntime(s, 0, [chunk], record_timeline=True)
    rt.run()
    assert [a for a, _, _ in rt.timeline] == list(s.lowered[0])
    assert all(t0 <= t1 for _, t0, t1 in rt.timeline)
    assert all(a[2] <= b[1] for a, b in zip(rt.timeline, rt.timeline[1:]))
    quiet = PipelineRuntime(s, 0, [chunk])
    quiet.run()
    assert quiet.timeline == []
