"""Every user error of the command-line tools ends in one line `error: <what> = <value>: <why>; <fix>`
and exit code 2, never a traceback. The CLIs run in this process (their `main(argv)`)."""
from __future__ import annotations

import json
import os
import re

import pytest

from tests.unit.test_nonfinite import CFG
from trainer import prepare as prepare_cli
from trainer import train as train_cli

LINE = re.compile(r"^error: \S+.* = .+: .+; .+$")
pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = [f"document {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(60)) for i in range(40)]
SMALL = [c for c in CFG if not c.startswith(("model.vocab_size", "train.device"))] + [
    "model.vocab_size=320", "data.tokenizer=bpe:300", "data.workers=1", "train.steps=1",
    "logging.every=1", "data.bundled_mb=0.01", "data.max_error_fraction=0"]


def one_error_line(capsys, rc) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    assert LINE.match(lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    return root, str(path)


def sets(root, corpus_path, *extra, out="run"):
    (root / "empty.yaml").write_text("{}\n")
    return [str(root / "empty.yaml"), "--set", *SMALL, f"data.dumps=[{corpus_path}]", f"data.output_dir={root / 'data'}",
            f"train.output_dir={root / out}", *extra]


@pytest.fixture(scope="module")
def trained(corpus):
    """A run of one step with its checkpoint (and its prepared data)."""
    root, path = corpus
    assert train_cli.main(sets(root, path)) == 0
    return root, path


def test_missing_dump_file(tmp_path, capsys):
    rc = prepare_cli.main(["--set", f"data.dumps=[{tmp_path / 'nope.jsonl'}]", f"data.output_dir={tmp_path}"])
    assert "data.dumps = " in one_error_line(capsys, rc)


def test_missing_tokenizer(corpus, tmp_path, capsys):
    rc = prepare_cli.main(["--set", f"data.dumps=[{corpus[1]}]", f"data.output_dir={tmp_path}",
                           f"data.tokenizer={tmp_path / 'none' / 'tokenizer.json'}"])
    assert "data.tokenizer = " in one_error_line(capsys, rc)


@pytest.mark.parametrize("damage", ["missing", "broken"])
def test_missing_or_broken_meta_json(trained, capsys, damage):
    root, path = trained
    meta = next(os.path.join(d, "meta.json") for d, _, files in os.walk(root / "data") if "meta.json" in files)
    saved = open(meta).read()
    try:
        if damage == "missing":
            os.remove(meta)
        else:
            open(meta, "w").write("{not json")
        rc = train_cli.main(sets(root, path, "checkpoint.resume=none", out=f"meta_{damage}"))
        assert "meta.json" in one_error_line(capsys, rc)
    finally:
        open(meta, "w").write(saved)


def test_data_seed_changed_on_resume(trained, capsys):
    root, path = trained
    rc = train_cli.main(sets(root, path, "data.seed=5", "train.steps=2"))
    assert one_error_line(capsys, rc).startswith("error: data.seed = 5: the checkpoint's data stream used 1234")


def test_model_change_on_resume_names_the_fields(trained, capsys):
    root, path = trained
    rc = train_cli.main(sets(root, path, "model.dense_ffn_size=48", "train.steps=2"))
    assert "model.dense_ffn_size: 32 -> 48" in one_error_line(capsys, rc)


def test_output_dir_that_is_a_file(corpus, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc = train_cli.main(sets(*corpus, f"train.output_dir={tmp_path / 'file'}"))
    assert "train.output_dir = " in one_error_line(capsys, rc)


def test_cuda_without_cuda(corpus, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = train_cli.main(sets(*corpus, "train.device=cuda"))
    assert one_error_line(capsys, rc).startswith("error: train.device = 'cuda': no CUDA device")


def test_nested_list_in_a_list_of_strings(corpus, capsys):
    rc = train_cli.main(sets(*corpus, "fp8.keep_high_precision=[[router]]"))
    assert "fp8.keep_high_precision = [['router']]" in one_error_line(capsys, rc)


def test_absurd_sizes_refused_before_allocating(corpus, capsys):
    rc = train_cli.main(sets(*corpus, "model.hidden_size=100000000"))
    line = one_error_line(capsys, rc)
    assert "model.hidden_size = 100000000" in line and "GiB" in line


def test_yaml_alias_bomb(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    rc = train_cli.main([str(tmp_path / "bomb.yaml")])
    assert "aliases expand to more than" in one_error_line(capsys, rc)


def test_exponent_integer_read_as_a_string(corpus, capsys):
    rc = train_cli.main(sets(*corpus, "train.steps=1e3"))
    assert "YAML reads 1e3 as a string" in one_error_line(capsys, rc)


def test_yaml_syntax_error_gives_line_and_column(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("train:\n  steps: 3\n  seed: [1, 2\nmodel:\n  hidden_size: 8\n")
    rc = train_cli.main([str(tmp_path / "bad.yaml")])
    assert re.search(r"line \d+, column \d+", one_error_line(capsys, rc))


@pytest.mark.parametrize("cli", ["export", "import_hf", "sweep", "inspect"])
def test_other_clis_print_one_line(cli, tmp_path, capsys):
    import importlib
    main = importlib.import_module(f"trainer.{cli}").main
    missing = str(tmp_path / "missing")
    argv = {"export": [missing, str(tmp_path / "out")], "import_hf": [missing, str(tmp_path / "out")],
            "sweep": [missing + ".yaml"], "inspect": [str(tmp_path)]}[cli]
    if cli == "inspect":
        argv = [str(tmp_path / "c.yaml"), "--set", "train.steps=1e3"]
        (tmp_path / "c.yaml").write_text("{}\n")
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
