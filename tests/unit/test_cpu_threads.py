"""The CPU thread count follows the cores a run may really use (trainer/cpu_threads.py)."""
from trainer.cpu_threads import CpuShare, cgroup_quota, choose_threads


def test_idle_machine_uses_every_core_of_the_affinity_mask():
    assert choose_threads(CpuShare(affinity=8, quota=None, load=0.1, local_ranks=1), None)[0] == 8


def test_busy_cores_quota_and_local_ranks_each_lower_the_count():
    threads, why = choose_threads(CpuShare(affinity=2, quota=None, load=1.9, local_ranks=1), None)
    assert threads == 1 and "load 1.9" in why
    threads, why = choose_threads(CpuShare(affinity=64, quota=6.0, load=0.0, local_ranks=1), None)
    assert threads == 6 and "cgroup quota 6" in why
    threads, why = choose_threads(CpuShare(affinity=16, quota=None, load=0.0, local_ranks=4), None)
    assert threads == 4 and "4 local ranks" in why
    assert choose_threads(CpuShare(affinity=2, quota=None, load=0.0, local_ranks=4), None)[0] == 1


def test_omp_num_threads_wins():
    threads, why = choose_threads(CpuShare(affinity=2, quota=None, load=5.0, local_ranks=1), "3")
    assert threads == 3 and why == "OMP_NUM_THREADS=3"


def test_cgroup_v2_and_v1_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(str(tmp_path)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(str(v1)) == 2.0
