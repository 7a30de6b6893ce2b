"""The benchmark's torchtitan peer computes moepipe's math: with weights copied by name, the first
loss is equal (1e-5 relative, fp32) and so is every weight's gradient, at a micro size.
Skipped when torchtitan (the `bench` extra) is not importable."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torchtitan_peer as peer  # noqa: E402
from model.batch import make_batch  # noqa: E402
from model.transformer import build_model  # noqa: E402
from trainer.config import load_config  # noqa: E402

REASON = peer.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"{REASON}; install the bench extra")


def micro_config(*extra):
    return load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                       ["mtp.depth=0", "moe.seq_aux_loss_alpha=0", "model.num_layers=3", "model.hidden_size=64",
                        "model.dense_ffn_size=128", "moe.expert_ffn_size=32", "model.vocab_size=512",
                        "data.seq_len=24", *extra])


@pytest.mark.parametrize("extra", [[], ["attention.q_lora_rank=0", "moe.num_shared_experts=2", "moe.topk=3"]])
def test_copied_weights_give_equal_loss_and_gradients(extra):
    cfg = micro_config(*extra)
    cpu = torch.device("cpu")
    ours = build_model(cfg)
    with torch.no_grad():   # a non-zero router bias, so that the copied bias changes the routing
        for name, buf in ours.named_buffers():
            if name.endswith("router.bias"):
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    titan = peer.build_titan(cfg, ours, cpu, torch.float32)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
    batch = make_batch(tokens, None)
    loss_ours, loss_titan = ours(batch).loss, peer.titan_loss(titan, batch, cpu)
    assert abs(loss_ours.item() - loss_titan.item()) <= 1e-5 * abs(loss_ours.item())
    loss_ours.backward()
    loss_titan.backward()
    ours_p, titan_p = dict(ours.named_parameters()), dict(titan.named_parameters())
    for a, b in peer.weight_map(cfg).items():
        if a in ours_p:
            g = ours_p[a].grad
            assert torch.allclose(titan_p[b].grad, g, rtol=1e-4, atol=1e-5 * g.abs().max().item() + 1e-12), (a, b)


def test_weight_map_covers_both_models_and_refuses_mtp():
    cfg = micro_config()
    ours = build_model(cfg)
    titan = peer.build_titan(cfg, ours, torch.device("cpu"), torch.float32)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in titan.parameters())
    with pytest.raises(ValueError, match="mtp.depth"):
        peer.check_mappable(micro_config("mtp.depth=1"))
