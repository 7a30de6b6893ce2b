"""The passkey documents of benchmarks/bench_longctx.py: key at the asked depth, answer at the end."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import bench_longctx as bench  # noqa: E402


def test_passkey_prompt_places_the_key_at_the_depth():
    for depth in bench.DEPTHS:
        text = bench.passkey_prompt(100, depth, 4821)
        before = text[:text.index("The pass key is 4821.")]
        assert before.count(".") == round(depth * 100)  # filler sentences before the key
        assert text.endswith("What is the pass key? The pass key is")
        assert text.count("4821") == 2


def test_passkey_dump_has_short_and_long_documents(tmp_path):
    path = tmp_path / "passkey.jsonl"
    bench.write_passkey_dump(str(path), n_short=20, n_long=5)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(texts) == 25
    sentences = sorted(t.count(".") for t in texts)
    assert sentences[0] < 45 and sentences[-1] > 50
    for t in texts:
        key = t.rsplit(" ", 1)[1].rstrip(".")
        assert f"The pass key is {key}. Remember it." in t

