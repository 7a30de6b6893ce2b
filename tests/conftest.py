"""Shared pytest fixtures.

`tiny_data` prepares a small slice of the bundled corpus once per test session (50 KB of each
of the 8 bundled dumps, about 400 KB read, deduplicated across editions, an 8k-vocab BPE, best-fit
packing at L = 256) and returns `(output_dir, DataConfig)`. Use
`data.stream.TokenStream(output_dir, cfg.seq_len, rank, world_size, seed)` to read it.

Test files run in parallel worker processes (pytest-xdist, `-n auto --dist loadfile
--no-loadscope-reorder` in pyproject.toml): a whole file goes to one worker, so module fixtures
(the Slurm cluster on its fixed ports, a file's prepared data) exist once. Files start longest
first (`FIRST`, then the end-to-end, multi-rank and unit folders), so the suite does not end on one
long file while the other workers are idle; xdist's own order (most tests first) started the
one-test golden run last. `auto` is one worker per core: a third worker on two cores was measured
slower (its multi-rank tests oversubscribe the cores). Each worker gets its share of the cores as
torch threads; the multi-rank tests pin one thread per rank themselves and fork their ranks from a
fork server that has imported torch once (tests/distributed/spawn.py), so a rank starts in well
under a second.
"""
from __future__ import annotations

import os

import pytest

MAX_WORKERS = 4
# The longest files (seconds in a worker on a quiet 2-core machine): Slurm 196, golden 84, validation
# 50, hang 49, crash-resume 45, torchrun 38, pipeline e2e 37, train e2e 35.
FIRST = ("e2e/test_slurm.py", "e2e/test_golden.py", "e2e/test_validation.py", "e2e/test_hang.py",
         "e2e/test_crash_resume.py", "e2e/test_torchrun.py", "e2e/test_train_pipeline.py", "e2e/test_train.py")
FOLDERS = ("e2e", "distributed", "unit")


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most MAX_WORKERS (each multi-rank test starts 2-4
    processes of its own), at least 2."""
    return max(2, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def pytest_collection_modifyitems(config, items):
    """Longest files first: FIRST in its order, then by folder; tests keep their order in a file."""
    def key(item):
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        folder = path.split("/")[0]
        return (FIRST.index(path) if path in FIRST else len(FIRST),
                FOLDERS.index(folder) if folder in FOLDERS else len(FOLDERS))
    items.sort(key=key)


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from data.config import DataConfig
    from data.dedup.config import DedupConfig
    from data.prepare import ensure_prepared

    out = tmp_path_factory.mktemp("tiny_data")
    cfg = DataConfig(output_dir=str(out), bundled_mb=0.05, workers=1, valid_fraction=0.1)
    return ensure_prepared(cfg, DedupConfig(), quiet=True), cfg


@pytest.fixture
def one_thread():
    """One intra-op thread while the test runs: on 2 busy cores, two threads on tiny tensors only
    spin against each other (measured 5-10x slower). Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data, tmp_path_factory):
    """(checkpoint dir, Config) of a small randomly initialised model whose config points at
    `tiny_data` (so its tokenizer and validation split are found), written as training does."""
    import torch

    from model.transformer import build_model
    from parallel.checkpoint import write_checkpoint
    from trainer.config import dump_yaml, load_config

    _, data_cfg = tiny_data
    cfg = load_config(None, [f"data.output_dir={data_cfg.output_dir}", f"data.bundled_mb={data_cfg.bundled_mb}",
                             f"data.valid_fraction={data_cfg.valid_fraction}", "model.hidden_size=64",
                             "model.num_layers=2", "model.dense_ffn_size=128", "moe.expert_ffn_size=32",
                             "train.micro_batch_size=2"])
    torch.manual_seed(0)
    model = build_model(cfg)
    root = str(tmp_path_factory.mktemp("tiny_ckpt"))
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    path = write_checkpoint(root, 1, {"step": 1}, dump_yaml(cfg), keep_last=1, tensors=tensors)
    return path, cfg
