"""benchmarks/bench_fp8.py keeps working between GPU runs: its whole CPU path runs here.

On CPU, PyTorch has tensorwise and rowwise `_scaled_mm` and `_grouped_mm` but neither the
block-wise scaled_mm nor `_scaled_grouped_mm`: those cells must read n/a while the rest are
numbers, and the end-to-end table must hold one BF16 row and one FP8 row (emulate backend).
"""
import re
import sys

import pytest
import torch

sys.path.insert(0, "benchmarks")
import bench_fp8  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.plan.flops import param_counts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NUMBER = re.compile(r"^\d+(\.\d+)?(e-?\d+)?x?$")


def table(text: str, title: str) -> list[dict]:
    """The markdown table printed after the line starting with `title`, as dicts."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    while not lines[i].startswith("|"):
        i += 1
    rows = []
    while i < len(lines) and lines[i].startswith("|"):
        rows, i = rows + [lines[i]], i + 1
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows if not r.startswith("|---")]
    return [dict(zip(cells[0], r)) for r in cells[1:]]


def test_script_runs_on_cpu_kernels(capsys):
    assert bench_fp8.main(["--device", "cpu", "--no-compile", "--model-config", "configs/tiny.yaml",
                           "--set", "data.seq_len=32", "model.max_seq_len=32", "train.micro_batch_size=1",
                           "model.vocab_size=512", "data.tokenizer=bpe:512"]) == 0
    out = capsys.readouterr().out
    gemm = table(out, "Dense GEMM")
    assert len(gemm) == 1
    for key in ("bf16", "fp8 tensorwise", "fp8 rowwise", "fp8 rowwise / bf16"):
        assert NUMBER.match(gemm[0][key]), (key, gemm[0][key])
    grouped = table(out, "Grouped expert GEMM")
    for key in ("bf16 loop", "bf16 _grouped_mm", "fp8 loop rowwise"):
        assert NUMBER.match(grouped[0][key]), (key, grouped[0][key])
    assert gemm[0]["fp8 blockwise+quant"] == "n/a" and grouped[0]["fp8 _scaled_grouped_mm"] == "n/a"
    steps = table(out, "Forward + backward")
    assert [(r["precision"], r["backend"], r["mode"]) for r in steps] == [("bf16", "-", "eager"),
                                                                         ("fp8", "emulate", "eager")]
    assert all(float(r["tokens/s"]) > 0 and r["MFU (bf16 peak)"] == "n/a" for r in steps)


def test_without_cuda_the_gpu_run_skips_cleanly(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench_fp8.main([]) == 0
    assert "no CUDA, skipping" in capsys.readouterr().out


def test_end_to_end_model_is_the_documented_size():
    c = param_counts(load_config(bench_fp8.MODEL_CONFIG))
    assert round(c["main_total"] / 1e9, 1) == 2.0 and round(c["mtp_total"] / 1e9, 1) == 0.6
    assert round((c["main_activated"] + c["mtp_activated"]) / 1e9, 2) == 0.56
