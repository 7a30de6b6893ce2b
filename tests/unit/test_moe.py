"""MoE: local dispatch + grouped experts vs a per-token reference; gradients; no token dropped."""
import pytest
import torch
import torch.nn.functional as F

from trainer.config import load_config
from model.context import make_context
from model.batch import make_batch
from model.layers import rope_tables
from model.experts import LocalDispatcher
from model.moe import MoE
from model.experts import GroupedExperts
from model.provider import LayerProvider


def _experts(E=4, D=8, Fd=8, seed=0):
    torch.manual_seed(seed)
    ex = GroupedExperts(E, D, Fd, layer=0)
    for p in ex.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    return ex


def _expert_ref(ex, e, x):
    return (F.silu(x @ ex.w_gate[e].T) * (x @ ex.w_up[e].T)) @ ex.w_down[e].T


def test_dispatch_combine_matches_per_token_loop():
    E, K, T, D = 4, 2, 11, 8
    ex = _experts(E, D)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[:, 0] = 1  # expert 1 gets every token, some experts may get none
    w = torch.rand(T, K, generator=g, requires_grad=True)
    disp = LocalDispatcher(E)
    x_S, counts, state = disp.dispatch(x, ids, w)
    assert sum(counts) == T * K and counts[1] >= T
    y = disp.combine(ex(x_S, counts), state)
    ref = torch.stack([sum(w[t, k] * _expert_ref(ex, int(ids[t, k]), x[t]) for k in range(K)) for t in range(T)])
    torch.testing.assert_close(y, ref)
    # gradients reach x, the gate weights and every expert (zero for unused ones)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum(), [x, w, ex.w_gate, ex.w_down])
    ref_grads = torch.autograd.grad((ref * gy).sum(), [x, w, ex.w_gate, ex.w_down])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_unused_expert_gets_zero_gradient():
    ex = _experts(3)
    x = torch.randn(4, 8)
    ex(x, [4, 0, 0]).sum().backward()
    assert ex.w_gate.grad is not None and ex.w_gate.grad[1:].abs().sum() == 0
    assert ex.w_gate.grad[0].abs().sum() > 0


def test_moe_layer_shared_plus_routed_and_records():
    cfg = load_config(None, ["moe.num_experts=8", "moe.topk=2", "moe.n_group=4", "moe.topk_group=2",
                             "moe.routed_scaling_factor=2.5", "moe.seq_aux_loss_alpha=0.01"])
    D = cfg.model.hidden_size
    torch.manual_seed(0)
    moe = MoE(LayerProvider(), LocalDispatcher(8), D, cfg.moe, layer=1, moe_index=1)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.05)
    batch = make_batch(torch.zeros(2, 6, dtype=torch.long), [[6], [3, 1]])
    cos, sin = rope_tables(cfg.attention.qk_rope_head_dim, 8, 1e4)
    ctx = make_context(batch, cos, sin, n_moe_layers=2, num_experts=8)
    x = torch.randn(2, 6, D)
    y = moe(x, ctx)
    x_TD = x.reshape(-1, D)
    ids, w, _ = moe.router(x_TD)
    torch.testing.assert_close(w.sum(-1), torch.full((12,), 2.5))
    ref = moe.shared(x_TD) + torch.stack([
        sum(w[t, k] * _expert_ref(moe.experts, int(ids[t, k]), x_TD[t]) for k in range(2)) for t in range(12)])
    torch.testing.assert_close(y.reshape(-1, D), ref, rtol=1e-4, atol=1e-5)
    # loads of the 10 valid tokens land in row moe_index; padding is not counted
    assert ctx.expert_counts[0].sum() == 0 and ctx.expert_counts[1].sum() == 10 * 2
    assert len(ctx.balance_losses) == 1 and ctx.balance_loss().item() > 0
    y.sum().backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0  # the router learns through the gate weights


@pytest.mark.parametrize("threads", [1, 2])
def test_grouped_gemm_equals_the_expert_loop_on_cpu(threads):
    """Same outputs and gradients as the per-expert loop up to fp32 summation order, which changes
    with the thread count (bit-identical with one thread, not with two): the tolerance is a few
    fp32 ulps of the largest entry, relative to the contraction length."""
    E, D, Fd = 5, 16, 24
    ex = _experts(E, D, Fd)
    counts = torch.tensor([7, 0, 13, 1, 9])     # one expert empty, one with a single row
    x = torch.randn(int(counts.sum()), D, requires_grad=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ex(x, counts)
        ref = ex.reference_forward(x, counts)
        gy = torch.randn_like(y)
        params = [x, ex.w_gate, ex.w_up, ex.w_down]
        grads, ref_grads = torch.autograd.grad(y, params, gy), torch.autograd.grad(ref, params, gy)
    finally:
        torch.set_num_threads(before)
    eps = torch.finfo(torch.float32).eps
    for a, b in zip((y, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(a, b, rtol=8 * max(D, Fd) * eps, atol=8 * max(D, Fd) * eps * b.abs().max().item())


def test_local_dispatch_keeps_counts_on_the_device_and_host_lists_still_work():
    E, K, T, D = 4, 2, 9, 8
    ex = _experts(E, D)
    ids = torch.randint(0, E, (T, K))
    x_S, counts, _ = LocalDispatcher(E).dispatch(torch.randn(T, D), ids, torch.rand(T, K))
    assert isinstance(counts, torch.Tensor) and counts.dtype == torch.int64
    assert counts.tolist() == torch.bincount(ids.reshape(-1), minlength=E).tolist()
    assert torch.equal(ex(x_S, counts), ex(x_S, counts.tolist()))


def test_unaligned_expert_dims_name_the_fields():
    ex = GroupedExperts(2, 8, 6, layer=0)
    with pytest.raises(ValueError, match="moe.expert_ffn_size \\(6\\)"):
        ex(torch.randn(3, 8), [1, 2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_grouped_experts_in_bf16_without_a_host_sync():
    E, K, T, D, Fd = 8, 2, 512, 64, 128
    ex = _experts(E, D, Fd).cuda()
    x = torch.randn(T, D, device="cuda")
    ids = torch.randint(0, E, (T, K), device="cuda")
    w = torch.rand(T, K, device="cuda")
    disp = LocalDispatcher(E)
    x_S, counts, state = disp.dispatch(x, ids, w)          # warm-up (lazy CUDA init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")                 # any host sync below raises
    try:
        x_S, counts, state = disp.dispatch(x, ids, w)
        y_S = ex(x_S, counts)
        y = disp.combine(y_S, state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y_S.dtype == torch.bfloat16
    ref = ex.reference_forward(x_S, counts)                 # fp32 loop
    assert ((y_S.float() - ref).norm() / ref.norm()).item() < 2e-2
