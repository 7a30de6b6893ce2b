"""Router: group-limited top-K vs a brute-force reference, gate weights, bias, balance loss."""
import itertools

import pytest
import torch

from model.router import (affinities, expert_counts, gate_weights, group_limited_topk,
                                  seq_balance_loss, update_bias)


def brute_force(scores, bias, topk, n_group, topk_group, group_score="top2_sum"):
    """Per token: score every group (its best biased affinity, or the sum of its best two), try every
    allowed set of groups, keep the best by total group score, then top-K inside it."""
    T, E = scores.shape
    per = E // n_group
    ids = []
    for t in range(T):
        b = [float(scores[t, e] + bias[e]) for e in range(E)]
        best_first = [sorted(b[g * per:(g + 1) * per], reverse=True) for g in range(n_group)]
        gscore = [g[0] if group_score == "max" else sum(g[:2]) for g in best_first]
        best = max(itertools.combinations(range(n_group), topk_group), key=lambda gs: sum(gscore[g] for g in gs))
        eligible = [e for e in range(E) if e // per in best]
        ids.append(sorted(sorted(eligible, key=lambda e: -b[e])[:topk]))
    return ids


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
@pytest.mark.parametrize("E,topk,n_group,topk_group", [(16, 4, 4, 2), (32, 8, 8, 4), (8, 2, 1, 1), (12, 2, 6, 1), (12, 3, 6, 2)])
def test_group_limited_topk_matches_brute_force(E, topk, n_group, topk_group, group_score):
    g = torch.Generator().manual_seed(E + topk)
    scores = torch.rand(64, E, generator=g)
    bias = torch.randn(E, generator=g) * 0.1
    ids = group_limited_topk(scores, bias, topk, n_group, topk_group, group_score)
    assert ids.shape == (64, topk)
    got = [sorted(row) for row in ids.tolist()]
    assert got == brute_force(scores, bias, topk, n_group, topk_group, group_score)
    groups_used = {len({e // (E // n_group) for e in row}) for row in got}
    assert max(groups_used) <= topk_group


def _v2_236b_like(group_score):
    # DeepSeek-V2 (arXiv 2405.04434, section 3.1.2): softmax gate, 160 routed experts on 8 devices,
    # top-6, at most 3 devices per token; no balancing bias
    from model.config import MoEConfig
    return MoEConfig(num_experts=160, topk=6, n_group=8, topk_group=3, score_func="softmax",
                     normalize_weights=False, bias_update_speed=0.0, group_score=group_score)


def test_softmax_router_scores_groups_by_their_best_expert():
    from model.provider import LayerProvider
    from model.router import Router
    torch.manual_seed(0)
    routers = {how: Router(LayerProvider(), 32, _v2_236b_like(how), layer=1) for how in ("auto", "max", "top2_sum")}
    for r in routers.values():
        r.load_state_dict(routers["auto"].state_dict())
    x = torch.randn(40, 32) * 3
    ids = {how: sorted(map(sorted, r(x)[0].tolist())) for how, r in routers.items()}
    scores = affinities(routers["auto"].gate(x), "softmax").detach()
    assert ids["auto"] == ids["max"] == sorted(brute_force(scores, torch.zeros(160), 6, 8, 3, "max"))
    assert ids["top2_sum"] != ids["max"]  # the choice matters for this shape


def test_group_scores_differ_for_a_sizable_share_of_tokens():
    g = torch.Generator().manual_seed(3)
    scores = (torch.randn(2000, 160, generator=g) * 2).softmax(-1)
    a = group_limited_topk(scores, torch.zeros(160), 6, 8, 3, "max").sort(-1).values
    b = group_limited_topk(scores, torch.zeros(160), 6, 8, 3, "top2_sum").sort(-1).values
    differ = (a != b).any(-1).float().mean().item()
    assert 0.05 < differ < 0.95


def test_group_score_config():
    from model.config import MoEConfig
    assert MoEConfig().group_scoring == "top2_sum"                       # sigmoid: DeepSeek-V3
    assert MoEConfig(score_func="softmax").group_scoring == "max"        # softmax: DeepSeek-V2
    assert MoEConfig(score_func="softmax", group_score="top2_sum").group_scoring == "top2_sum"
    with pytest.raises(ValueError, match=r"group_score = 'mean'.*'auto', 'max' or 'top2_sum'"):
        MoEConfig(group_score="mean")


def test_gate_weights_normalised_scaled_and_unbiased():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(10, 8, generator=g)
    bias = torch.zeros(8)
    bias[3] = 10.0  # forces expert 3 into every selection
    ids = group_limited_topk(scores, bias, 2, 1, 1)
    assert (ids == 3).any(dim=1).all()
    w = gate_weights(scores, ids, normalize=True, scaling=2.5)
    chosen = scores.gather(1, ids)
    torch.testing.assert_close(w, 2.5 * chosen / chosen.sum(1, keepdim=True))
    torch.testing.assert_close(w.sum(1), torch.full((10,), 2.5))
    raw = gate_weights(scores, ids, normalize=False, scaling=1.0)
    torch.testing.assert_close(raw, chosen)


def test_bias_changes_selection_not_weights_of_same_experts():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    no_bias = group_limited_topk(scores, torch.zeros(4), 2, 1, 1)
    with_bias = group_limited_topk(scores, torch.tensor([0.0, -1.0, 0.0, 0.0]), 2, 1, 1)
    assert sorted(no_bias[0].tolist()) == [0, 1]
    assert sorted(with_bias[0].tolist()) == [0, 3]
    w = gate_weights(scores, with_bias, normalize=True, scaling=1.0)
    expected = {0: 0.9 / 1.1, 3: 0.2 / 1.1}
    for e, wt in zip(with_bias[0].tolist(), w[0].tolist()):
        assert wt == pytest.approx(expected[e])


def test_bias_update_direction():
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([10.0, 0.0, 5.0, 5.0]), gamma=0.01)
    assert bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])


def test_affinities():
    logits = torch.tensor([[0.0, 2.0]])
    torch.testing.assert_close(affinities(logits, "sigmoid"), logits.sigmoid())
    torch.testing.assert_close(affinities(logits, "softmax").sum(-1), torch.ones(1))
    with pytest.raises(ValueError, match="score_func"):
        affinities(logits, "relu")


def test_seq_balance_loss_hand_example():
    # one row, two tokens, two experts, top-1; both tokens pick expert 0
    s = torch.tensor([[[0.8, 0.2], [0.6, 0.4]]])
    ids = torch.tensor([[[0], [0]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    # f = [E/(K T) * 2, 0] = [2, 0]; P = [0.7, 0.3]; loss = alpha * 2 * 0.7
    assert seq_balance_loss(s, ids, valid, alpha=0.5).item() == pytest.approx(0.7)
    # a padding token does not count
    s_pad = torch.cat([s, torch.tensor([[[0.1, 0.9]]])], dim=1)
    ids_pad = torch.cat([ids, torch.tensor([[[1]]])], dim=1)
    valid_pad = torch.tensor([[True, True, False]])
    assert seq_balance_loss(s_pad, ids_pad, valid_pad, alpha=0.5).item() == pytest.approx(0.7)
    # perfectly balanced routing of uniform scores gives alpha * 1 (the minimum of sum f P)
    s_bal = torch.full((1, 2, 2), 0.5)
    ids_bal = torch.tensor([[[0], [1]]])
    assert seq_balance_loss(s_bal, ids_bal, valid, alpha=1.0).item() == pytest.approx(1.0)


def test_expert_counts_skip_padding():
    ids = torch.tensor([[0, 1], [1, 2], [3, 3]])
    counts = expert_counts(ids, 4, torch.tensor([True, True, False]))
    assert counts.tolist() == [1.0, 2.0, 1.0, 0.0]


def test_expert_counts_match_bincount_and_trace_without_graph_break():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (300, 4), generator=g)
    valid = torch.rand(300, generator=g) > 0.3
    want = torch.bincount(ids[valid].reshape(-1), minlength=16).float()
    assert torch.equal(expert_counts(ids, 16, valid), want)
    compiled = torch.compile(expert_counts, fullgraph=True, backend="eager")  # raises on a graph break
    assert torch.equal(compiled(ids, 16, valid), want)


def test_router_bias_stays_fp32_when_model_is_cast():
    from trainer.config import load_config
    from model.provider import LayerProvider
    from model.router import Router
    cfg = load_config(None, [])
    r = Router(LayerProvider(), 16, cfg.moe, layer=1).to(torch.bfloat16)
    assert r.gate.weight.dtype == torch.bfloat16 and r.bias.dtype == torch.float32
    update_bias(r.bias, torch.arange(8.0), gamma=1e-3)
    update_bias(r.bias, torch.arange(8.0), gamma=1e-3)
    assert r.bias[0].item() == pytest.approx(2e-3)
    ids, w, s = r(torch.randn(5, 16, dtype=torch.bfloat16))
    assert ids.shape == (5, cfg.moe.topk) and s.dtype == torch.float32
