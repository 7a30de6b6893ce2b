"""Strict YAML loading: inheritance, overrides, errors that name field, value and fix."""
import glob
import os

import pytest
import yaml

from trainer.config import Config, ConfigError, config_from_dict, dump_yaml, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def write(path, data):
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_every_shipped_config_loads_and_round_trips():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert files, "configs/ is empty"
    for path in files:
        cfg = load_config(path)
        again = config_from_dict(yaml.safe_load(dump_yaml(cfg)))
        assert again == cfg, path


def test_base_inheritance_and_overrides(tmp_path):
    base = write(tmp_path / "base.yaml", {"moe": {"topk": 3, "num_experts": 12, "n_group": 4}, "optim": {"lr": 1e-3}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "optim": {"lr": 5e-4}})
    cfg = load_config(child, ["moe.topk=4", "optim.min_lr=1e-5"])
    assert cfg.moe.num_experts == 12 and cfg.moe.topk == 4
    assert cfg.optim.lr == 5e-4 and cfg.optim.min_lr == 1e-5


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = write(tmp_path / "c.yaml", "optim:\n  lr: 3e-4\n  min_lr: 1e-5\n")
    assert load_config(path).optim.lr == 3e-4


@pytest.mark.parametrize("overrides, message", [
    (["moe.topkk=3"], "unknown key 'moe.topkk'; did you mean 'moe.topk'?"),
    (["optimm.lr=1"], "unknown section 'optimm'; did you mean 'optim'?"),
    (["optim.lr=fast"], "optim.lr = 'fast': expected float"),
    (["model.num_layers=2.5"], "model.num_layers = 2.5: expected int"),
    (["moe.topk=9"], "moe.topk = 9: must be <= num_experts (8)"),
    (["moe.n_group=3"], "moe.n_group = 3: must divide num_experts (8)"),
    (["data.seq_len=512"], "data.seq_len = 512: must be <= model.max_seq_len (256)"),
    (["parallel.ep=3"], "moe.num_experts = 8: must be divisible by parallel.ep (3)"),
    (["optim.lr"], "expected section.key=value"),
    (["train.recompute=some"], "train.recompute = 'some'"),
])
def test_errors_name_field_value_and_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_base_loop_and_missing_files_are_clear(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = write(tmp_path / "bad.yaml", "model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = write(tmp_path / "scalar.yaml", "42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


def test_empty_config_is_the_default_run():
    assert load_config(None) == Config()


def test_compile_on_a_platform_without_a_compiler_is_one_line(monkeypatch):
    import shutil

    import pytest as _pytest
    import torch

    from parallel.compile import check_compile_platform
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with _pytest.raises(ValueError, match="train.compile=true on CPU needs a C\\+\\+ compiler.*train.compile=false"):
        check_compile_platform(torch.device("cpu"))


def test_errors_in_a_file_name_the_file_and_line_and_near_miss_paths(tmp_path):
    base = write(tmp_path / "base.yaml", "moe:\n  topk: 2\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ntrain:\n  seed: 1\n  steps: abc\nmoe:\n  topkk: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert f"unknown key 'moe.topkk' ({child} line 6); did you mean 'moe.topk'?" in str(err.value).replace(
        os.path.relpath(child), child)
    with pytest.raises(ConfigError) as err:
        load_config(child, ["moe.topkk=2"])  # a --set of the same key: no file line is claimed
    assert "line" not in str(err.value)
    steps = write(tmp_path / "steps.yaml", "base: base.yaml\ntrain:\n  steps: abc\n")
    with pytest.raises(ConfigError) as err:
        load_config(steps)
    assert "line 3): expected int, got str; write a whole number" in str(err.value)
    assert load_config(None, ["moe.topk=3"]).moe.topk == 3
    with pytest.raises(ConfigError, match=r"no such file; did you mean .*base\.yaml\?"):
        load_config(str(tmp_path / "base.yml"))

def test_parallel_overlap_is_auto_or_off_and_yaml_off_reads_as_off(tmp_path):
    from parallel.config import ParallelConfig
    assert ParallelConfig().overlap_on(2) and not ParallelConfig().overlap_on(1)
    assert not ParallelConfig(overlap="off").overlap_on(2)
    path = tmp_path / "c.yaml"
    path.write_text("parallel:\n  overlap: off\n")  # YAML 1.1 reads off as false
    assert load_config(str(path)).parallel.overlap == "off"
    with pytest.raises(ConfigError, match=r"parallel.overlap = 'on'.*auto .* or off"):
        load_config(None, ["parallel.overlap=on"])
