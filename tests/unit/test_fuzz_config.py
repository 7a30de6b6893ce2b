"""Fuzz the YAML config loader: every random, truncated or mutated file is one ConfigError.

Seeded mutations of real configs (configs/tiny.yaml and the fully resolved default dump):
truncation, inserted YAML punctuation/tags/anchors, deleted spans, values replaced by wrong
types or extreme numbers, random unicode. Each case must end in `ConfigError` with a non-empty
message (or load, when the mutation happens to be valid) -- never another exception type, and
never a hang (pytest-timeout bounds the whole test). Deep nesting and non-finite floats, which
this fuzzing found, have their own tests.
"""
from __future__ import annotations

import os
import random

import pytest

from trainer.config import Config, ConfigError, dump_yaml, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSERTS = list(":-[]{}&*!|>'\"%@`#,?\n\t ") + [
    "0", "1e9", "-1", ".nan", ".inf", "null", "true", "~", "base: x.yaml", "base: .", "<<: *a", "&a ", "*a",
    "!!python/object/apply:os.system ['true']", "!!binary AAAA", "[[[", "\U0001F600", "\x00", "\ufeff"]
VALUES = ["-3", "0", "1e400", "'abc'", "[1, 2]", "{a: 1}", ".nan", "-.inf", "null", "true", "2.5",
          "99999999999999999999", "0x10", "''", "[]", "{}", "!!str 5", "*undefined_alias"]


def _mutate(text: str, rng: random.Random) -> str:
    s = text
    for _ in range(rng.randint(1, 6)):
        op, i = rng.random(), rng.randrange(len(s) + 1)
        if op < 0.2:
            s = s[:i]                                                   # truncate
        elif op < 0.45:
            s = s[:i] + rng.choice(INSERTS) + s[i:]                     # insert punctuation / tags
        elif op < 0.6:
            j = rng.randrange(len(s) + 1)
            s = s[:min(i, j)] + s[max(i, j):]                           # delete a span
        elif op < 0.9:
            lines = s.splitlines()                                      # replace a value
            k = rng.randrange(len(lines)) if lines else 0
            if lines and ":" in lines[k]:
                lines[k] = lines[k].partition(":")[0] + ": " + rng.choice(VALUES)
            s = "\n".join(lines)
        else:
            s = "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randint(0, 80)))  # noise
    return s


def _load(path: str, text: str):
    with open(path, "w", encoding="utf-8", errors="replace") as f:
        f.write(text)
    return load_config(path)


def _check(path: str, text: str) -> str:
    try:
        _load(path, text)
        return "loaded"
    except ConfigError as e:
        assert str(e).strip(), f"empty ConfigError message for {text[:200]!r}"
        return "error"


@pytest.mark.timeout(120)
def test_mutated_configs_give_one_clear_error(tmp_path):
    rng = random.Random(1234)
    with open(os.path.join(ROOT, "configs", "tiny.yaml"), encoding="utf-8") as f:
        seeds = [f.read(), dump_yaml(Config())]
    outcomes = {"loaded": 0, "error": 0}
    for n in range(400):
        text = _mutate(rng.choice(seeds), rng)
        try:
            outcomes[_check(str(tmp_path / "c.yaml"), text)] += 1
        except Exception as e:  # report the failing input, not just the exception
            raise AssertionError(f"case {n}: {type(e).__name__}: {e}\n--- input ---\n{text[:500]}") from e
    assert outcomes["error"] > 200 and outcomes["loaded"] > 5, outcomes  # the fuzzer reaches both sides


@pytest.mark.parametrize("text", [
    "x", "- 1\n- 2", "model: 5", "model: [1]", "model: {vocab_size: abc}", "model: {nope: 1}",
    "optim: {lr: .nan}", "optim: {lr: -1}", "base: missing.yaml", "base: [1]", "base: c.yaml",
    "x: !!python/object/apply:os.system ['touch /tmp/moepipe_yaml_pwned']", "a: *b", "\x00\x01",
    "lol: &a [1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b,*b,*b]",
    "1: 2", "model: {1: 2}", "? [a]\n: 1", "data: {dumps: 5}", "moe: {topk: 100}",
])
def test_hand_written_bad_configs(tmp_path, text):
    with pytest.raises(ConfigError):
        _load(str(tmp_path / "c.yaml"), text)
    assert not os.path.exists("/tmp/moepipe_yaml_pwned")


@pytest.mark.parametrize("text", ["[" * 3000, "a: " + "{a: " * 3000], ids=["lists", "mappings"])
def test_deep_nesting_is_a_config_error(tmp_path, text):
    with pytest.raises(ConfigError):
        _load(str(tmp_path / "c.yaml"), text)


@pytest.mark.parametrize("text", ["optim: {lr: .inf}", "optim: {lr: 'infinity'}"])
def test_infinite_floats_are_rejected(tmp_path, text):
    with pytest.raises(ConfigError):
        _load(str(tmp_path / "c.yaml"), text)


@pytest.mark.parametrize("item", ["optim.lr", "optim.lr=", "a.b.c=1", "=1", "optim.lr=abc", "nope.x=1",
                                  "model.vocab_size=[1, 2]", "model.vocab_size={a: 1}"])
def test_bad_overrides(item):
    with pytest.raises(ConfigError):
        load_config(None, [item])
