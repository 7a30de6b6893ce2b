"""Stages as configs: `checkpoint.init_from` starts a run from another run's final weights.

Unit level: the real loop trains a parent on a synthetic stream; a child stage with a longer
RoPE table and YaRN starts from it with the parent's final weights, step 0 and a fresh (or the
parent's, per `checkpoint.init_optimizer`) AdamW state. End to end through the train CLI: a stage
re-packs the same corpus at its longer length, and a stage that already has checkpoints resumes.
Bad input ends in one error line naming the fields. The shipped stage configs load and inspect.
"""
from __future__ import annotations

import glob
import logging
import os

import pytest
import torch

from tests.unit.test_error_lines import corpus, one_error_line, sets  # noqa: F401 (fixture)
from tests.unit.test_nonfinite import CFG, FakeStream
from trainer import init_from, loop
from trainer import train as train_cli
from trainer.config import ConfigError, load_config
from trainer.inspect import main as inspect_main
from trainer.metrics import MetricsWriter
from trainer.train import build_run, init_distributed, pick_device

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
YARN = "attention.rope_scaling={type: yarn, factor: 4, original_max_position_embeddings: 16}"


def _build(cfg):
    device, dtype = pick_device(cfg)
    return build_run(cfg, FakeStream(), init_distributed(cfg, device), device, dtype)


def _moments(run) -> dict:
    return {k: v.clone() for k, v in run.engine.state_dict().items() if k.startswith("optim.")}


def _train(cfg):
    run = _build(cfg)
    metrics = MetricsWriter(cfg.train.output_dir, every=100, tensorboard=False)
    try:
        loop.train(run, metrics)
    finally:
        metrics.close()
    return run


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    out = tmp_path_factory.mktemp("parent")
    run = _train(load_config(None, CFG + ["train.steps=3", f"train.output_dir={out}"]))
    return str(out), {k: v.clone() for k, v in run.model.state_dict().items()}, _moments(run)


def _child(tmp_path, parent_dir, *extra):
    return load_config(None, CFG + ["model.max_seq_len=64", "data.seq_len=64", YARN, "optim.lr=1e-4", "optim.min_lr=1e-5",
                                    f"train.output_dir={tmp_path}", f"checkpoint.init_from={parent_dir}", *extra])


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_stage_starts_from_the_parents_final_weights(parent, tmp_path, with_optimizer):
    parent_dir, weights, opt_state = parent
    cfg = _child(tmp_path, parent_dir, f"checkpoint.init_optimizer={str(with_optimizer).lower()}")
    run = _build(cfg)
    assert not torch.equal(run.model.state_dict()["embed.weight"], weights["embed.weight"])
    init_from.start_stage(run, cfg, resumed=None)
    state = run.model.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)  # router biases included
    assert run.step == 0
    moments = _moments(run)
    assert moments.keys() == opt_state.keys()
    if with_optimizer:
        assert all(torch.equal(moments[k], v) for k, v in opt_state.items())
        assert int(moments["optim.step"]) == 3
    else:
        assert int(moments["optim.step"]) == 0
        assert all(not v.any() for k, v in moments.items() if k.endswith(("exp_avg", "exp_avg_sq")))
    assert run.model.rope_cos.shape[0] == 64  # the stage's longer RoPE table, not the parent's


def test_resume_wins_over_init_from(parent, tmp_path, caplog):
    cfg = _child(tmp_path, parent[0])
    run = _build(cfg)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    log = logging.getLogger("moepipe")  # an earlier run's setup_logging may have stopped its propagation
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="moepipe"):
            init_from.start_stage(run, cfg, resumed=str(tmp_path / "checkpoints" / "step_00000002"))
    finally:
        log.removeHandler(caplog.handler)
    assert "resume wins" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in run.model.state_dict().items())


def test_other_shape_names_the_fields(parent, tmp_path):
    cfg = _child(tmp_path, parent[0], "model.dense_ffn_size=48", "moe.expert_ffn_size=16")
    run = _build(cfg)
    with pytest.raises(ConfigError) as e:
        init_from.start_stage(run, cfg, resumed=None)
    assert "model.dense_ffn_size: 32 -> 48" in str(e.value) and "moe.expert_ffn_size: 8 -> 16" in str(e.value)
    assert "max_seq_len" not in str(e.value) and "rope_scaling" not in str(e.value)


def test_missing_parent(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.init_from = .*no such run"):
        init_from.parent_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        init_from.parent_checkpoint(str(tmp_path))


# --------------------------------------------------------------------------- end to end, one error line


def _log(root, out):
    with open(os.path.join(root, out, "train.log"), encoding="utf-8") as f:
        return f.read()


def test_stage_chain_through_the_cli(corpus):  # noqa: F811
    root, path = corpus
    assert train_cli.main(sets(root, path, "train.steps=2", out="s16")) == 0
    stage = ["model.max_seq_len=32", "data.seq_len=32", YARN, f"checkpoint.init_from={root / 's16'}"]
    assert train_cli.main(sets(root, path, *stage, "train.steps=1", out="s32")) == 0
    text = _log(root, "s32")
    assert "new stage from" in text and "documents are longer and split into 32-token pieces" in text
    assert os.listdir(root / "s32" / "checkpoints") == ["step_00000001"]  # its own step 1, not the parent's 3
    assert train_cli.main(sets(root, path, *stage, "train.steps=2", out="s32")) == 0
    assert "resume wins" in _log(root, "s32")
    assert os.path.isdir(root / "s32" / "checkpoints" / "step_00000002")


@pytest.mark.parametrize("extra, field", [
    (["model.dense_ffn_size=48"], "model.dense_ffn_size = 48: checkpoint.init_from"),
    (["data.seq_len=32"], "data.seq_len = 32: must be <= model.max_seq_len (16)"),
    (["model.max_seq_len=32", "attention.rope_scaling={factor: 0.5, original_max_position_embeddings: 16}"],
     "attention.rope_scaling.factor = 0.5"),
    (["attention.rope_scaling={factor: 4, original_max_position_embeddings: 64}"],
     "attention.rope_scaling.original_max_position_embeddings = 64: must be <= model.max_seq_len"),
])
def test_bad_stage_is_one_line(corpus, capsys, extra, field):  # noqa: F811
    root, path = corpus
    if not os.path.isdir(root / "s16"):
        assert train_cli.main(sets(root, path, "train.steps=2", out="s16")) == 0
        capsys.readouterr()
    rc = train_cli.main(sets(root, path, *extra, f"checkpoint.init_from={root / 's16'}", out="bad"))
    assert field in one_error_line(capsys, rc)


# --------------------------------------------------------------------------- shipped stage configs


def test_stage_configs_load_and_name_their_parent():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "longctx", "*.yaml")))
    assert len(files) == 3
    for name in ("tiny_1024", "tiny_2048"):
        cfg = load_config(os.path.join(ROOT, "configs", "longctx", f"{name}.yaml"))
        assert cfg.checkpoint.init_from and cfg.data.seq_len == cfg.model.max_seq_len
        assert cfg.attention.rope_scaling["original_max_position_embeddings"] == 256
    v3 = load_config(os.path.join(ROOT, "configs", "deepseek_v3_671b.yaml"))
    s32 = load_config(os.path.join(ROOT, "configs", "deepseek_v3_671b_32k.yaml"))
    s128 = load_config(os.path.join(ROOT, "configs", "deepseek_v3_671b_128k.yaml"))
    assert s32.checkpoint.init_from == v3.train.output_dir and s128.checkpoint.init_from == s32.train.output_dir
    for cfg, seq, batch in ((s32, 32768, 1920), (s128, 131072, 480)):
        assert cfg.data.seq_len == cfg.model.max_seq_len == seq and cfg.train.steps == 1000
        assert cfg.train.micro_batch_size * cfg.train.grad_accum == batch
        assert cfg.optim.lr == cfg.optim.min_lr == 7.3e-6
        assert cfg.attention.yarn == {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
        assert not init_from.shape_changes_between(v3, cfg)


@pytest.mark.parametrize("name, seq", [("deepseek_v3_671b_32k", 32768), ("deepseek_v3_671b_128k", 131072)])
def test_inspect_stage_configs(capsys, name, seq):
    assert inspect_main([os.path.join(ROOT, "configs", f"{name}.yaml")]) == 0
    out = capsys.readouterr().out
    assert "671,026,404,352 total" in out and f"seq_len {seq}" in out
