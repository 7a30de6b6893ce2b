"""Parameter counts: the 671B config on the meta device, analytic counts = built model, the CLI."""
import os

import pytest
import torch

from trainer.config import load_config
from trainer.plan.flops import attention_context, component_counts, flops_per_token, param_counts
from trainer.inspect import count_model, main
from model.transformer import build_model

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _load(name, *sets):
    return load_config(os.path.join(CONFIGS, name), list(sets))


def test_deepseek_v3_671b_counts():
    c = param_counts(_load("deepseek_v3_671b.yaml"))
    assert abs(c["main_total"] / 671e9 - 1) < 0.005
    # 37.55B counting the input embedding, 36.63B without it
    assert 36.5e9 <= c["main_activated"] <= 37.6e9
    assert 36.5e9 <= c["main_activated_no_embed"] <= 37.6e9
    assert c["main_activated"] - c["main_activated_no_embed"] == 129280 * 7168
    # the MTP module (one MoE block + projection; embedding and head shared) is counted apart
    assert 11.5e9 < c["mtp_total"] < 11.7e9


@pytest.mark.parametrize("name,sets", [
    ("deepseek_v3_671b.yaml", []), ("deepseek_v2_lite.yaml", []), ("ablation_base.yaml", []),
    ("deepseek_v3_671b.yaml", ["mtp.depth=2", "model.tie_embeddings=true"]),
])
def test_built_model_matches_analytic_counts(name, sets):
    cfg = _load(name, *sets)
    with torch.device("meta"):
        model = build_model(cfg)
    built = count_model(model, cfg)
    analytic = component_counts(cfg)
    assert built["main"] == analytic["main"]
    assert built["mtp"] == analytic["mtp"]


def test_deepseek_v2_lite_counts():
    c = param_counts(_load("deepseek_v2_lite.yaml"))
    assert abs(c["main_total"] / 15.7e9 - 1) < 0.01          # 15.7B total (paper)
    assert abs(c["main_activated_no_embed"] / 2.4e9 - 1) < 0.03  # 2.4B activated (paper)
    assert c["mtp_total"] == 0


def test_flops_per_token_formula():
    cfg = load_config(None, ["mtp.depth=0"])
    a, m = cfg.attention, cfg.model
    n = param_counts(cfg)["main_activated_no_embed"]
    L = 256
    attn = 6 * m.num_layers * a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * (L + 1) / 2
    assert flops_per_token(cfg, L) == pytest.approx(6 * n + attn)
    assert attention_context(4, [[4]]) == pytest.approx(2.5)
    assert attention_context(4, [[2, 2]]) == pytest.approx(1.5)  # documents shorten the context
    assert flops_per_token(cfg, L, doc_lens=[[128, 128]]) < flops_per_token(cfg, L)


def test_cli_prints_main_and_mtp(capsys):
    assert main([os.path.join(CONFIGS, "deepseek_v3_671b.yaml"), "--set", "mtp.depth=1"]) == 0
    out = capsys.readouterr().out
    assert "671,026,404,352 total" in out and "= mtp" in out and "moe_routed" in out
    assert main([os.path.join(CONFIGS, "deepseek_v3_671b.yaml"), "--set", "moe.topk=300"]) == 2
    assert "moe.topk = 300" in capsys.readouterr().err
