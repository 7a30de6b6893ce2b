"""Peak bytes a call allocates through torch's CPU allocator (every tensor and storage, whatever
creates it), from the profiler's memory events: signed allocation sizes in time order, summed;
the peak of that sum is what the call added on top of what existed before it."""
from __future__ import annotations

from torch.profiler import ProfilerActivity, profile


def peak_cpu_bytes(fn):
    """(peak bytes allocated above the start while `fn()` ran, bytes still held at its end, fn's result)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, n in events:
        now += n
        peak = max(peak, now)
    return peak, now, out
