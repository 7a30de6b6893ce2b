"""The golden comparison tells rounding drift from a numerics change (tests/golden/tiny_losses.py).

`drift_cases.json` holds three recorded runs of the golden command on the same data: the
reference, the same with ATen's AVX2 kernels (the fp32 drift another CPU shows), and the same with
model.norm_eps changed from 1e-6 to 1e-5 (an intended change)."""
import json
import os

from tests.golden.tiny_losses import HERE, compare


def _cases():
    with open(os.path.join(HERE, "drift_cases.json")) as f:
        data = json.load(f)
    return {name: {int(k): v for k, v in data[name]["steps"].items()} for name in ("reference", "avx2", "norm_eps_1e-5")}


def test_drift_of_another_cpu_passes_only_the_tolerance_comparison():
    runs = _cases()
    assert compare(runs["reference"], runs["avx2"], exact=False) == []
    assert len(compare(runs["reference"], runs["avx2"], exact=True)) > 100  # not bit-equal: the tolerance passes it


def test_a_numerics_change_fails_even_the_tolerance_comparison():
    runs = _cases()
    problems = compare(runs["reference"], runs["norm_eps_1e-5"], exact=False)
    assert any(p.startswith("step 1 lm_loss") for p in problems), problems[:5]   # seen at the first step
    assert any(p.startswith("steps 41-50 mean lm_loss") for p in problems)     # and in the late windows


def test_the_same_numbers_pass_both_ways():
    runs = _cases()
    assert compare(runs["reference"], runs["reference"], exact=True) == []
    assert compare(runs["reference"], runs["reference"], exact=False) == []
