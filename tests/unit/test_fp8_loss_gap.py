"""The BF16-vs-FP8 loss comparison harness (benchmarks/fp8_loss_gap.py), on a few steps of a micro model."""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from fp8_loss_gap import fp8_vs_bf16_loss_gap, synthetic_batches  # noqa: E402

MICRO = ["model.hidden_size=128", "model.vocab_size=256", "model.num_layers=2", "model.dense_ffn_size=128",
         "moe.expert_ffn_size=128", "fp8.backend=emulate"]


def test_synthetic_stream_is_deterministic_and_learnable():
    a = list(synthetic_batches(97, 2, 50, 2, seed=3))
    b = list(synthetic_batches(97, 2, 50, 2, seed=3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    tok = torch.cat([t for t in synthetic_batches(97, 8, 200, 1)])
    nxt = {}
    for row in tok.tolist():
        for u, v in zip(row, row[1:]):
            nxt.setdefault(u, []).append(v)
    top = sum(max(vs.count(v) for v in set(vs)) for vs in nxt.values()) / sum(map(len, nxt.values()))
    assert 0.7 < top < 0.9                      # each token has one likely successor (p_follow = 0.8)


def test_fp8_and_bf16_runs_start_identical_and_stay_close():
    r = fp8_vs_bf16_loss_gap(overrides=MICRO, steps=3, batch=2, seq_len=32, tail=3)
    assert len(r["bf16"]) == len(r["fp8"]) == 3
    assert all(math.isfinite(x) for x in r["bf16"] + r["fp8"])
    assert abs(r["bf16"][0] - r["fp8"][0]) / r["bf16"][0] < 5e-3   # same init, same batch
    assert r["bf16"][0] != r["fp8"][0]                               # but FP8 GEMMs really ran
    assert r["rel_gap"] < 0.02
