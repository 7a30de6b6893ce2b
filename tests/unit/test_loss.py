"""Token cross-entropy (model/loss.py) against log_softmax + nll_loss: value and gradient."""
import pytest
import torch
import torch.nn.functional as F

from model.batch import IGNORE
from model.loss import TokenCrossEntropy, chunk_rows, token_cross_entropy


def _case(dtype, n=300, vocab=4096, seed=0, ignored_every=5):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::ignored_every] = IGNORE
    targets[7:20] = IGNORE          # a run of ignored rows inside a chunk
    return logits, targets


def _reference(logits, targets):
    """Value and gradient of F.cross_entropy (sum over kept targets / their count, 0 when none)."""
    x = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).requires_grad_()
    loss = F.cross_entropy(x, targets, ignore_index=IGNORE, reduction="sum") / (targets != IGNORE).sum().clamp(min=1)
    loss.backward()
    return loss.detach(), x.grad


def _ours(logits, targets, scale=1.0):
    x = logits.detach().clone().requires_grad_()
    loss = token_cross_entropy(x, targets)
    (scale * loss).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_value_and_gradient_equal_cross_entropy(dtype, rtol):
    logits, targets = _case(dtype)
    assert logits.shape[0] > chunk_rows(logits)   # several chunks, the last one partial
    want, want_grad = _reference(logits, targets)
    got, grad = _ours(logits, targets)
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=rtol, atol=rtol * want_grad.abs().max().item())
    assert (grad[targets == IGNORE] == 0).all()


def test_gradient_scales_with_incoming_gradient():
    logits, targets = _case(torch.float64, n=40, vocab=64)
    _, want_grad = _reference(logits, targets)
    _, grad = _ours(logits, targets, scale=-2.5)
    torch.testing.assert_close(grad, -2.5 * want_grad, rtol=1e-12, atol=1e-15)


def test_all_ignored_is_zero_with_zero_gradient():
    logits, _ = _case(torch.float32, n=10, vocab=32)
    loss, grad = _ours(logits, torch.full((10,), IGNORE))
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_bf16_logits_computed_in_fp32():
    logits, targets = _case(torch.bfloat16)
    want, want_grad = _reference(logits, targets)       # the same bf16 values, upcast
    got, grad = _ours(logits, targets)
    assert got.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # the fp32 gradient rounded once to bf16: within half a bf16 step (2^-8 relative) of the reference
    torch.testing.assert_close(grad.float(), want_grad, rtol=2 ** -8, atol=1e-12)


def test_batch_shape_and_extreme_logits():
    logits, targets = _case(torch.float32, n=24, vocab=50)
    logits[3, targets[3] if targets[3] != IGNORE else 0] = -1e4   # a target far below the others
    logits[4] = 1e4 * torch.arange(50) / 50                        # large spread, no overflow
    want, want_grad = _reference(logits, targets)
    x = logits.reshape(2, 12, 50).clone().requires_grad_()
    loss = token_cross_entropy(x, targets.reshape(2, 12))
    loss.backward()
    assert torch.isfinite(loss) and x.grad.shape == (2, 12, 50)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad.reshape(24, 50), want_grad, rtol=1e-6, atol=1e-7)


def test_gradcheck_fp64():
    logits, targets = _case(torch.float64, n=6, vocab=9, ignored_every=4)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: TokenCrossEntropy.apply(t, targets), (x,))


def test_overwrite_logits_gives_the_same_gradient_in_their_storage():
    logits, targets = _case(torch.float32, n=100, vocab=3000)
    leaf = logits.clone().requires_grad_()
    token_cross_entropy(leaf * 1.0, targets).backward()
    want = leaf.grad.clone()
    leaf.grad = None
    temp = leaf * 1.0
    loss = token_cross_entropy(temp, targets, overwrite_logits=True)
    loss.backward(retain_graph=True)
    assert torch.equal(leaf.grad, want)
    assert torch.equal(temp.detach(), want)   # the logits' storage now holds their gradient
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()                       # a second backward cannot read the logits any more
    with pytest.raises(ValueError, match="overwrite_logits"):
        token_cross_entropy(leaf, targets, overwrite_logits=True)
