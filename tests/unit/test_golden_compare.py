"""The golden comparison tells rounding drift from a numerics change (tests/golden/tiny_losses.py).

Both files are recorded runs of the golden command: one with ATen's AVX2 kernels (the fp32 drift
another CPU shows), one with model.norm_eps changed from 1e-6 to 1e-5 (an intended change)."""
import os

from tests.golden.tiny_losses import HERE, compare, read


def test_drift_of_another_cpu_passes_only_the_tolerance_comparison():
    _, want = read()
    _, avx2 = read(os.path.join(HERE, "drift_avx2.json"))
    assert compare(want, avx2, exact=False) == []
    assert len(compare(want, avx2, exact=True)) > 100  # not bit-equal: the tolerance is what passes it


def test_a_numerics_change_fails_even_the_tolerance_comparison():
    _, want = read()
    _, changed = read(os.path.join(HERE, "changed_norm_eps.json"))
    problems = compare(want, changed, exact=False)
    assert any(p.startswith("step 1 lm_loss") for p in problems), problems[:5]   # seen at the first step
    assert any(p.startswith("steps 41-50 mean lm_loss") for p in problems)     # and in the late windows


def test_the_same_numbers_pass_both_ways():
    _, want = read()
    assert compare(want, want, exact=True) == [] and compare(want, want, exact=False) == []
