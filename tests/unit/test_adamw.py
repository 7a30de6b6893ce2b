"""AdamW arithmetic equals torch.optim.AdamW; LR schedules have the documented shape."""
import math

import pytest
import torch

from trainer.config import OptimConfig, ScheduleConfig
from parallel.adamw import AdamW, adamw_step_, adamw_update_
from trainer.schedule import lr_at


def test_adamw_matches_torch_bit_for_bit():
    """The optimizer runs torch's fused AdamW kernel: the same numbers as torch.optim.AdamW(fused)."""
    torch.manual_seed(0)
    ours, ref = torch.nn.Linear(7, 5), torch.nn.Linear(7, 5)
    ref.load_state_dict(ours.state_dict())
    o1 = AdamW(ours.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    o2 = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    for _ in range(10):
        x = torch.randn(3, 7)
        for model, opt in ((ours, o1), (ref, o2)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)


def _shards(seed, n=3, size=1000, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(size, generator=g) for _ in range(n)]
    moments = [torch.zeros(size, dtype=dtype) for _ in range(2 * n)]
    return params, moments[:n], moments[n:]


@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
def test_multi_tensor_step_equals_the_per_tensor_reference(moment_dtype):
    """Flat shards (as ZeRO-1 holds them), two weight decays, 20 steps: the fused kernel (fp32
    moments) agrees with `adamw_update_` to fp32 rounding; the foreach path (bf16 moments) runs
    the reference's arithmetic and agrees bit for bit."""
    fast, fast_m, fast_v = _shards(0, dtype=moment_dtype)
    ref, ref_m, ref_v = _shards(0, dtype=moment_dtype)
    wds = [0.1, 0.0, 0.1]
    g = torch.Generator().manual_seed(1)
    for step in range(1, 21):
        grads = [torch.randn(p.shape, generator=g) for p in fast]
        adamw_step_(fast, grads, fast_m, fast_v, wds, step, 1e-2, 0.9, 0.95, 1e-8)
        for p, gr, m, v, wd in zip(ref, grads, ref_m, ref_v, wds):
            adamw_update_(p, gr, m, v, step, 1e-2, 0.9, 0.95, 1e-8, wd)
    for a, b in zip(fast + fast_m + fast_v, ref + ref_m + ref_v):
        if moment_dtype == torch.bfloat16:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7)
    assert not torch.equal(fast[0], _shards(0)[0][0])       # the parameters moved


def test_bf16_moments_are_stored_in_bf16_and_stay_close():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    b.load_state_dict(a.state_dict())
    oa, ob = AdamW(a.parameters(), lr=1e-3), AdamW(b.parameters(), lr=1e-3, moment_dtype=torch.bfloat16)
    for _ in range(20):
        x = torch.randn(4, 16)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert ob.state[b.weight]["exp_avg"].dtype == torch.bfloat16
    assert (a.weight - b.weight).abs().max() < 1e-3


def test_cosine_schedule_warms_up_then_decays_to_min():
    optim, sched = OptimConfig(lr=1.0, min_lr=0.1), ScheduleConfig(kind="cosine", warmup_steps=10)
    lrs = [lr_at(s, optim, sched, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))
    assert lr_at(110, optim, sched, 110) == pytest.approx(0.1)
    assert lr_at(60, optim, sched, 110) == pytest.approx(0.55)


def test_wsd_schedule_holds_then_decays():
    optim = OptimConfig(lr=2.2e-4, min_lr=2.2e-5)
    sched = ScheduleConfig(kind="wsd", warmup_steps=5, constant_steps=20, decay_steps=10)
    assert lr_at(5, optim, sched, 100) == lr_at(24, optim, sched, 100) == 2.2e-4
    assert lr_at(30, optim, sched, 100) == pytest.approx(2.2e-5 + 0.5 * (2.2e-4 - 2.2e-5) * (1 + math.cos(math.pi / 2)))
    assert lr_at(80, optim, sched, 100) == pytest.approx(2.2e-5)
