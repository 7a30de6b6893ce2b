"""benchmarks/gpu_check.sh: `--plan` keeps the CUDA step limits within 8 minutes, and `--cpu` runs
the same steps at tiny sizes on the CPU (steps, limits, unbuffered logs packed into one archive,
rows appended to OUT as measured, at most 8 files), so the script is known to work when a GPU
session runs it."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = ["env", "model_b1", "fp8_e2e", "device_step", "tests", "model_medium"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


def test_plan_lists_the_steps_by_value_within_eight_minutes():
    res = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--plan"], env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    steps = [line.split()[0] for line in lines[:-1]]
    assert [s for s in steps if s != "wheels"] == STEPS
    limits = [int(line.split()[1].rstrip("s")) for line in lines[:-1]]
    assert sum(limits) <= 480 and lines[-1] == f"total {sum(limits)}s of a 480s budget"
    assert "--size b1" in lines[steps.index("model_b1")]


def test_gpu_check_cpu_dry_path(tmp_path):
    res = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--cpu", str(tmp_path)],
                         env=_env(), capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == STEPS, summary
    assert res.returncode == 0, (summary, res.stdout[-2000:], res.stderr[-2000:])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["bench_fp8.md", "bench_model.md", "device_step.md", "env.txt", "logs.tar.gz", "summary.txt"]
    assert (tmp_path / "env.txt").read_text().startswith("torch ")
    model = (tmp_path / "bench_model.md").read_text()
    assert "| micro | moepipe |" in model and "| micro | eager |" in model and "| MFU |" in model
    assert "Grouped expert GEMM" in (tmp_path / "bench_fp8.md").read_text()
    assert "| cpu | gloo | auto |" in (tmp_path / "device_step.md").read_text()
