"""Step generators: work that pauses while its communication is in flight.

DeepSeek-V3 (section 3.2.1) hides each all-to-all of one micro-batch behind the computation of
another. Code that issues an exchange and then waits for it is written as a generator that
yields right after issuing it; whoever drives the generator may run something else before
resuming it, and the generator's return value is its result. The expert-parallel dispatcher's
dispatch / combine and the pipeline's forward / backward of a chunk are such generators.

This module is the one driver of that protocol: `Started` advances a generator to its first
yield (its first exchange is issued) and `wait()` runs the rest; `drain` runs one from start
to end; `call_steps` is the generator form of a plain call (it never yields); `in_context`
relays a generator, entering a context around each of its resumptions only; `work_in_flight`
relays one and runs some independent work while its first exchange travels.
"""
from __future__ import annotations

_PENDING = object()


class Started:
    """A step generator advanced to its first yield; `wait()` runs it to the end and returns its value."""

    def __init__(self, gen):
        self._gen, self._value = gen, _PENDING
        self._advance()

    def _advance(self) -> None:
        try:
            next(self._gen)
        except StopIteration as stop:
            self._value = stop.value

    def wait(self):
        while self._value is _PENDING:
            self._advance()
        return self._value


def drain(gen):
    """Run a step generator to its end and return its return value."""
    return Started(gen).wait()


def call_steps(fn, *args):
    """The generator form of `fn(*args)`: it never yields."""
    return fn(*args)
    yield  # noqa: unreachable (makes this a generator)


def in_context(gen, make_context):
    """Relay `gen`, entering `make_context()` around each of its resumptions only, so that the
    context never leaks into whatever runs while the generator is suspended."""
    value = None
    while True:
        with make_context():
            try:
                item = gen.send(value)
            except StopIteration as stop:
                return stop.value
        value = yield item


def work_in_flight(gen, work):
    """Relay `gen`, calling `work()` right after gen's first yield (its first exchange is issued,
    not yet waited for); returns (gen's value, work's value). A gen that never yields: work after it."""
    try:
        item = next(gen)
    except StopIteration as stop:
        return stop.value, work()
    done = work()
    yield item
    value = yield from gen
    return value, done
