"""AdamW arithmetic equals torch.optim.AdamW; LR schedules have the documented shape."""
import math

import pytest
import torch

from trainer.config import OptimConfig, ScheduleConfig
from parallel.adamw import AdamW
from trainer.schedule import lr_at


def test_adamw_matches_torch_bit_for_bit():
    torch.manual_seed(0)
    ours, ref = torch.nn.Linear(7, 5), torch.nn.Linear(7, 5)
    ref.load_state_dict(ours.state_dict())
    o1 = AdamW(ours.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    o2 = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for _ in range(10):
        x = torch.randn(3, 7)
        for model, opt in ((ours, o1), (ref, o2)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)


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
