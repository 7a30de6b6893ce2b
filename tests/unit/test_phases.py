"""Token-based phases (trainer.phases) and the per-step values built on them (trainer.schedule),
checked against DeepSeek-V3's pre-training recipe (arXiv 2412.19437, section 4.2)."""
from __future__ import annotations

import math

import pytest
import yaml

from trainer.config import ConfigError, load_config
from trainer.phases import constant_until, format_tokens, parse_phases, parse_tokens, value_at
from trainer.schedule import Layout, micro_batches, run_steps, step_values, trajectory

# the report's recipe, written as the config writes it
REPORT = yaml.safe_load("""
optim.lr:
  - {until_tokens: 10T, value: 2.2e-4}
  - {until_tokens: 14.3T, from: 2.2e-4, to: 2.2e-5, shape: cosine}
  - {until_tokens: 14.633T, value: 2.2e-5}
  - {until_tokens: 14.8T, value: 7.3e-6}
train.global_batch:
  - {until_tokens: 469B, from: 3072, to: 15360}
  - {until_tokens: 14.8T, value: 15360}
moe.bias_update_speed:
  - {until_tokens: 14.3T, value: 0.001}
  - {until_tokens: 14.8T, value: 0.0}
mtp.loss_weight:
  - {until_tokens: 10T, value: 0.3}
  - {until_tokens: 14.8T, value: 0.1}
""")
T, B = 10**12, 10**9

# (field, tokens seen, the report's value there)
TABLE = [
    ("optim.lr", 0, 2.2e-4), ("optim.lr", 10 * T - 1, 2.2e-4), ("optim.lr", 10 * T, 2.2e-4),
    ("optim.lr", 12.15e12, (2.2e-4 + 2.2e-5) / 2), ("optim.lr", 14.3e12, 2.2e-5),
    ("optim.lr", 14.633e12 - 1, 2.2e-5), ("optim.lr", 14.633e12, 7.3e-6), ("optim.lr", 14.8e12, 7.3e-6),
    ("train.global_batch", 0, 3072), ("train.global_batch", 234.5 * B, (3072 + 15360) / 2),
    ("train.global_batch", 469 * B, 15360), ("train.global_batch", 14 * T, 15360),
    ("moe.bias_update_speed", 0, 0.001), ("moe.bias_update_speed", 14.3e12 - 1, 0.001),
    ("moe.bias_update_speed", 14.3e12, 0.0), ("moe.bias_update_speed", 14.8e12, 0.0),
    ("mtp.loss_weight", 10 * T - 1, 0.3), ("mtp.loss_weight", 10 * T, 0.1), ("mtp.loss_weight", 14.8e12, 0.1),
]


@pytest.mark.parametrize("field,tokens,expected", TABLE)
def test_phases_match_the_report_at_its_boundaries(field, tokens, expected):
    assert value_at(parse_phases(REPORT[field], field), tokens) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_cosine_piece_is_monotone_and_continuous():
    lr = parse_phases(REPORT["optim.lr"], "lr")
    xs = [10 * T + k * 4.3 * T / 100 for k in range(101)]
    ys = [value_at(lr, x) for x in xs]
    assert all(a >= b for a, b in zip(ys, ys[1:]))
    assert ys[0] == pytest.approx(2.2e-4) and ys[-1] == pytest.approx(2.2e-5)


def test_token_counts_take_suffixes():
    assert parse_tokens("469B", "x") == 469 * B
    assert parse_tokens("14.633T", "x") == 14_633 * B
    assert parse_tokens("4K", "x") == 4000 and parse_tokens(1000, "x") == 1000 and parse_tokens("2e6", "x") == 2 * 10**6
    assert format_tokens(469 * B) == "469B" and format_tokens(14.8e12) == "14.8T"
    for bad in ("12Q", "", "-3B", True, [1], "nan"):
        with pytest.raises(ValueError, match="x = "):
            parse_tokens(bad, "x")


def test_constant_until_joins_equal_pieces():
    gamma = parse_phases(REPORT["moe.bias_update_speed"], "g")
    assert constant_until(gamma, 0) == 14.3e12
    assert constant_until(gamma, 14.5e12) == math.inf
    batch = parse_phases(REPORT["train.global_batch"], "b")
    assert constant_until(batch, 100 * B) == 100 * B and constant_until(batch, 469 * B) == math.inf


@pytest.mark.parametrize("raw,message", [
    ([], "expected a list"),
    ([{"until_tokens": "1T"}], "missing \\['value'\\]|missing"),
    ([{"until_tokens": "1T", "value": 1, "shape": "cosine"}], "unknown keys \\['shape'\\]"),
    ([{"until_tokens": "2T", "value": 1}, {"until_tokens": "1T", "value": 2}], r"\[1\].until_tokens = '1T': must be greater"),
    ([{"until_tokens": "1T", "from": 1, "to": 2, "shape": "step"}], "shape = 'step'"),
    ([{"until_tokens": "1T", "value": "fast"}], "value = 'fast'"),
    ([{"until_tokens": "1T", "value": -1}], "must be >= 0"),
])
def test_bad_phase_lists_name_the_piece(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_phases(raw, "f", 0.0)


def _cfg(*extra):
    return load_config(None, ["data.seq_len=4096", "model.max_seq_len=4096", "train.micro_batch_size=1",
                              "schedule.warmup_steps=2000", *extra])


def test_config_errors_name_field_value_and_fix():
    with pytest.raises(ConfigError, match=r"schedule.phases = 'optim.learning_rate': not a schedulable field; use one of optim.lr"):
        _cfg("schedule.phases={optim.learning_rate: [{until_tokens: 1T, value: 1}]}")
    with pytest.raises(ConfigError, match=r"schedule.phases\['train.global_batch'\]\[0\].from = 0.0: must be >= 1"):
        _cfg("schedule.phases={train.global_batch: [{until_tokens: 1T, from: 0, to: 8}]}")
    with pytest.raises(ConfigError, match="schedule.decay_steps = 10: the step schedule's decay does not apply"):
        _cfg("schedule.decay_steps=10", "schedule.phases={optim.lr: [{until_tokens: 1T, value: 1e-3}]}")
    with pytest.raises(ConfigError, match="train.grad_accum = 4: with train.global_batch .* leave train.grad_accum at 1"):
        _cfg("train.global_batch=64", "train.grad_accum=4")
    with pytest.raises(ConfigError, match="train.steps = 0: and train.tokens are both 0"):
        _cfg("train.steps=0")
    with pytest.raises(ConfigError, match="train.tokens = '14.8Q': not a token count"):
        _cfg("train.tokens=14.8Q")
    assert _cfg("train.tokens=14.8T").train.tokens == 14_800 * B


def test_micro_batches_respect_the_layout():
    assert micro_batches(3072, Layout(dp=128, micro_batch_size=1)) == 24
    assert micro_batches(3100, Layout(dp=128, micro_batch_size=1)) == 24    # rounded down
    assert micro_batches(15360, Layout(dp=128, micro_batch_size=2)) == 60
    assert micro_batches(3072, Layout(dp=128, micro_batch_size=1, pp=16, schedule="dualpipev")) == 32  # >= 2 pp
    assert micro_batches(3 * 40, Layout(dp=4, micro_batch_size=1, pp=2, schedule="dualpipe")) == 30
    assert micro_batches(4 * 31, Layout(dp=4, micro_batch_size=1, pp=2, schedule="dualpipe")) == 30  # even
    assert micro_batches(8, Layout(dp=16, micro_batch_size=1)) == 1


def test_step_values_follow_the_report_with_lr_warmup_in_steps():
    cfg = _cfg("train.tokens=14.8T", "train.steps=0", "schedule.phases=" + yaml.safe_dump(REPORT, default_flow_style=True))
    lay = Layout(dp=128, micro_batch_size=1)
    first = step_values(cfg, 0, 0, lay, 1)
    assert (first.grad_accum, first.global_batch) == (24, 3072)
    assert first.lr == pytest.approx(2.2e-4 / 2000) and first.phase.startswith("warmup")
    assert step_values(cfg, 1999, 10 * B, lay, 1).lr == pytest.approx(2.2e-4)
    late = step_values(cfg, 200_000, 14.7e12, lay, 1)
    assert late.global_batch == 15360 and late.lr == pytest.approx(7.3e-6)
    assert late.model == {"bias_update_speed": 0.0, "mtp_loss_weight": 0.1, "seq_aux_loss_alpha": 1e-4}
    assert late.phase == "lr 4/4 batch 2/2 gamma 2/2 lambda 2/2"


def test_run_steps_counts_what_stepping_reaches():
    cfg = load_config(None, ["train.steps=0", "train.tokens=600000", "data.seq_len=128", "model.max_seq_len=128",
                             "train.micro_batch_size=2", "schedule.phases={train.global_batch: "
                             "[{until_tokens: 200K, from: 4, to: 40}, {until_tokens: 1M, value: 40}]}"])
    lay = Layout(dp=2, micro_batch_size=2)
    n = run_steps(cfg, lay)
    tokens = [v.tokens for v in trajectory(cfg, lay, n + 1)]
    assert tokens[n - 1] < 600_000 <= tokens[n]   # the last step is the one that reaches train.tokens
    assert run_steps(load_config(None, ["train.steps=7", "train.tokens=1T"]), lay) == 7  # whichever comes first


def test_the_671b_config_states_the_reports_run():
    cfg = load_config("configs/deepseek_v3_671b.yaml")
    assert cfg.train.tokens == 14_800 * B and cfg.train.steps == 0 and cfg.schedule.warmup_steps == 2000
    for field, tokens, expected in TABLE:
        assert value_at(cfg.schedule.pieces(field), tokens) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert cfg.moe.seq_aux_loss_alpha == 1e-4 and cfg.optim.grad_clip == 1.0 and cfg.data.seq_len == 4096
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay) == (0.9, 0.95, 0.1)
    # the long-context stages that inherit it drop its phases and token budget
    s32 = load_config("configs/deepseek_v3_671b_32k.yaml")
    assert s32.schedule.phased == {} and s32.train.tokens == 0 and s32.train.steps == 1000
