"""`python -m trainer.plot`: every picture holds the series of metrics.jsonl it claims to draw;
the log line tells time; a sweep gets one overlay of its runs' loss curves."""
import json
import os

import pytest
import torch

from tests.unit.test_error_lines import LINE
from trainer.metrics import MetricsWriter, format_line
from trainer.plot import main, read_series


def _write_run(out, steps=12, every=5, val_every=4):
    w = MetricsWriter(str(out), every=every, tensorboard=False)
    for step in range(1, steps + 1):
        counts = torch.tensor([[10.0 + step, 30.0 - step, 20.0, 20.0], [5.0, 5.0, 50.0, 20.0]])
        m = {"loss": 9.0 - 0.3 * step, "lm_loss": 8.8 - 0.3 * step, "mtp_loss": 9.1 - 0.3 * step,
             "balance_loss": 1e-4, "lr": 1e-3 * step / steps, "grad_norm": 2.0 / step, "tokens_per_s": 100.0 * step,
             "step_time": 0.5, "tflops": 0.01, "mfu": None, "maxvio": 1.0 / step, "expert_counts": counts}
        if step % val_every == 0:
            m.update(val_loss=8.5 - 0.2 * step, val_ppl=2.0, val_mtp_loss=8.6 - 0.2 * step)
        w.write(step, steps, m)
    w.close()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_run_plots_hold_the_metrics_series(tmp_path):
    records = _write_run(tmp_path)
    assert main([str(tmp_path)]) == 0
    plots = tmp_path / "plots"
    loss = read_series(plots / "loss.png")
    assert loss["loss"]["value"] == [r["loss"] for r in records]
    assert loss["val_loss"]["step"] == [4, 8, 12]
    assert loss["val_loss"]["value"] == [r["val_loss"] for r in records if "val_loss" in r]
    assert read_series(plots / "lr.png")["lr"]["value"] == [r["lr"] for r in records]
    assert read_series(plots / "grad_norm.png")["grad_norm"]["value"] == [r["grad_norm"] for r in records]
    assert read_series(plots / "maxvio.png")["maxvio"]["value"] == [r["maxvio"] for r in records]
    heat = read_series(plots / "expert_load.png")
    assert heat["step"] == [1, 5, 10, 12]                       # the logged steps carry expert loads
    # step 5, layer 0: counts 15, 25, 20, 20 -> load / mean load
    assert heat["relative_load"][0][1] == pytest.approx([0.75, 1.25, 1.0, 1.0])
    assert heat["relative_load"][1][0] == pytest.approx([0.25, 0.25, 2.5, 1.0])


def test_per_rank_step_split_is_drawn(tmp_path):
    w = MetricsWriter(str(tmp_path), every=2, tensorboard=False)
    for step in range(1, 5):
        m = {"loss": 1.0, "lm_loss": 1.0, "mtp_loss": 1.0, "balance_loss": 0.0, "lr": 1e-3, "grad_norm": 1.0,
             "tokens_per_s": 1.0, "step_time": 0.5, "tflops": 0.0, "mfu": None, "maxvio": 0.0}
        if step % 2 == 0:
            m.update(rank_compute_s=[0.1, 0.4 * step, 0.1], rank_comm_s=[0.3, 0.0, 0.3], rank_data_s=[0.01] * 3)
        w.write(step, 4, m)
    w.close()
    assert main([str(tmp_path)]) == 0
    drawn = read_series(tmp_path / "plots" / "ranks.png")
    assert drawn["step"] == [2, 4]
    assert drawn["rank_compute_s"][1] == [0.8, 1.6] and drawn["rank_comm_s"][0] == [0.3, 0.3]


def test_log_line_has_elapsed_eta_window_throughput_and_memory(tmp_path):
    records = _write_run(tmp_path, steps=10, every=5)
    r5, r10 = records[4], records[9]
    assert r5["tokens_per_s_window"] == pytest.approx(sum(100.0 * s for s in range(2, 6)) / 4)  # steps 2..5
    assert r10["tokens_per_s_window"] == pytest.approx(sum(100.0 * s for s in range(6, 11)) / 5)
    assert r10["eta_s"] == 0 and r5["eta_s"] > 0 and r5["peak_mem_MB"] > 0
    line = format_line(5, 10, r5)
    assert f"tok/s {r5['tokens_per_s_window']:,.0f}" in line and "elapsed, ETA" in line and "MiB" in line
    assert "on 8,160 tok" in format_line(5, 10, {**r5, "val_loss": 4.6, "val_ppl": 99.5, "val_tokens": 8160})


def test_summary_names_best_validation_loss_and_paths(tmp_path):
    w = MetricsWriter(str(tmp_path), every=1, tensorboard=False)
    base = {"loss": 1.0, "lm_loss": 1.0, "mtp_loss": 0.0, "balance_loss": 0.0, "lr": 1e-3, "grad_norm": 1.0,
            "tokens_per_s": 10.0, "step_time": 1.0, "tflops": 0.0, "mfu": None, "maxvio": 0.0}
    for step, val in ((1, 5.0), (2, 4.0), (3, 4.5)):
        w.write(step, 3, {**base, "val_loss": val, "val_ppl": 1.0})
    text = w.summary(3, "ck/step_00000003", ["p/plots/loss.png"])
    assert "best validation loss 4.0000 at step 2" in text and "mean 10 tokens/s" in text
    assert "ck/step_00000003" in text and "p/plots" in text and "metrics.jsonl" in text
    early = MetricsWriter(str(tmp_path / "early"), every=1, tensorboard=False)  # stopped before the first eval
    assert "no validation loss yet (the first is due at step 50)" in early.summary(3, None, None, first_eval=50)
    assert "set data.valid_fraction > 0" in early.summary(3, None, None, first_eval=None)


def test_sweep_overlay_holds_every_runs_loss(tmp_path):
    a = _write_run(tmp_path / "runs" / "a")
    _write_run(tmp_path / "runs" / "b", steps=6)
    assert main([str(tmp_path)]) == 0
    data = read_series(tmp_path / "plots" / "loss_overlay.png")
    assert sorted(data) == [os.path.join("runs", "a"), os.path.join("runs", "b")]
    assert data[os.path.join("runs", "a")]["loss"]["value"] == [r["loss"] for r in a]
    assert len(data[os.path.join("runs", "b")]["loss"]["step"]) == 6


def test_plot_of_a_directory_without_metrics_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no metrics.jsonl" in err and LINE.match(err.strip())


def test_expert_load_panels_name_main_blocks_and_the_mtp_block(tmp_path):
    _write_run(tmp_path)  # two MoE layers of expert loads
    (tmp_path / "config.yaml").write_text("model:\n  num_layers: 2\n  first_k_dense: 1\n")
    assert main([str(tmp_path)]) == 0
    assert read_series(tmp_path / "plots" / "expert_load.png")["layers"] == ["block 1", "MTP block 1"]

def test_schedule_plot_draws_values_against_tokens_with_phase_boundaries(tmp_path):
    """Records of a token-scheduled run: every scheduled quantity against the tokens seen before
    its step, and a boundary wherever the phase changes, named by what changed."""
    w = MetricsWriter(str(tmp_path), every=1, tensorboard=False)
    phases = ["warmup lr 1/2 batch 1/2", "lr 1/2 batch 1/2", "lr 1/2 batch 2/2", "lr 2/2 batch 2/2"]
    tokens, batch = 0, [2, 2, 4, 4]
    for step in range(1, 5):
        tokens += batch[step - 1] * 64
        w.write(step, 4, {"loss": 5.0, "lm_loss": 5.0, "mtp_loss": 5.0, "balance_loss": 0.0, "lr": 1e-3 / step,
                          "grad_norm": 1.0, "tokens_per_s": 1.0, "step_time": 1.0, "tflops": 0.0, "mfu": None,
                          "maxvio": 0.0, "tokens": tokens, "global_batch": batch[step - 1], "grad_accum": 1,
                          "phase": phases[step - 1], "bias_update_speed": 0.001, "mtp_loss_weight": 0.3,
                          "seq_aux_loss_alpha": 1e-4, "tokens_total": 768})
    w.close()
    assert main([str(tmp_path)]) == 0
    data = read_series(tmp_path / "plots" / "schedule.png")
    assert data["tokens"] == [0.0, 128.0, 256.0, 512.0]
    assert data["global_batch"] == batch and data["lr"] == [1e-3 / s for s in range(1, 5)]
    assert data["boundaries"] == [[128.0, "warmup ends"], [256.0, "batch 2/2"], [512.0, "lr 2/2"]]
    with open(tmp_path / "metrics.jsonl") as f:
        third = json.loads(f.readlines()[2])
    assert "| tokens 512 | batch 4 (1 mb) | phase lr 1/2 batch 2/2 |" in format_line(3, 4, third)


def test_eta_counts_tokens_left_when_the_run_ends_at_train_tokens():
    from trainer.metrics import eta_seconds
    # 10 s for 1,000 tokens; 3,000 tokens left -> 30 s, whatever the steps (a ramp makes them bigger)
    assert eta_seconds(10.0, 5, 1000.0, 5, 7, {"tokens": 1000, "tokens_total": 4000}) == pytest.approx(30.0)
    assert eta_seconds(10.0, 5, 1000.0, 5, 7, {}) == pytest.approx(4.0)   # by steps: 2 s x 2 steps
    assert eta_seconds(10.0, 5, 1000.0, 7, 7, {"tokens": 4000, "tokens_total": 4000}) == 0.0
