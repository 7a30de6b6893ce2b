"""python -m trainer.plan: the DeepSeek-V3 layout on 2,048 H800s, bad input lines, the table."""
import pytest

from trainer.config import load_config
from trainer.plan.cli import main
from trainer.plan.hardware import GIB, gpu_kind
from trainer.plan.layouts import Cluster, plan

V3 = "configs/deepseek_v3_671b.yaml"


def test_deepseek_v3_layout_fits_in_80gb_and_ranks_near_the_top(capsys):
    """DeepSeek-V3 section 3.1: 2,048 H800 (8 per node), PP 16, EP 64 over 8 nodes, ZeRO-1 DP,
    DualPipe, seq 4096, global batch 15,360. With `parallel.overlap` on, paired 1F1B / ZB1P hide
    their all-to-alls too, so the planner ranks some smaller-ep layouts ahead of it: a pp 16
    DualPipe layout is in the top 5, and DeepSeek's own is within 15% of the best step."""
    cfg = load_config(V3)
    ranked, failed, _ = plan(cfg, Cluster(2048, 8, gpu_kind("h800"), 4096, 15360), top=20)
    keys = [e.cand.key for e in ranked]
    assert any(k[0] == 16 and k[3] == "dualpipe" for k in keys[:5]), keys[:5]
    assert (16, 128, 64, "dualpipe") in keys, keys
    v3 = ranked[keys.index((16, 128, 64, "dualpipe"))]
    assert v3.step_s <= 1.15 * ranked[0].step_s, (v3.step_s, ranked[0].step_s)
    assert v3.fits and v3.total <= 80 * GIB
    assert [len(b) for b in v3.cand.layout] != [4] * 16 and sum(len(b) for b in v3.cand.layout) == 61
    assert v3.memory["weights"] > 0 and v3.memory["activations"] > 0 and 0 < v3.mfu < 1
    assert all(not e.fits and "GiB >" in e.reason() for e in failed)


def test_overlap_off_prices_every_all_to_all_and_holds_fewer_activations():
    cfg = load_config(V3)
    cl = Cluster(2048, 8, gpu_kind("h800"), 4096, 15360)
    on = {e.cand.key: e for e in plan(cfg, cl, top=8)[0]}
    off = {e.cand.key: e for e in plan(load_config(V3, ["parallel.overlap=off"]), cl, top=8)[0]}
    both = [k for k in on if k in off and k[3] in ("1f1b", "zb1p")]
    assert both, (list(on), list(off))
    for k in both:
        assert on[k].step_s < off[k].step_s, k
        assert on[k].memory["activations"] > off[k].memory["activations"], k


def test_256_h100_says_which_fit_and_why_the_others_do_not(capsys):
    assert main([V3, "--gpus", "256", "--gpu", "h100", "--global-batch", "1920", "--top", "3"]) == 0
    short = capsys.readouterr().out
    assert "layouts do not fit; --why lists each" in short and "GiB >" not in short
    assert main([V3, "--gpus", "256", "--gpu", "h100", "--global-batch", "1920", "--top", "3", "--why"]) == 0
    out = capsys.readouterr().out
    assert "layouts fit" in out and "do not fit" in out and "--set parallel.pp=" in out
    reasons = [line for line in out.splitlines() if line.startswith("  pp ") and "GiB >" in line]
    assert reasons and all(("alone need" in r) or ("activations" in r) for r in reasons)


@pytest.mark.parametrize("args, expect", [
    (["--gpus", "64", "--gpu", "a100", "--global-batch", "64"], "--gpu a100: not in the hardware table; use one of h800"),
    (["--gpus", "12", "--gpu", "h100", "--global-batch", "64"], "--gpus 12: whole nodes of --gpus-per-node 8"),
    (["--gpus", "64", "--gpu", "h100", "--global-batch", "1001"], "--global-batch 1001: no data-parallel degree"),
])
def test_bad_input_is_one_line_naming_value_and_fix(capsys, args, expect):
    assert main(["configs/tiny.yaml", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + expect) and "\n" not in err
    assert "use " in err


def test_tiny_plan_on_one_node_and_png(tmp_path, capsys):
    png = tmp_path / "mem.png"
    assert main(["configs/tiny.yaml", "--gpus", "8", "--gpu", "h200", "--seq", "256", "--global-batch", "64",
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "  1 " in out and png.stat().st_size > 1000


def test_run_in_tokens_is_timed_with_its_batch_ramp(capsys):
    """A run stated in tokens: the global batch defaults to the schedule's largest, and the whole
    run is timed on the top layouts, ramp included: more steps than at the constant batch, and
    at least as many GPU-hours (small batches run the pipeline less full)."""
    ramp = ("schedule.phases={train.global_batch: [{until_tokens: 200M, from: 16, to: 64}, "
            "{until_tokens: 1B, value: 64}]}")
    assert main(["configs/tiny.yaml", "--gpus", "8", "--gpu", "h200", "--seq", "256", "--top", "2",
                 "--run-layouts", "1", "--set", "train.steps=0", "train.tokens=1B", ramp]) == 0
    out = capsys.readouterr().out
    assert "global batch 64 sequences" in out and "the whole run (1B tokens" in out
    line = next(x for x in out.splitlines() if x.startswith("  1 pp ") and "GPU-hours" in x)
    flat = next(x for x in out.splitlines() if "at a constant 64 sequences" in x)
    steps = lambda text: int(text.split(" steps")[0].split()[-1].replace(",", ""))  # noqa: E731
    hours = lambda text: float(text.split(" H200 GPU-hours")[0].split()[-1].replace(",", ""))  # noqa: E731
    assert steps(line) > steps(flat) == -(-10**9 // (64 * 256))
    assert hours(line) >= hours(flat) > 0
    assert "2.664M H800 GPU-hours" in out


def test_plan_needs_a_global_batch_when_the_config_has_none(capsys):
    assert main(["configs/tiny.yaml", "--gpus", "8", "--gpu", "h200"]) == 2
    assert "--global-batch: needed" in capsys.readouterr().err


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev", "zb1p"])
def test_run_time_between_two_replays_equals_replaying_every_count(schedule):
    """The step time is affine in the micro-batch count past the pipeline's fill: the run timed
    from the smallest and the largest count's replays equals the run with every count replayed."""
    import dataclasses

    from trainer.plan.layouts import memory
    from trainer.plan.run_time import run_time
    ramp = ("schedule.phases={train.global_batch: [{until_tokens: 50M, from: 16, to: 64}, "
            "{until_tokens: 100M, value: 64}]}")
    cfg = load_config("configs/tiny.yaml", ["train.steps=0", "train.tokens=100M", "data.seq_len=256", ramp,
                                            "parallel.pp=2", f"parallel.schedule={schedule}"])
    cl = Cluster(8, 8, gpu_kind("h100"), 256, 64)
    ranked, _, _ = plan(cfg, cl, top=50)
    est = next(e for e in ranked if e.cand.pp == 2 and e.cand.schedule == schedule)
    est = memory(cfg, dataclasses.replace(est.cand, micro_batch=1, num_micro=16), cl)
    fast, exact = run_time(cfg, est, cl), run_time(cfg, est, cl, exact=True)
    assert len(exact.micro_counts) > 3 and fast.steps == exact.steps
    assert fast.seconds == pytest.approx(exact.seconds, rel=1e-3)
