"""Sharded preparation: identical bytes for any task count, the same dedup decisions as one
process (`dedup_dumps`), a killed unit rerun alone, a corrupted output found and redone, the
stream reading a directory of shards, and two preparations sharing a dedup index at once."""
import json
import multiprocessing
import os

import numpy as np
import pytest

from data.config import DataConfig
from data.dedup import dedup_dumps
from data.dedup.config import DedupConfig
from data.dedup.index import DedupIndex, sign_batch
from data.executors import LocalExecutor
from data.prepare import finalize, plan, prepare
from data.shards import Shard, read_shard
from data.sources import read_dump, read_jsonl
from data.stages import ORDER, clean_docs
from data.stream import TokenStream
from data.tasks import load_context
from tests.unit.test_data_prepare import _edit, _jsonl, _prepared_bytes

SOTU = [d.text for d in read_dump("sotu", max_mb=0.6)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two dumps; dump b holds exact and 5%-edited copies of dump a's documents, and new ones."""
    root = tmp_path_factory.mktemp("corpus")
    a = _jsonl(root / "a.jsonl", SOTU[:16])
    b = _jsonl(root / "b.jsonl", SOTU[:3] + [_edit(t, 0.05, i) for i, t in enumerate(SOTU[3:7])] + SOTU[20:26])
    return [a, b]


def _cfg(out, dumps, **kw):
    kw.setdefault("shard_mb", 0.15)
    return DataConfig(dumps=dumps, output_dir=str(out), seq_len=128, tokenizer="bpe:300", workers=1,
                      valid_fraction=0.2, **kw)


def _run(cfg, dedup, tasks):
    out = plan(cfg, dedup)
    ex = LocalExecutor(tasks, quiet=True)
    seconds = {stage: ex.run(out, stage) for stage in ORDER}
    return finalize(out, seconds), ex


def test_bytes_and_decisions_identical_for_1_2_4_tasks(tmp_path, corpus):
    dedup = DedupConfig(buckets=3, batch_docs=5)  # several batches per dump: the incremental rule matters
    outs = {}
    for tasks in (1, 2, 4):
        rep, _ = _run(_cfg(tmp_path / f"t{tasks}", corpus), dedup, tasks)
        outs[tasks] = _prepared_bytes(str(tmp_path / f"t{tasks}"))
    assert rep["shards"] >= 4 and sum(f.endswith("train.bin") for f in outs[1]) >= 4
    assert outs[1] == outs[2] == outs[4]
    # the decisions are those of the single-process dedup over the same normalised texts
    ctx = load_context(str(tmp_path / "t1"))
    texts = [[], []]
    for s, shard in enumerate(ctx.shards):
        texts[shard.dump].extend(clean_docs(ctx, s)[1])
    ref = dedup_dumps(texts, dedup)
    assert [d["kept"] for d in rep["dumps"]] == [int(k.sum()) for k in ref.keep]
    assert rep["dedup"]["exact_removed"] == ref.stats["exact_removed"] == [0, 3]
    assert rep["dedup"]["near_removed"] == ref.stats["near_removed"] == [0, 4]


def test_killed_unit_rerun_alone_and_corrupted_output_redone(tmp_path, corpus):
    cfg = _cfg(tmp_path / "out", corpus)
    _run(cfg, DedupConfig(), 2)
    out = cfg.output_dir
    before = _prepared_bytes(out)
    # a task killed while writing shard 1's signatures: its files are partial, its marker absent
    os.remove(os.path.join(out, "work", "sign", "000001.done.json"))
    with open(os.path.join(out, "work", "sign", "000001", "sig.npy"), "r+b") as f:
        f.truncate(100)
    # a corrupted packed shard: one byte flipped after it was written
    path = os.path.join(out, "work", "tokenize", "000002", "train.bin")
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    _, ex = _run(cfg, DedupConfig(), 2)
    assert ex.ran == {"sign": [1], "buckets": [], "clusters": [], "tokenizer": [], "tokenize": [2]}
    assert _prepared_bytes(out) == before


def test_stream_reads_the_shards_as_one_dataset(tmp_path, corpus):
    cfg = _cfg(tmp_path / "out", corpus)
    prepare(cfg, DedupConfig(), quiet=True)
    meta = json.load(open(os.path.join(cfg.output_dir, "meta.json")))
    assert len(meta["shards"]["train"]) >= 2
    stream = TokenStream(cfg.output_dir, 128, split="train", seed=3)
    assert len(stream.readers[0]) == meta["sequences"]["train"] == sum(n for _, n in meta["shards"]["train"])
    from data.indexed import IndexedReader
    readers = [(IndexedReader(os.path.join(cfg.output_dir, p)), n) for p, n in meta["shards"]["train"]]
    expected = [np.array(r.get(i)[0]) for r, n in readers for i in range(n)]
    got = [np.array(stream.readers[0].get(i)[0]) for i in range(len(expected))]
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    blended = TokenStream([cfg.output_dir, cfg.output_dir], 128, weights=[1.0, 1.0])  # data.blend of a shard dir
    tokens, _ = blended.take(4)
    assert tokens.shape == (4, 128)


def test_jsonl_byte_ranges_read_every_line_once(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [f"document {i} " + "x" * (i * 37 % 200) for i in range(60)])
    size = os.path.getsize(path)
    for step in (1, 97, 500, size):
        shards = [Shard(0, 0, path, "bytes", lo, min(size, lo + step), 0.0) for lo in range(0, size, step)]
        texts = [d.text for sh in shards for d in read_shard(sh, "text", 0.0)]
        assert texts == [d.text for d in read_jsonl(path, "text")]


def _add_batches(index_dir, start, q):
    try:
        cfg = DedupConfig(index_dir=index_dir)
        for i in range(6):
            DedupIndex(cfg, index_dir).add(sign_batch([SOTU[start + i]], cfg), dump=start + i)
        q.put("ok")
    except Exception as e:  # reported to the test
        q.put(repr(e))


def test_two_writers_share_a_dedup_index(tmp_path):
    index_dir = str(tmp_path / "idx")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_add_batches, args=(index_dir, s, q)) for s in (0, 10)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(q.get() for _ in procs) == ["ok", "ok"]
    assert len(DedupIndex(DedupConfig(index_dir=index_dir), index_dir).shards) == 12
    assert not [n for n in os.listdir(index_dir) if n.endswith(".tmp")]


def test_index_dir_dedups_against_an_earlier_preparation(tmp_path, corpus):
    dedup = DedupConfig(index_dir=str(tmp_path / "idx"))
    first = prepare(_cfg(tmp_path / "one", corpus[:1]), dedup, quiet=True)
    assert first["dumps"][0]["kept"] == 16
    second = prepare(_cfg(tmp_path / "two", corpus[1:]), dedup, quiet=True)
    assert second["dumps"][0]["kept"] == 6  # the exact and edited copies of the first run's documents are gone


def test_slurm_dry_run_prints_one_array_per_stage(tmp_path, corpus, capsys):
    from trainer.prepare import main
    rc = main(["--set", f"data.dumps=[{corpus[0]},{corpus[1]}]", f"data.output_dir={tmp_path}", "data.shard_mb=0.15",
               "--slurm", "--tasks", "3", "--partition", "cpu", "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and [ln.split("--job-name=prepare-")[1].split()[0] for ln in lines] == \
        ["sign", "buckets", "clusters", "tokenizer", "tokenize", "finalize"]
    assert all("--partition=cpu" in ln and "slurm/prepare.sbatch" in ln for ln in lines)
    assert "--array=0-2" in lines[0] and "--array=0-0" in lines[2]  # 3 tasks over the shards; one global task


def test_task_killed_mid_stage_resumes_with_the_same_bytes(tmp_path, corpus):
    """A real SIGKILL of an array task after its first unit: the rerun redoes only the unfinished units."""
    import signal
    import subprocess
    import sys
    import time

    from data.tasks import read_marker
    cfg = _cfg(tmp_path / "killed", corpus, shard_mb=0.05)
    out = plan(cfg, DedupConfig())
    ctx = load_context(out)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.prepare", "--run-task", "sign", "--out", out,
                             "--task", "0", "--tasks", "1"], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while read_marker(ctx, "sign", 0) is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {u for u in range(len(ctx.shards)) if read_marker(ctx, "sign", u) is not None}
    assert 0 in done
    _, ex = _run(cfg, DedupConfig(), 2)
    assert ex.ran["sign"] == sorted(set(range(len(ctx.shards))) - done)
    assert not [n for n in os.listdir(ctx.work("sign")) if n.endswith(".tmp")]
    clean = _cfg(tmp_path / "clean", corpus, shard_mb=0.05)
    _run(clean, DedupConfig(), 1)
    assert _prepared_bytes(out) == _prepared_bytes(clean.output_dir)
