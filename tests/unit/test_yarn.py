"""YaRN on the decoupled rope key: the frequency ramp, the table amplitude and the softmax scale
against values worked out by hand from the YaRN paper's formulas (arXiv 2309.00071, section 3),
and the config's bad-input messages."""
import pytest
import torch

from model.config import AttentionConfig
from model.layers import rope_frequencies, rope_tables, yarn_ramp
from trainer.config import ConfigError, load_config

# R = 16 rope dims (8 pairs), theta = 10^4, original context L0 = 4096: pair i has wavelength
# 2 pi 10^(i/2) and turns r_i = 4096 / (2 pi 10^(i/2)) = 651.9 / 10^(i/2) times over L0:
#   i:   0      1      2     3     4     5     6      7
#   r: 651.9  206.2  65.19  20.6  6.52  2.06  0.652  0.206
# r = beta_fast = 32 at i = 2 log10(651.9 / 32) = 2.618 -> floor 2;
# r = beta_slow = 1  at i = 2 log10(651.9)      = 5.628 -> ceil 6;
# ramp (i - 2) / (6 - 2), clamped to [0, 1].
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
RAMP = [0, 0, 0, 0.25, 0.5, 0.75, 1, 1]
# frequency multiplier (1 - ramp) + ramp / 4
MULT = [1, 1, 1, 0.8125, 0.625, 0.4375, 0.25, 0.25]


def _att(**yarn):
    return AttentionConfig(qk_nope_head_dim=32, qk_rope_head_dim=16, rope_scaling={**YARN, **yarn})


def test_ramp_and_frequencies_by_hand():
    yarn = _att().yarn
    assert yarn_ramp(16, 1e4, yarn).tolist() == RAMP
    plain = torch.tensor([10 ** (-i / 2) for i in range(8)])
    torch.testing.assert_close(rope_frequencies(16, 1e4), plain)
    torch.testing.assert_close(rope_frequencies(16, 1e4, yarn), plain * torch.tensor(MULT))


def test_longer_original_context_moves_the_ramp():
    # L0 = 409.6 divides every r_i by 10, i.e. shifts the pair index by 2: floor(0.618) = 0, ceil(3.628) = 4
    yarn = _att(original_max_position_embeddings=409.6).yarn
    assert yarn_ramp(16, 1e4, yarn).tolist() == [0, 0.25, 0.5, 0.75, 1, 1, 1, 1]


def test_softmax_scale_and_table_amplitude_by_hand():
    assert AttentionConfig(qk_nope_head_dim=32, qk_rope_head_dim=16).softmax_scale == pytest.approx(48 ** -0.5)
    # DeepSeek-V3's setting: s = 40, mscale = mscale_all_dim = 1: sqrt(t) = 0.1 ln 40 + 1 = 1.368888;
    # the tables keep amplitude 1 and the softmax scale 1/sqrt(192) = 0.0721688 becomes 0.0721688 * 1.873854
    v3 = AttentionConfig(qk_nope_head_dim=128, qk_rope_head_dim=64, rope_scaling={**YARN, "factor": 40})
    assert v3.softmax_scale == pytest.approx(0.135234, abs=1e-6)
    cos, sin = rope_tables(64, 8, 1e4, yarn=v3.yarn)
    torch.testing.assert_close(cos[:, 0] ** 2 + sin[:, 0] ** 2, torch.ones(8))
    # mscale_all_dim = 0 (the reference code's default): the whole sqrt(t) = 0.1 ln 4 + 1 = 1.138629
    # goes onto the tables (q and k each), the softmax scale stays 1/sqrt(48)
    att = _att(mscale_all_dim=0.0)
    assert att.softmax_scale == pytest.approx(48 ** -0.5)
    cos, sin = rope_tables(16, 8, 1e4, yarn=att.yarn)
    torch.testing.assert_close(cos[:, 3] ** 2 + sin[:, 3] ** 2, torch.full((8,), 1.138629 ** 2))


def test_plain_rope_unchanged():
    cos, sin = rope_tables(16, 32, 1e4)
    angles = torch.arange(32.0)[:, None] * torch.tensor([10 ** (-i / 2) for i in range(8)])
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())
    assert AttentionConfig().yarn is None


def test_bad_rope_scaling_names_field_and_fix():
    with pytest.raises(ValueError, match=r"rope_scaling.factor = 0.5: must be >= 1"):
        _att(factor=0.5)
    with pytest.raises(ValueError, match=r"unknown keys \['scale'\]"):
        _att(scale=2)
    with pytest.raises(ValueError, match=r"rope_scaling.type = 'linear': only 'yarn'"):
        _att(type="linear")
    yarn = "{type: yarn, factor: 4, original_max_position_embeddings: 512}"
    with pytest.raises(ConfigError, match=r"original_max_position_embeddings = 512: must be <= model.max_seq_len "
                                          r"\(256\); set it to the pre-extension context"):
        load_config(None, [f"attention.rope_scaling={yarn}"])
    cfg = load_config(None, ["attention.rope_scaling={type: yarn, factor: 4, original_max_position_embeddings: 64}"])
    assert cfg.attention.yarn["beta_fast"] == 32 and cfg.attention.yarn["factor"] == 4
    assert cfg.attention.softmax_scale == pytest.approx(48 ** -0.5)  # mscale_all_dim defaults to 0: the scale is unchanged
