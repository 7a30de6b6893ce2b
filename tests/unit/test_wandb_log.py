"""`logging.wandb`: off by default, one warning line without the package, and with it the same
scalars as TensorBoard plus the resolved config (checked against a stand-in `wandb` module)."""
from __future__ import annotations

import logging
import sys
import types

import pytest

from trainer.config import ConfigError, load_config, to_dict
from trainer.metrics import MetricsWriter

ROW = {"loss": 2.0, "lm_loss": 1.9, "mtp_loss": 2.1, "balance_loss": 0.0, "lr": 1e-3, "grad_norm": 1.0,
       "tokens_per_s": 10.0, "step_time": 0.1, "tflops": 0.0, "mfu": None, "maxvio": 0.0, "skipped": False,
       "rank_compute_s": [0.1, 0.2]}


class FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def test_scalars_and_config_go_to_wandb(tmp_path, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: runs.append(FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config(None, ["logging.wandb={project: moe, name: r1, offline: true}", "logging.tensorboard=false"])
    w = MetricsWriter(str(tmp_path), 1, False, wandb=cfg.logging.wandb, config=to_dict(cfg))
    w.write(1, 2, dict(ROW))
    w.close()
    run = runs[0]
    assert run.init["project"] == "moe" and run.init["name"] == "r1" and run.init["mode"] == "offline"
    assert run.init["config"]["logging"]["wandb"]["project"] == "moe" and run.init["dir"] == str(tmp_path)
    step, data = run.logged[0]
    assert step == 1 and data["loss"] == 2.0 and "elapsed_s" in data
    assert "skipped" not in data and "rank_compute_s" not in data and run.finished


def test_missing_package_is_one_line_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    logger = logging.getLogger("moepipe")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.WARNING, logger="moepipe"):
        w = MetricsWriter(str(tmp_path), 1, False, wandb={"project": "moe"})
        w.write(1, 1, dict(ROW))
        w.close()
    lines = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert len(lines) == 1 and "not installed (pip install wandb)" in lines[0]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize("value, match", [("{project: a, colour: red}", "unknown key 'colour'"),
                                          ("{offline: true}", "needs a project")])
def test_bad_settings_are_config_errors(value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"logging.wandb={value}"])
