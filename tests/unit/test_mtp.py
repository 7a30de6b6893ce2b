"""MTP: the loss equals a hand-built chain of depths with shifted, document-masked targets."""
import torch
import torch.nn.functional as F

from model.batch import IGNORE, make_batch, mtp_labels
from trainer.config import load_config
from model.mtp import shift_tokens
from model.transformer import build_model


def _model(depth):
    cfg = load_config(None, ["model.vocab_size=50", "model.max_seq_len=16", "data.seq_len=16",
                             f"mtp.depth={depth}", "mtp.loss_weight=0.5", "model.num_layers=2"])
    return cfg, build_model(cfg)


def _batch():
    g = torch.Generator().manual_seed(0)
    return make_batch(torch.randint(1, 50, (2, 12), generator=g), [[5, 4, 2], [12]])


def test_shift_tokens():
    t = torch.tensor([[1, 2, 3, 4]])
    assert shift_tokens(t, 1).tolist() == [[2, 3, 4, 0]]
    assert shift_tokens(t, 2, fill=9).tolist() == [[3, 4, 9, 9]]


def test_mtp_loss_matches_manual_chain():
    cfg, model = _model(depth=2)
    batch = _batch()
    out = model(batch)
    ctx = model.make_context(batch)
    h = model.embed(batch.tokens)
    for i in model.owned:
        h = model.layers[str(i)](h, ctx)
    losses = []
    for k in (1, 2):
        mod = model.mtp[k - 1]
        # depth k at position i sees token i+k and predicts token i+k+1
        emb = model.embed(torch.cat([batch.tokens[:, k:], torch.zeros(2, k, dtype=torch.long)], 1))
        h = mod.block(mod.proj(torch.cat([mod.hnorm(h), mod.enorm(emb)], -1)), ctx)
        tgt = mtp_labels(batch, k)
        losses.append(F.cross_entropy(model.head(mod.norm(h)).flatten(0, 1), tgt.flatten(), ignore_index=IGNORE))
    mtp = torch.stack(losses).mean()
    torch.testing.assert_close(out.mtp_loss, mtp)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * mtp + out.balance_loss)
    assert out.balance_loss > 0


def test_mtp_loss_ignores_tokens_past_document_end():
    cfg, model = _model(depth=1)
    model.eval()
    tokens = torch.randint(1, 50, (1, 8), generator=torch.Generator().manual_seed(1))
    # document 2 has one token: no target of its own, and it must be no target of document 1
    base = model(make_batch(tokens, [[5, 1]]))
    changed = tokens.clone()
    changed[0, 5] = (changed[0, 5] % 49) + 1
    out = model(make_batch(changed, [[5, 1]]))
    torch.testing.assert_close(out.lm_loss, base.lm_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.mtp_loss, base.mtp_loss, rtol=0, atol=1e-6)
    # the same change inside a single document changes the depth-1 target of position 3
    joined = model(make_batch(changed, [[6]])).mtp_loss
    assert abs(joined.item() - model(make_batch(tokens, [[6]])).mtp_loss.item()) > 1e-4
    # all documents of length 1: every target masked, losses stay finite (zero)
    ones = model(make_batch(torch.randint(1, 50, (1, 4)), [[1, 1, 1, 1]]))
    assert ones.lm_loss.item() == 0.0 and ones.mtp_loss.item() == 0.0


def test_mtp_parameters_separate_and_block_is_moe():
    cfg, model = _model(depth=1)
    assert model.mtp[0].block.is_moe  # as the released DeepSeek-V3's MTP layer
    assert model.mtp[0].block.ffn.moe_index == model.n_moe_layers - 1
    names = [n for n, _ in model.named_parameters() if n.startswith("mtp.0.")]
    assert "mtp.0.proj.weight" in names and not any("embed" in n or "head" in n for n in names)
