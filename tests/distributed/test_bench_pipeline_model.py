"""The pipeline benchmark's model mode (benchmarks/bench_pipeline.py --model) at its smallest:
DeepSeek-V3 stages on pp = 2 x ep = 2 gloo ranks under our DualPipeV with F&B overlap and torch's
ScheduleDualPipeV wrapping the same stage modules, with an injected all-to-all latency; both
runtimes' losses and gradients equal one whole model's, the table and the simulator section
have their rows, a schedule that cannot run the micro-batch count is an "n/a" row, and a
negative latency is one error line naming the flag."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from bench_pipeline import parse_args  # noqa: E402
from pipeline_model import ModelOpts, model_rank  # noqa: E402
from pipeline_report import check_lines, sim_sections, table_lines  # noqa: E402
from parallel.pipeline.schedules import build_schedule  # noqa: E402
from tests.distributed.spawn import run_ranks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = ("ours dualpipe", "ours dualpipev overlap", "torch ScheduleDualPipeV")
SMALL = ("model.hidden_size=32", "model.dense_ffn_size=32", "moe.expert_ffn_size=16", "attention.num_heads=2",
         "attention.q_lora_rank=16", "attention.kv_lora_rank=16", "attention.qk_nope_head_dim=8",
         "attention.qk_rope_head_dim=8", "attention.v_head_dim=8")


def test_model_mode_smallest_setting():
    # 5 micro-batches: DualPipe needs an even count (an n/a row), DualPipeV at least 4
    o = ModelOpts(micro=5, rounds=1, latencies_ms=(2.0,), layers=4, batch=1, seq=16, vocab=64, labels=LABELS,
                  overrides=SMALL)
    results = run_ranks(model_rank, 4, o, timeout=180)
    checks, ok = check_lines(results, o)
    assert ok, checks
    for r in results:
        assert set(r["checks"]) == set(LABELS[1:])
        series = r["series"][(2.0, "ours dualpipev overlap")]
        assert series.blocked[1] > 0  # the latency was injected
        # the timeline has every action of the rank's lowered list once, comm batches included
        assert [a for a, _, _ in series.timelines[1]] == list(build_schedule("dualpipev", 2, 5).lowered[r["pp_rank"]])
    rows = {line.split("ms ", 1)[1][:24].strip(): line for line in table_lines(results, o)[1:]}
    assert set(rows) == set(LABELS)
    assert "n/a: pp = 2, micro = 5: dualpipe needs an even number" in rows["ours dualpipe"]
    assert rows["torch ScheduleDualPipeV"].endswith("1.00x ScheduleDualPipeV")
    assert "x ScheduleDualPipeV" in rows["ours dualpipev overlap"]
    sim = "\n".join(sim_sections(results, o, png=None))
    assert "ours dualpipev overlap" in sim and "bubble ranking" in sim


def test_negative_latency_is_one_line_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "--latency-ms", "0", "-5"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--latency-ms = -5" in err[0], err


def test_layout_flag_takes_block_counts_per_placement(capsys):
    a = parse_args(["--model", "--layout", "1f1b=6,2", "dualpipev=1,3,3,1"])
    assert a.layout == {"1f1b": [6, 2], "dualpipev": [1, 3, 3, 1]}
    for bad, says in ((["dualpipev=4,4"], "2 stages, but the pipeline has 4"), (["zb1p=6,2"], "must be one of"),
                      (["1f1b=6,3"], "sum to 9"), (["1f1b=a"], "block counts per stage")):
        with pytest.raises(SystemExit):
            parse_args(["--model", "--layout", *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--layout {bad[0]}" in err[0] and says in err[0], err
