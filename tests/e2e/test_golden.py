"""The tiny config's first 50 losses, gradient norms and MaxVio equal the checked-in golden file
exactly (CPU, fp32, one thread): a refactor that changes any number fails here."""
import json

from tests.golden.tiny_losses import GOLDEN, KEYS, STEPS, run_tiny


def test_tiny_run_matches_golden_losses(tmp_path):
    with open(GOLDEN) as f:
        want = {int(k): v for k, v in json.load(f).items()}
    got = run_tiny(str(tmp_path))
    assert sorted(got) == list(range(1, STEPS + 1))
    diffs = [(s, k, want[s][k], got[s][k]) for s in want for k in KEYS if want[s][k] != got[s][k]]
    assert not diffs, f"{len(diffs)} values differ from {GOLDEN}; first: {diffs[:5]}"
