"""The pure parts of slurm/*.sbatch and slurm/lib.sh: syntax, head-node parsing, exit-code policy."""
from __future__ import annotations

import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLURM = os.path.join(REPO, "slurm")
BASH = "/bin/bash"


def bash(script: str, path: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `script` after sourcing slurm/lib.sh with PATH=path (so scontrol can be hidden or faked)."""
    full = f"source {SLURM}/lib.sh\n{script}"
    return subprocess.run([BASH, "-c", full], capture_output=True, text=True,
                          env={"PATH": path, "HOME": "/tmp", **(env or {})}, timeout=30)


@pytest.mark.parametrize("name", ["train.sbatch", "sweep.sbatch", "lib.sh"])
def test_scripts_parse(name):
    res = subprocess.run([BASH, "-n", os.path.join(SLURM, name)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("nodelist, head", [
    ("n1", "n1"), ("n[1-2]", "n1"), ("node[003-005,007],gpu1", "node003"), ("gpu1,n[1-2]", "gpu1"),
    ("a-[01-04]-ib,b1", "a-01-ib"), ("n[7,3-4]", "n7"), ("x.y.z", "x.y.z"),
])
def test_head_node_without_scontrol(tmp_path, nodelist, head):
    res = bash(f'moepipe_head_node "{nodelist}"', str(tmp_path))  # empty PATH dir: no scontrol
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == head


def fake_scontrol(tmp_path) -> str:
    """A scontrol that expands any hostlist to 'fake0 fake1' and records requeue calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "scontrol"
    script.write_text(f"#!{BASH}\necho \"$*\" >> {tmp_path}/calls\n"
                      "if [[ $1 == show ]]; then printf 'fake0\\nfake1\\n'; fi\n")
    script.chmod(0o755)
    os.symlink("/usr/bin/head", bindir / "head")
    os.symlink("/bin/date", bindir / "date")
    return str(bindir)


def test_head_node_prefers_scontrol(tmp_path):
    res = bash('moepipe_head_node "n[1-2]"', fake_scontrol(tmp_path))
    assert res.stdout.strip() == "fake0"


@pytest.mark.parametrize("rc, preempted, expect_rc, requeued, message", [
    (0, "", 0, False, "training finished"),
    (75, "", 75, True, "preempted (exit 75)"),
    (1, "USR1", 75, True, "preempted (exit 1)"),  # torchrun reports the signal, not the workers' 75
    (1, "", 75, True, "a rank exited with code 1 at step 0"),  # a crash: requeued
    (2, "", 2, False, "FAILED: the trainer rejected its input"),
])
def test_exit_code_policy(tmp_path, rc, preempted, expect_rc, requeued, message):
    path = fake_scontrol(tmp_path)
    res = bash(f"MOEPIPE_PREEMPTED={preempted}; moepipe_finish {rc}", path,
               {"SLURM_JOB_ID": "42", "MOEPIPE_PROGRESS_FILE": str(tmp_path / "job.progress")})
    assert res.returncode == expect_rc, res.stdout + res.stderr
    assert message in res.stdout
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    assert ("requeue 42" in calls) == requeued


def test_crash_requeues_stop_when_no_progress_is_made(tmp_path):
    """A crash is requeued; two crash-requeues in a row that reach no step beyond the best so far end
    the job; progress resets the count; a rejected input (marker file) is never requeued."""
    path, progress = fake_scontrol(tmp_path), tmp_path / "job.progress"
    env = {"SLURM_JOB_ID": "42", "MOEPIPE_PROGRESS_FILE": str(progress)}

    def crash(step: int | None) -> subprocess.CompletedProcess:
        if step is not None:
            progress.write_text(f"{step}\n")
        return bash("MOEPIPE_PREEMPTED=; moepipe_finish 1", path, env)

    assert crash(5).returncode == 75           # first crash, progress 5: requeue
    assert crash(9).returncode == 75           # got further: requeue, count reset
    assert crash(9).returncode == 75           # no progress: 1 of 2
    res = crash(None)                          # still 9: 2 of 2, give up
    assert res.returncode == 1 and "2 requeues in a row got no further than step 9" in res.stdout
    assert (tmp_path / "calls").read_text().count("requeue 42") == 3
    (tmp_path / "job.progress.user_error").touch()
    res = crash(20)
    assert res.returncode == 1 and "rejected its input" in res.stdout


def test_signal_is_forwarded_once(tmp_path):
    res = bash("sleep 30 & MOEPIPE_SRUN_PID=$!; trap 'moepipe_forward_signal USR1' USR1\n"
               "moepipe_forward_signal TERM; moepipe_forward_signal USR1; wait $MOEPIPE_SRUN_PID; "
               "echo rc=$? flag=$MOEPIPE_PREEMPTED", "/bin:/usr/bin")
    assert res.stdout.count("asking the trainer to checkpoint") == 1
    assert "rc=138 flag=TERM" in res.stdout  # the stand-in for srun got USR1 (128 + 10)


def test_sbatch_headers_and_usage_errors(tmp_path):
    with open(os.path.join(SLURM, "train.sbatch")) as f:
        text = f.read()
    for directive in ("--signal=B:USR1@", "--requeue", "--open-mode=append", "--output=logs/%x-%j.out"):
        assert f"#SBATCH {directive}" in text
    res = subprocess.run([BASH, os.path.join(SLURM, "train.sbatch")], capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr
    res = subprocess.run([BASH, os.path.join(SLURM, "sweep.sbatch"), "x.yaml"], capture_output=True, text=True,
                         env={"PATH": "/bin:/usr/bin"})
    assert res.returncode == 2 and "usage" in res.stderr
