"""Weight-gradient deferral (I/W split): dW is queued under collect() and equals the plain grad."""
import torch

from parallel.pipeline.split import DeferrableLinear, WeightGradDeferral


def test_deferred_weight_grad_matches_plain_backward():
    torch.manual_seed(0)
    d = WeightGradDeferral()
    a, b = DeferrableLinear(6, 5, d), DeferrableLinear(5, 4, d)
    x = torch.randn(2, 3, 6, requires_grad=True)
    loss = b(torch.tanh(a(x))).square().sum()
    with d.collect() as sink:
        loss.backward(retain_graph=True)
    assert a.weight.grad is None and b.weight.grad is None and x.grad is not None and len(sink) == 2
    gx = x.grad.clone()
    for fn in sink:
        fn()
    ga, gb = a.weight.grad.clone(), b.weight.grad.clone()
    a.weight.grad = b.weight.grad = x.grad = None
    loss.backward()  # outside collect(): ordinary full backward
    torch.testing.assert_close(ga, a.weight.grad)
    torch.testing.assert_close(gb, b.weight.grad)
    torch.testing.assert_close(gx, x.grad)
    assert not ga.requires_grad


def test_deferred_weight_grad_lands_on_the_parameter_under_checkpointing():
    # non-reentrant checkpointing hands the backward a recomputed alias of the weight; the
    # deferred dW must still accumulate into the module's own parameter
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    deferral = WeightGradDeferral()
    lin = DeferrableLinear(4, 4, deferral)
    x = torch.randn(3, 4)
    with deferral.collect() as sink:
        checkpoint(lambda t: torch.tanh(lin(t)), x, use_reentrant=False).sum().backward()
    assert lin.weight.grad is None and len(sink) == 1
    for fn in sink:
        fn()
    want = torch.autograd.grad(torch.tanh(x @ lin.weight.t()).sum(), lin.weight)[0]
    torch.testing.assert_close(lin.weight.grad, want)
