"""benchmarks/bench_recompute_pp.py at its smallest: one schedule, every recompute mode, a row per
(mode, pp rank) with a positive step peak and the ratio against none (none's own row +0%)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import bench_recompute_pp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.hidden_size=32", "model.dense_ffn_size=32", "moe.expert_ffn_size=16", "attention.num_heads=2",
         "attention.q_lora_rank=16", "attention.kv_lora_rank=16", "attention.qk_nope_head_dim=8",
         "attention.qk_rope_head_dim=8", "attention.v_head_dim=8", "model.vocab_size=64", "data.seq_len=16",
         "model.max_seq_len=16"]


def test_every_mode_has_a_row_per_pp_rank(capsys):
    assert bench_recompute_pp.main(["--schedules", "1f1b", "--micro", "2", "--set", *SMALL]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| 1f1b")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [(m, str(p)) for m in bench_recompute_pp.MODES
                                                           for p in (0, 1)]
    assert all(float(r[4].replace(",", "")) >= 0 for r in rows)
    assert [r[5].strip() for r in rows[:2]] == ["+0%", "+0%"]
