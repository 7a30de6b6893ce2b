"""trainer.train with pipeline parallelism (parallel.pp = 2, real gloo ranks) equals one process.

The single-process run takes train.grad_accum = 4 micro-batches of 1 sequence per step; the
pipeline runs the same 4 micro-batches through its schedule (every pp rank reads the same
stream). Losses, balance loss and MaxVio (from the router-bias update's expert loads) agree to
float rounding (measured <= 3e-8 relative). The grad norm is compared at rel 2e-5 (measured
<= 2.3e-6): the single-process path takes torch's fp32 `get_total_norm`, ZeRO-1 sums squares
in float64. A norm that counted the head stage's MTP embedding copy (1F1B, ZB1P) or DualPipe's
second model copy twice would be off by percents.
"""
import os

import pytest

from tests.e2e.test_train import TINY, copy_checkpoint, losses, one_process, overrides, ranks

# a 512-token BPE keeps the output head (and each launch) small
ARGS = ["train.steps=3", "data.seq_len=64", "model.max_seq_len=64", "train.micro_batch_size=1",
        "train.grad_accum=4", "logging.every=1", "data.tokenizer=bpe:512", "model.vocab_size=512"]
KEYS = ("loss", "lm_loss", "mtp_loss", "balance_loss", "maxvio")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pp_data"))


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """The single-process run (it also prepares the data for the multi-rank runs); its directory
    holds a checkpoint of every step."""
    out = str(tmp_path_factory.mktemp("pp_ref"))
    one_process(overrides(data_root, out, *ARGS, "checkpoint.every=1", "checkpoint.keep_last=5"))
    return out


def pipeline_run(data_root, out, schedule, *extra, nproc=2):
    ranks(nproc, overrides(data_root, out, *ARGS, "parallel.pp=2", f"parallel.schedule={schedule}", *extra))
    return losses(out)


def assert_matches(ref, got, steps=(1, 2, 3)):
    assert sorted(got) == list(steps)
    for step in steps:
        for key in KEYS:
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-6, abs=1e-9), (step, key)
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=2e-5), step


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe"])
def test_pipeline_steps_equal_one_process(data_root, reference, tmp_path, schedule):
    got = pipeline_run(data_root, str(tmp_path / schedule), schedule, "checkpoint.every=0")
    assert_matches(losses(reference), got)


def test_dualpipev_equals_one_process_and_resumes_at_any_layout(data_root, reference, tmp_path):
    """DualPipeV (embedding, head and MTP all on rank 0) matches one process; its checkpoint of
    step 1 (DCP, single-process names) resumes at pp = 2 with identical steps 2 and 3 and in one
    process, and the one process's checkpoint of step 1 resumes at pp = 2, both as one process."""
    full, resumed, one, from_one = (str(tmp_path / n) for n in ("full", "resumed", "one", "from_one"))
    ref = losses(reference)
    a = pipeline_run(data_root, full, "dualpipev", "checkpoint.every=1", "checkpoint.keep_last=5")
    assert_matches(ref, a)
    assert os.path.isdir(os.path.join(full, "checkpoints", "step_00000001", "dcp"))
    for out in (resumed, one):
        copy_checkpoint(full, 1, out)
    copy_checkpoint(reference, 1, from_one)
    b = pipeline_run(data_root, resumed, "dualpipev", "checkpoint.every=1", "checkpoint.keep_last=5")
    assert sorted(b) == [2, 3]
    for step in (2, 3):
        for key in (*KEYS, "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
    one_process(overrides(data_root, one, *ARGS, "checkpoint.every=1", "checkpoint.keep_last=5"))
    assert_matches(ref, losses(one), steps=(2, 3))
    c = pipeline_run(data_root, from_one, "dualpipev", "checkpoint.every=1", "checkpoint.keep_last=5")
    assert_matches(ref, c, steps=(2, 3))


def test_pipeline_with_expert_parallel_equals_ep1(data_root, tmp_path):
    """pp = 2 x dp = 2 on 4 ranks, DualPipeV: experts sharded over ep = 2 (all-to-all dispatch,
    F&B pairs overlapped by OverlapPairExecutor) equals replicated experts (ep = 1)."""
    extra = ("checkpoint.every=0", "parallel.ranks_per_node=2")
    one = pipeline_run(data_root, str(tmp_path / "ep1"), "dualpipev", *extra, "parallel.ep=1", nproc=4)
    two = pipeline_run(data_root, str(tmp_path / "ep2"), "dualpipev", *extra, "parallel.ep=2", nproc=4)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in (*KEYS, "grad_norm"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-6, abs=1e-9), (step, key)
    assert two[1]["a2a_intra_node_MB"] > 0


def test_union_model_holds_the_stages_of_a_rank():
    """DualPipeV at pp = 2, rank 0: one model with blocks 0 and 3, the embedding and the head;
    each chunk's linears defer their weight gradients to that chunk's W (head and MTP to chunk 1)."""
    from parallel.pipeline.model_stage import build_union_chunks
    from parallel.pipeline.schedules import build_schedule
    from parallel.pipeline.split import DeferrableLinear
    from trainer.config import load_config
    cfg = load_config(TINY, ["model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=64"])
    model, chunks = build_union_chunks(cfg, build_schedule("dualpipev", 2, 4), 0, [])
    assert model.owned == [0, 3] and model.has_embed and model.has_head
    assert [c.model.owned for c in chunks] == [[0], [3]]
    names = [{n for n, _ in c.named_parameters()} for c in chunks]
    assert "embed.weight" in names[0] and "head.weight" not in names[0] and "layers.3.attn_norm.weight" not in names[0]
    assert {"head.weight", "embed.weight", "layers.3.attn_norm.weight"} <= names[1]
    for name, mod in model.named_modules():
        if isinstance(mod, DeferrableLinear):
            want = chunks[0].deferral if name.startswith("layers.0.") else chunks[1].deferral
            assert mod.deferral is want, name


def test_uneven_layout_trains_equal_to_one_process_and_is_logged(data_root, reference, tmp_path):
    """parallel.layout = [1, 3] (block 0 with the embedding, blocks 1-3 with head and MTP) runs
    the same steps as one process, and the stage -> blocks map is in train.log."""
    out = str(tmp_path / "uneven")
    got = pipeline_run(data_root, out, "1f1b", "checkpoint.every=0", "parallel.layout=[1,3]")
    assert_matches(losses(reference), got)
    with open(os.path.join(out, "train.log")) as f:
        text = f.read()
    assert "stage 0 (rank 0): embedding + block 0\n" in text
    assert "stage 1 (rank 1): blocks 1-3 + norm, head, MTP" in text
