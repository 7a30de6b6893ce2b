"""Resuming with changed optimizer or schedule settings is accepted, with a warning that names them."""
from trainer.config import dump_yaml, load_config
from trainer.preflight import optimizer_changes


def test_changed_lr_on_resume_is_named(tmp_path):
    ckpt = tmp_path / "step_00000200"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text(dump_yaml(load_config("configs/tiny.yaml")))
    assert optimizer_changes(str(ckpt), load_config("configs/tiny.yaml")) == []
    changed = load_config("configs/tiny.yaml", ["optim.lr=1e-3", "schedule.warmup_steps=7"])
    lines = optimizer_changes(str(ckpt), changed)
    assert any(line.startswith("optim.lr = 0.001: the checkpoint's run had") for line in lines), lines
    assert any(line.startswith("schedule.warmup_steps = 7") for line in lines), lines
