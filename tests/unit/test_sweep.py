"""trainer.sweep: expansion, naming, validation, skip-finished, and the results tables/plot."""
from __future__ import annotations

import csv
import json
import os

import pytest

from trainer import sweep as sw
from trainer.metrics import read_metrics
from trainer.sweep_report import collect_and_report, summarize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def write_sweep(tmp_path, body: str, name="s.yaml") -> str:
    path = tmp_path / name
    path.write_text(f"base: {TINY}\noutput_dir: {tmp_path}/out\n" + body)
    return str(path)


def test_grid_times_variants_times_seeds_in_stable_order(tmp_path):
    s = sw.load_sweep(write_sweep(tmp_path, "set: {train.steps: 5}\n"
                                  "runs:\n  free: {moe.bias_update_speed: 0.001}\n  aux: {moe.bias_update_speed: 0.0}\n"
                                  "grid:\n  moe.topk_group: [1, 2]\n  mtp.depth: [0, 1]\nseeds: [0, 7]\n"))
    runs = sw.expand(s)
    assert len(runs) == 2 * 2 * 2 * 2
    assert [r.index for r in runs] == list(range(16))
    assert runs[0].name == "free__topk_group=1__depth=0__seed0"
    assert runs[1].name == "free__topk_group=1__depth=0__seed7"
    assert runs[-1].name == "aux__topk_group=2__depth=1__seed7"
    last = runs[-1].overrides
    assert last == {"train.steps": 5, "moe.bias_update_speed": 0.0, "moe.topk_group": 2, "mtp.depth": 1,
                    "train.seed": 7}
    assert runs[-1].output_dir == os.path.join(f"{tmp_path}/out", runs[-1].name)
    assert runs[-1].set_args()[-1] == f"train.output_dir={runs[-1].output_dir}"
    assert s.swept_keys == ["moe.bias_update_speed", "moe.topk_group", "mtp.depth"]


def test_names_use_full_key_when_last_parts_collide_and_values_are_slugged(tmp_path):
    s = sw.load_sweep(write_sweep(tmp_path, "grid:\n  data.seed: [1]\n  train.seed: [2]\n"
                                  "  fp8.recipe: [blockwise]\n  optim.lr: [0.0003]\n"))
    (run,) = sw.expand(s)
    assert run.name == "data.seed=1__train.seed=2__recipe=blockwise__lr=0.0003"
    assert run.set_args()[:4] == ["data.seed=1", "train.seed=2", "fp8.recipe=blockwise", "optim.lr=0.0003"]


def test_values_round_trip_through_the_config_loader(tmp_path):
    s = sw.load_sweep(write_sweep(tmp_path, "grid:\n  fp8.keep_high_precision: [[embedding, attention_core, norm, router]]\n"
                                  "  fp8.enabled: [true]\n  optim.lr: [1.0e-3]\n"))
    (cfg,) = sw.validate(s, sw.expand(s))
    assert cfg.fp8.keep_high_precision == ["embedding", "attention_core", "norm", "router"] and cfg.fp8.enabled is True
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.train.output_dir.endswith(sw.expand(s)[0].name)


@pytest.mark.parametrize("body, needle", [
    ("grdi: {}\n", "unknown key(s) ['grdi']"),
    ("grid:\n  topk: [1]\n", "must be a dotted 'section.key'"),
    ("grid:\n  moe.topk: 2\n", "grid.moe.topk = 2: must be a non-empty list"),
    ("seeds: 3\n", "seeds = 3"),
    ("runs:\n  a b: {}\n", "name 'a b'"),
    ("runs:\n  x: {moe.topk: 1}\n  y: {moe.topk: 1}\ngrid: {moe.n_group: [4]}\n", None),
])
def test_bad_sweep_files_name_the_problem(tmp_path, body, needle):
    path = write_sweep(tmp_path, body)
    if needle is None:  # distinct variant names with equal overrides are fine
        assert len(sw.expand(sw.load_sweep(path))) == 2
        return
    with pytest.raises(sw.SweepError, match=None) as e:
        sw.expand(sw.load_sweep(path))
    assert needle in str(e.value)


def test_config_typo_in_a_run_fails_before_anything_runs(tmp_path, capsys):
    path = write_sweep(tmp_path, "runs:\n  ok: {}\n  bad: {moe.topkk: 2}\n")
    assert sw.main([path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "run 'bad'" in err and "moe.topk" in err


def fake_run(output_dir: str, steps: int, loss0: float = 5.0, torn: bool = False) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.jsonl"), "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": loss0 / s, "lm_loss": loss0 / s - 0.1, "maxvio": 0.5}) + "\n")
        if torn:
            f.write('{"step": ')


def test_skip_finished_and_dry_run_listing(tmp_path, capsys):
    path = write_sweep(tmp_path, "set: {train.steps: 4}\nruns:\n  a: {}\n  b: {}\n  c: {}\n")
    s = sw.load_sweep(path)
    runs = sw.expand(s)
    fake_run(runs[0].output_dir, 4, torn=True)
    fake_run(runs[1].output_dir, 2)
    assert sw.is_finished(runs[0], 4) and not sw.is_finished(runs[1], 4) and not sw.is_finished(runs[2], 4)
    assert sw.main([path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[0] a (finished)" in out and "[1] b (at step 2)" in out and "[2] c (at step 0)" in out
    assert "\n    python -m trainer.train " in out  # each run's line pastes into a shell as it is
    assert sw.main([path, "--slurm", "--dry-run"]) == 0
    assert "--array=1,2 " in capsys.readouterr().out  # only the unfinished runs are submitted
    # a run in tokens (train.steps 0) is finished when its records reach train.tokens
    with open(os.path.join(runs[1].output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 3, "tokens": 5000}) + "\n")
    assert sw.is_finished(runs[1], 0, 5000) and not sw.is_finished(runs[1], 0, 5001)


def test_local_run_skips_finished_runs(tmp_path, monkeypatch, capsys):
    path = write_sweep(tmp_path, "set: {train.steps: 3}\nruns:\n  a: {}\n  b: {}\n")
    s = sw.load_sweep(path)
    runs = sw.expand(s)
    fake_run(runs[0].output_dir, 3)
    calls = []

    def fake_call(cmd, stdout, stderr):
        calls.append(cmd)
        out_dir = cmd[-1].split("=", 1)[1]
        fake_run(out_dir, 3, loss0=7.0)
        return 0

    monkeypatch.setattr(sw.subprocess, "call", fake_call)
    assert sw.main([path]) == 0
    assert len(calls) == 1 and calls[0][-1] == f"train.output_dir={runs[1].output_dir}"
    assert calls[0][1:4] == ["-m", "trainer.train", TINY]
    assert "[0] a: finished, skipped" in capsys.readouterr().out


def test_results_tables_and_plot_from_fake_runs(tmp_path):
    path = write_sweep(tmp_path, "set: {train.steps: 10}\nsummary_window: 2\nplot_x: moe.seq_aux_loss_alpha\n"
                       "grid:\n  moe.seq_aux_loss_alpha: [0.001, 0.01, 0.1]\nseeds: [0]\n")
    s = sw.load_sweep(path)
    runs = sw.expand(s)
    fake_run(runs[0].output_dir, 10, loss0=10.0)
    fake_run(runs[1].output_dir, 4)
    rows = collect_and_report(s, runs, sw.validate(s, runs))
    assert [r["status"] for r in rows] == ["done", "partial", "missing"]
    assert rows[0]["loss"] == pytest.approx((10 / 9 + 10 / 10) / 2)  # mean of the last 2 steps
    assert rows[2]["loss"] is None and rows[0]["moe.seq_aux_loss_alpha"] == 0.001 and rows[0]["seed"] == 0
    with open(tmp_path / "out" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert table[1]["steps"] == "4" and table[2]["loss"] == ""
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| run | moe.seq_aux_loss_alpha | seed | status | steps | loss | lm_loss | maxvio |" in md
    assert (tmp_path / "out" / "results.png").stat().st_size > 5000


def test_resumed_runs_are_deduplicated_by_step(tmp_path):
    fake_run(str(tmp_path), 5)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # resumed from step 3: steps 4, 5 written again
        for s in (4, 5):
            f.write(json.dumps({"step": s, "loss": 100.0 + s}) + "\n")
    recs = read_metrics(str(tmp_path))
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert summarize(recs, ["loss", "nope"], 2) == {"loss": 104.5, "nope": None}


def test_shipped_sweeps_expand_and_validate():
    folder = os.path.join(REPO, "configs", "sweeps")
    files = [f for f in os.listdir(folder) if f.endswith(".yaml")]
    assert "balance_ablation.yaml" in files
    for name in files:
        s = sw.load_sweep(os.path.join(folder, name))
        configs = sw.validate(s, sw.expand(s))
        assert configs
    s = sw.load_sweep(os.path.join(folder, "balance_ablation.yaml"))
    alphas = {r.overrides["moe.seq_aux_loss_alpha"] for r in sw.expand(s)}
    gammas = {r.overrides["moe.bias_update_speed"] for r in sw.expand(s)}
    assert 0.0 in alphas and len(alphas) >= 2 and {0.0, 0.001} <= gammas  # off and DeepSeek-V3's gamma
