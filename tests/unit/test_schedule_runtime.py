"""Runtime bookkeeping that needs no processes: the per-message shape cache refuses a changed
shape (which the receiver could not know about) unless the runtime sends headers every time."""
import pytest
import torch

from parallel.pipeline.runtime import PipelineRuntime, drain
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
