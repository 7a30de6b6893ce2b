"""The pipeline benchmark's ranking check (benchmarks/pipeline_gantt.py): a pair of schedules is
out of order only when the measurement and the prediction both separate it, the opposite ways,
by more than the tie margin."""
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from pipeline_gantt import TIE, out_of_order  # noqa: E402


def rows(**bubbles):
    return [SimpleNamespace(label=k, measured=m, predicted=p) for k, (m, p) in bubbles.items()]


def check(rs):
    return out_of_order(rs, lambda r: r.measured, lambda r: r.predicted)


def test_same_order_and_ties_agree():
    assert check(rows(a=(0.10, 0.12), b=(0.30, 0.31), c=(0.50, 0.45))) == []
    # measured 2.5% vs 1.9% and predicted 0.0% vs 0.0%: a tie on both sides, whatever the order
    assert check(rows(serial=(0.025, 0.0), overlap=(0.019, 0.0))) == []
    # separated when measured, a tie when predicted: agrees
    assert check(rows(a=(0.10, 0.200), b=(0.30, 0.205))) == []


def test_reversed_pair_beyond_the_margin_is_out_of_order():
    assert check(rows(a=(0.10, 0.40), b=(0.30, 0.20), c=(0.50, 0.60))) == [("a", "b")]
    # just inside the margin on the predicted side is still a tie
    assert check(rows(a=(0.10, 0.20 + TIE / 2), b=(0.30, 0.20))) == []
