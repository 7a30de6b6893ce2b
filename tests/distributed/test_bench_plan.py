"""benchmarks/bench_plan.py keeps working: its whole path on one small layout.

Two gloo ranks, pp 2 x dp 1, 1F1B, a tiny model at sequence 16: every rank built by the trainer,
measured (parameters, gradients, ZeRO-1 buckets, saved activations, step time) and set beside
the planner's predictions. The static bytes must be exact and the activations within 20%, as in
the full benchmark; the step time only has to be a number.
"""
import sys

sys.path.insert(0, "benchmarks")
import bench_plan  # noqa: E402

SMALL = ["model.vocab_size=512", "data.seq_len=16", "model.max_seq_len=16", "train.micro_batch_size=1"]


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip("|").split("|")]


def test_one_layout_end_to_end():
    path, overrides = bench_plan.CONFIGS["tiny"]
    rows, consts = bench_plan.bench("tiny", path, overrides + SMALL, [(2, 1, "1f1b", 2)], steps=1, world=2,
                                    link_gbps=1.0)
    names = cells(bench_plan.HEAD)
    assert len(rows) == 2 and consts["flops"][0] > 0
    for row in rows:
        got = dict(zip(names, cells(row)))
        assert got["static"] == "exact", row
        assert abs(float(got["err"].rstrip("%"))) <= 20.0, row
        assert float(got["act peak meas KiB"].replace(",", "")) > 0
    first = dict(zip(names, cells(rows[0])))
    assert float(first["step s meas"]) > 0 and float(first["pred"]) > 0
