"""Validation loss: token-weighted over the held-out split, independent of how rows are split over
ranks and micro-batches; `python -m trainer.evaluate` and its one-line errors."""
import dataclasses
import math
import os
import shutil

import pytest
import torch

from model.batch import IGNORE, make_batch
from tests.unit.test_error_lines import LINE
from trainer.evaluate import finish, main, open_split, rank_rows, split_sums, valid_dirs
from trainer.restore import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rank_rows_cover_each_sequence_once_with_equal_counts():
    parts = [rank_rows(10, r, 4) for r in range(4)]
    assert {len(p) for p in parts} == {3}
    assert sorted(i for p in parts for i in p if i is not None) == list(range(10))


def test_validation_loss_is_the_token_mean_whatever_the_split(tiny_checkpoint):
    path, _ = tiny_checkpoint
    cfg, model = load_model(path)
    reader, pad = open_split(valid_dirs(cfg)[0])
    n = min(len(reader), 6)
    one = finish(split_sums(model, reader, n, cfg, torch.device("cpu"), pad_id=pad), True)
    # by hand: one row at a time, cross-entropy summed over target tokens
    total, count = 0.0, 0
    for i in range(n):
        seq, lens = reader.get(i)
        batch = make_batch(torch.tensor(seq[None], dtype=torch.long), [lens])
        with torch.no_grad():
            out = model(batch)
        k = int((batch.labels != IGNORE).sum())
        total, count = total + float(out.lm_loss) * k, count + k
    assert one["val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert one["val_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert one["val_tokens"] == count and one["val_mtp_loss"] > 0
    # three "ranks" with micro-batches of 1: the summed parts give the same numbers
    cfg1 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=1))
    parts = sum(split_sums(model, reader, n, cfg1, torch.device("cpu"), rank=r, world=3, pad_id=pad)
                for r in range(3))
    three = finish(parts, True)
    for key in ("val_loss", "val_mtp_loss"):
        assert three[key] == pytest.approx(one[key], rel=1e-5)


def test_evaluate_cli_prints_loss_perplexity_and_mtp(tiny_checkpoint, capsys):
    assert main([tiny_checkpoint[0], "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "| dataset | tokens | loss | perplexity | MTP loss |" in out
    assert "the first 2 micro-batches of each held-out split" in out  # says what it covers
    row = out.strip().splitlines()[-1].split("|")
    loss, ppl = float(row[3]), float(row[4])
    assert 8.5 < loss < 9.5 and ppl == pytest.approx(math.exp(loss), rel=1e-3)   # random init: ~ln(8192)


def test_checkpoint_without_validation_split_is_one_line(tiny_checkpoint, tiny_data, tmp_path, capsys):
    from data.prepare import prepared_dir
    path, cfg = tiny_checkpoint
    root = tmp_path / "data"
    no_valid = dataclasses.replace(cfg.data, output_dir=str(root), valid_fraction=0.0)
    dst = prepared_dir(no_valid, cfg.dedup)
    shutil.copytree(tiny_data[0], dst, ignore=shutil.ignore_patterns("valid*"))
    assert main([path, "--set", f"data.output_dir={root}", "data.valid_fraction=0"]) == 2
    err = capsys.readouterr().err
    assert "has no validation split" in err and "data.valid_fraction=0.02" in err and LINE.match(err.strip())
    assert os.path.isdir(dst)
