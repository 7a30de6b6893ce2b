"""train.recompute (none / selective / full) and train.compile, applied to a built model from outside:
same gradients as no recomputation, loads counted once, compiled equals eager over 3 steps."""
import pytest
import torch

from model.batch import make_batch
from model.experts import LocalDispatcher
from model.transformer import build_model
from parallel.compile import apply_compile
from parallel.pipeline.policies import describe_paths
from parallel.recompute import apply_recompute
from trainer.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.vocab_size=96", "model.hidden_size=32", "model.num_layers=3", "model.first_k_dense=1",
        "model.dense_ffn_size=48", "model.max_seq_len=32", "model.init_std=0.1", "attention.num_heads=2",
        "attention.q_lora_rank=16", "attention.kv_lora_rank=16", "attention.qk_nope_head_dim=8",
        "attention.qk_rope_head_dim=8", "attention.v_head_dim=8", "moe.num_experts=8", "moe.expert_ffn_size=16",
        "moe.topk=2", "moe.n_group=4", "moe.topk_group=2", "moe.seq_aux_loss_alpha=0.01", "data.seq_len=32",
        "mtp.depth=1"]


def _batch():
    g = torch.Generator().manual_seed(1)
    return make_batch(torch.randint(0, 96, (2, 32), generator=g), [[10, 22], [32]])


def _grads(model, batch):
    out = model(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_gradients_of_no_recompute(mode):
    cfg = load_config(None, TINY)
    batch = _batch()
    ref_out, ref = _grads(build_model(cfg), batch)
    model = build_model(cfg)
    wrapped = apply_recompute(model, mode)
    assert wrapped and (mode != "full" or "mtp.0.block" in wrapped)
    out, got = _grads(model, batch)
    assert torch.equal(out.loss, ref_out.loss)
    assert torch.equal(out.expert_counts, ref_out.expert_counts)   # the rerun does not count twice
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-7, msg=name)
    assert sorted(model.state_dict()) == sorted(build_model(cfg).state_dict())  # names unchanged


class _Communicating:
    """A dispatcher that is not the local one (as under expert parallelism); counts its calls."""

    def __init__(self, E):
        self.inner, self.calls = LocalDispatcher(E), 0
        self.num_experts = self.num_local_experts = E
        self.expert_offset = 0

    def dispatch(self, *args):
        self.calls += 1
        return self.inner.dispatch(*args)

    def combine(self, y, state):
        return self.inner.combine(y, state)


def test_full_recompute_never_reissues_a_dispatch():
    cfg = load_config(None, TINY)
    ref_out, ref = _grads(build_model(cfg), _batch())
    disp = _Communicating(8)
    model = build_model(cfg, dispatcher=disp)
    wrapped = apply_recompute(model, "full")
    assert "layers.1.ffn.experts" in wrapped and "layers.1" not in wrapped
    out, got = _grads(model, _batch())
    assert disp.calls == 3                  # two MoE blocks + one MTP block, forward only
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-7, msg=name)


def test_bad_recompute_value_names_the_field():
    with pytest.raises(ConfigError, match="recompute"):
        load_config(None, ["train.recompute=some"])


def _train(model, batch, steps=3):
    # SGD, not Adam: Adam's first steps move every weight by about lr x sign(grad), so a gradient
    # near zero whose sign differs by one rounding (compiled vs eager) changes a weight by 2 x lr
    # and can flip a router's top-k choice; SGD keeps rounding differences at rounding size
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        out = model(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses


def test_compiled_blocks_with_selective_recompute_equal_eager_over_three_steps():
    torch._dynamo.reset()
    cfg = load_config(None, TINY)
    batch = _batch()
    eager = _train(build_model(cfg), batch)
    model = build_model(cfg)
    apply_recompute(model, "selective")
    names = apply_compile(model, torch.device("cpu"), backend="aot_eager")
    assert names == ["layers.0", "layers.1", "layers.2", "mtp.0.block"]
    from torch._dynamo.utils import counters  # on CPU the fp32 grouped GEMMs run between graphs
    counters.clear()
    compiled = _train(model, batch)
    for a, b in zip(compiled, eager):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert counters["stats"]["unique_graphs"] > 0   # the blocks did run compiled


def test_pipeline_names_the_path_of_every_layer_type():
    cfg = load_config(None, ["train.recompute=full", "train.compile=true", "model.num_layers=3",
                             "model.first_k_dense=1", "mtp.depth=1"])
    paths = describe_paths(cfg, split_w=True)
    assert set(paths) == {"dense block", "MoE block", "MTP MoE block", "embedding, head, losses"}
    assert paths["dense block"].startswith("recompute: full (whole block); compile: compiled (whole block)")
    assert "full, per piece" in paths["MoE block"] and "compiled per piece" in paths["MoE block"]
    assert paths["MoE block"].endswith("linears eager between graphs (their dW is deferred to W)")
    assert paths["MTP MoE block"].startswith("recompute: none (MTP blocks")   # not silently "full"
    assert paths["embedding, head, losses"].endswith("compile: eager")
