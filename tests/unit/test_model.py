"""The whole model: forward/backward, expert loads, bias update, stages = full model, config errors."""
import pytest
import torch

from model.batch import make_batch
from trainer.config import ConfigError, load_config
from model.transformer import build_model


def _cfg(*sets):
    return load_config(None, ["model.vocab_size=128", "model.max_seq_len=32", "data.seq_len=32", *sets])


def _batch(B=2, L=32, vocab=128):
    g = torch.Generator().manual_seed(0)
    return make_batch(torch.randint(0, vocab, (B, L), generator=g), [[10, 12, 6], [32]][:B])


def test_forward_backward_every_parameter_gets_a_gradient():
    cfg = _cfg()
    model = build_model(cfg)
    out = model(_batch())
    assert torch.isfinite(out.loss)
    # a freshly initialised model predicts roughly uniformly
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(128.0)).item()) < 0.1
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert model.layers["1"].ffn.router.bias.requires_grad is False


def test_init_follows_config():
    cfg = _cfg("model.init_std=0.02")
    model = build_model(cfg)
    w = model.layers["1"].ffn.experts.w_gate
    assert abs(w.std().item() - 0.02) < 0.002
    assert (model.layers["0"].attn_norm.weight == 1).all()
    assert (model.layers["1"].ffn.router.bias == 0).all()
    same = build_model(cfg)
    assert torch.equal(same.head.weight, model.head.weight)
    other = build_model(_cfg("model.init_std=0.02", "train.seed=1"))
    assert not torch.equal(other.head.weight, model.head.weight)


def test_expert_counts_and_bias_update():
    cfg = _cfg("moe.bias_update_speed=0.01")
    model = build_model(cfg)
    batch = _batch()
    out = model(batch)
    n_valid = int((batch.segment_ids >= 0).sum())
    assert out.expert_counts.shape == (model.n_moe_layers, cfg.moe.num_experts)
    assert model.n_moe_layers == cfg.model.num_layers - cfg.model.first_k_dense + cfg.mtp.depth
    assert (out.expert_counts.sum(1) == n_valid * cfg.moe.topk).all()
    counts = torch.zeros_like(out.expert_counts)
    counts[:, 0] = 100.0  # expert 0 overloaded everywhere
    model.update_router_bias(counts)
    bias = model.layers["2"].ffn.router.bias
    assert bias[0].item() == pytest.approx(-0.01) and bias[1:].tolist() == pytest.approx([0.01] * 7)
    assert model.mtp[0].block.ffn.router.bias[0].item() == pytest.approx(-0.01)
    with pytest.raises(ValueError, match="counts shape"):
        model.update_router_bias(counts[:1])


def test_pipeline_stages_equal_full_model():
    cfg = _cfg()
    full = build_model(cfg)
    first = build_model(cfg, layers=[0, 1], head=False)
    last = build_model(cfg, layers=[2, 3], embed=False)
    full_params = dict(full.named_parameters())
    for stage in (first, last):
        for name, p in stage.named_parameters():
            assert torch.equal(p, full_params[name]), name
    assert set(dict(first.named_parameters())) | set(dict(last.named_parameters())) == set(full_params)
    batch = _batch()
    ref = full(batch)
    ctx0 = first.make_context(batch)
    h = first(batch, ctx=ctx0)
    ctx = last.make_context(batch)
    for i in last.owned:
        h = last.layers[str(i)](h, ctx)
    out = last.head_loss(h, batch, ctx)
    torch.testing.assert_close(out.lm_loss, ref.lm_loss)
    torch.testing.assert_close(out.mtp_loss, ref.mtp_loss)
    # loads of the two stages sum to the full model's
    assert ctx0.expert_counts[0].sum() > 0 and ctx0.expert_counts[1:].sum() == 0
    torch.testing.assert_close(ctx0.expert_counts + out.expert_counts, ref.expert_counts)


def test_stages_of_one_model_run_as_the_model_bit_for_bit():
    """model.stage() hands out its own modules under the model's names; the stages chained are
    the model's forward exactly, and a block's steps in sequence are Block.forward."""
    cfg = _cfg()
    model = build_model(cfg)
    first, last = model.stage([0, 1], embed=True, head=False), model.stage([2, 3], embed=False, head=True)
    params = dict(model.named_parameters())
    for stage in (first, last):
        for name, p in stage.named_parameters():
            assert p is params[name], name
    assert "embed.weight" in dict(last.named_parameters())  # MTP reads the embedding
    assert set(dict(first.named_parameters())) | set(dict(last.named_parameters())) == set(params)
    batch = _batch()
    ref = model(batch)
    ctx = model.make_context(batch)
    out = last(batch, h=first(batch, ctx=ctx), ctx=ctx)
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.expert_counts, ref.expert_counts)
    block, h = model.layers["1"], model.embed_tokens(batch)
    moe, ctx = block.ffn, model.make_context(batch)
    h1, x = block.attention(h, ctx)
    r = moe.route(x)
    x_SD, counts, state = moe.dispatcher.dispatch(r.x_TD, r.ids_TK, r.weights_TK)
    y_TD = moe.dispatcher.combine(moe.expert_mlp(x_SD, counts), state)
    stepped = h1 + moe.output(y_TD, moe.shared_mlp(r.x_TD), r)
    assert torch.equal(stepped, block(h, model.make_context(batch)))
    with pytest.raises(ValueError, match="holds only blocks"):
        build_model(cfg, layers=[0]).stage([1], embed=True, head=False)


def test_meta_device_build_has_no_storage():
    with torch.device("meta"):
        model = build_model(load_config(None, []))
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("sets,message", [
    (["moe.topkk=3"], "unknown key 'moe.topkk'; did you mean 'moe.topk'?"),
    (["moe.topk=9"], "moe.topk = 9: must be <= num_experts (8)"),
    (["moe.n_group=3"], "moe.n_group = 3: must divide num_experts (8)"),
    (["attention.qk_rope_head_dim=7"], "attention.qk_rope_head_dim = 7: must be a positive even number"),
    (["moe.normalize_weights=maybe"], "moe.normalize_weights = 'maybe': expected bool"),
])
def test_config_errors_through_load_config(sets, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    assert message in str(err.value)
