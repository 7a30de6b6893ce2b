"""benchmarks/gpu_check.sh --cpu: the GPU check's plumbing (steps, limits, logs, tables, summary)
runs at tiny sizes on the CPU, so the script is known to work when a GPU session runs it."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_cpu_dry_path(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    res = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--cpu", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == ["tests", "bench_model", "bench_fp8"], summary
    assert res.returncode == 0, (summary, res.stdout[-2000:], res.stderr[-2000:])
    assert "| micro | moepipe |" in (tmp_path / "bench_model.md").read_text()
    assert "Grouped expert GEMM" in (tmp_path / "bench_fp8.md").read_text()
