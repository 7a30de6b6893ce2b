"""A throwaway single-host Slurm with two emulated nodes, for the launch tests.

Debian's slurm-wlm runs several slurmd on one host when each has its own NodeName and port
(`slurmd -N n1` on 17001, `-N n2` on 17002; %n in the spool/pid/log paths). Nothing is started
by the package (no systemd here), so this module writes a slurm.conf into a scratch directory,
starts munged (unless one already answers), slurmctld and the two slurmd, adds `n1 n2` to
/etc/hosts so torchrun's rendezvous resolves the node names, and undoes all of it in `stop()`:
daemons are stopped by the PIDs this module started, /etc/hosts is restored byte for byte. Two settings keep the tests fast: cred_expire=5 (a requeued
job waits that long instead of 120 s before it may start again) and sched_interval=2.
Clients find the cluster through SLURM_CONF (`cluster.env`), never /etc/slurm.

Manual use: `python -m tests.e2e.slurm_cluster up DIR` (prints the export line) and
`python -m tests.e2e.slurm_cluster down DIR`.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

NODES = {"n1": 17001, "n2": 17002}
CTLD_PORT = 16817
HOSTS_LINE = "127.0.0.1 n1 n2  # moepipe-test-slurm\n"


class SlurmUnavailable(RuntimeError):
    """slurm-wlm is missing and cannot be installed here (not root, no apt, no network)."""


def ensure_installed(timeout: float = 300) -> None:
    """apt-get install slurm-wlm when slurmctld is missing; needs root and Debian's mirrors."""
    if shutil.which("slurmctld") and shutil.which("sbatch") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm is not installed and this is not root with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=timeout)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0 or not shutil.which("slurmctld"):
        raise SlurmUnavailable(f"apt-get install slurm-wlm failed: {res.stderr.strip()[-300:]}")


def slurm_conf(root: str, host: str, cpus: int) -> str:
    nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} "
                      f"RealMemory=2000 State=UNKNOWN" for n, p in NODES.items())
    return f"""ClusterName=moepipetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class SlurmCluster:
    """start() -> submit with `env` -> stop(); also a context manager."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self._pids: list[int] = []
        self._hosts_backup: str | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "SlurmCluster":
        ensure_installed()
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        with open(self.conf, "w") as f:
            f.write(slurm_conf(self.root, socket.gethostname(), max(2, os.cpu_count() or 2)))
        try:
            self._add_hosts()
            self._start_munge()
            self._daemon(["slurmctld", "-c", "-f", self.conf], "slurmctld.pid")
            for node in NODES:
                self._daemon(["slurmd", "-N", node, "-f", self.conf], f"slurmd-{node}.pid")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for pid in reversed(self._pids):
            _kill(pid)
        self._pids.clear()
        if self._hosts_backup is not None:
            with open("/etc/hosts", "w") as f:  # in place: /etc/hosts may be a bind mount
                f.write(self._hosts_backup)
            self._hosts_backup = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _add_hosts(self) -> None:
        with open("/etc/hosts") as f:
            text = f.read()
        self._hosts_backup = text
        with open("/etc/hosts", "a") as f:
            f.write(("" if text.endswith("\n") else "\n") + HOSTS_LINE)

    def _start_munge(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # a munged is already serving this host; leave it alone
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        pidfile = "/run/munge/munged.pid"
        subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True, capture_output=True)
        self._pids.append(_read_pid(pidfile, 10))

    def _daemon(self, cmd: list[str], pidfile: str) -> None:
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
        self._pids.append(_read_pid(os.path.join(self.root, pidfile), 15))

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if set(states) == set(NODES) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes did not become idle in {timeout:.0f}s: {out!r}; see {self.root}/*.log")

    # -- clients ---------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, **kw)

    def sbatch(self, args: list[str], cwd: str) -> str:
        res = self.run(["sbatch", "--parsable", *args], check=False, cwd=cwd)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch failed: {res.stderr.strip()}")
        return res.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def wait(self, job_id: str, until, timeout: float, poll: float = 0.5) -> dict:
        """Poll until `until(job_dict)` holds; raises TimeoutError with the last state."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info and until(info):
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id}: condition not met in {timeout:.0f}s; last state {info}")


def _read_pid(path: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            time.sleep(0.1)
    raise RuntimeError(f"no pid file {path} after {timeout:.0f}s")


def _kill(pid: int, timeout: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: python -m tests.e2e.slurm_cluster up|down DIR", file=sys.stderr)
        return 2
    cluster = SlurmCluster(argv[1])
    if argv[0] == "up":
        cluster.start()
        with open(os.path.join(cluster.root, "pids"), "w") as f:
            f.write(" ".join(map(str, cluster._pids)) + "\n" + (cluster._hosts_backup or ""))
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    with open(os.path.join(cluster.root, "pids")) as f:
        pids, _, hosts = f.read().partition("\n")
    cluster._pids, cluster._hosts_backup = [int(p) for p in pids.split()], hosts
    cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
