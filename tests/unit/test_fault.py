"""The hang watchdog's parts without a cluster: the one-line diagnosis from heartbeats, the
heartbeat's bookkeeping, the straggler report, and a watchdog that fires in a real process
(stack dump, diagnosis file, exit code 75)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from parallel import straggler
from parallel.fault import FaultConfig, collective_environment, process_group_timeout_s
from parallel.heartbeat import Heartbeat
from parallel.watchdog import BeatBoard, diagnose, rank_list

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOW = 1000.0


def beat(rank, step, phase="forward_backward", collective=None, seq=None, age=0.0):
    return {"rank": rank, "world": 4, "step": step, "phase": phase, "collective": collective, "seq": seq,
            "count": 1, "host": "h", "pid": 1, "time": NOW - age}


def test_rank_list_compresses_runs():
    assert rank_list([3, 0, 1, 2, 5, 7, 8]) == "0-3,5,7,8"
    assert rank_list([2]) == "2"


def test_a_silent_rank_is_named_with_the_collective_the_others_wait_in():
    beats = {0: beat(0, 118, collective="all_to_all", seq=3), 1: beat(1, 118, collective="all_to_all", seq=3),
             2: beat(2, 118, age=42.0), 3: beat(3, 118, collective="all_to_all", seq=3)}
    line = diagnose(beats, 4, NOW, stale_after=5.0)
    assert line.startswith("rank 2 of 4 never entered all_to_all #3 of step 118 (silent for 42 s, last seen in "
                           "forward_backward of step 118: stopped or dead)")
    assert line.endswith("; ranks 0,1,3 wait in it")


def test_a_live_rank_that_never_arrives_and_a_missing_beat():
    beats = {0: beat(0, 7, collective="all_reduce", seq=1), 1: beat(1, 7, phase="optimizer"), 2: None,
             3: beat(3, 7, collective="all_reduce", seq=1)}
    line = diagnose(beats, 4, NOW, stale_after=5.0)
    assert "rank 1 of 4 never entered all_reduce #1 of step 7 (still in optimizer of step 7)" in line
    assert "rank 2 of 4 never entered all_reduce #1 of step 7 (no heartbeat at all" in line
    assert line.endswith("ranks 0,3 wait in it")


def test_a_rank_in_another_collective_is_named_with_it():
    beats = {r: beat(r, 5, collective="all_to_all", seq=2) for r in range(3)}
    beats[3] = beat(3, 5, collective="all_reduce", seq=1)
    line = diagnose(beats, 4, NOW, stale_after=5.0)
    assert "rank 3 of 4 waits in all_reduce #1 of step 5 instead of all_to_all #2 of step 5" in line
    assert "no rank" not in line
    beats[2], beats[3]["peers"] = beat(2, 5, age=30.0), [2, 3]  # rank 3 waits with rank 2, which is silent
    line = diagnose(beats, 4, NOW, stale_after=5.0)
    assert "rank 3 of 4 waits in all_reduce #1 of step 5 (its group: ranks 2,3) instead of all_to_all #2" in line
    assert "rank 2 of 4 never entered all_to_all #2 of step 5 (silent for 30 s" in line


def test_no_collective_at_all():
    beats = {0: beat(0, 9, phase="checkpoint"), 1: beat(1, 9, phase="checkpoint", age=60)}
    line = diagnose({**beats, 2: beat(2, 9, phase="checkpoint"), 3: beat(3, 9, phase="checkpoint")}, 4, NOW, 5.0)
    assert line.startswith("no progress and no rank inside a collective: rank 1 of 4 silent")
    assert "ranks 0,2,3 of 4 in checkpoint of step 9" in line


def test_heartbeat_numbers_collectives_per_step_and_splits_time():
    clock = iter(float(t) for t in range(100)).__next__
    hb = Heartbeat(1, 4, clock=clock)
    hb.begin_step(118)               # t=1: data
    hb.set_phase("forward_backward")  # t=2: 1 s of data
    for _ in range(3):
        token = hb.enter("all_to_all")
        assert hb.where() == f"all_to_all #{token[1]} of step 118"
        hb.leave(token)              # 1 s in each
    assert hb.where() == "forward_backward of step 118" and hb.seqs == {"all_to_all": 3}
    hb.begin_step(119)
    assert hb.enter("all_to_all") == ("all_to_all", 1)
    assert hb.enter("all_reduce") is None  # nested: the outer one names the wait
    window = hb.take_window()
    assert window == {"data": 2.0, "comm": 3.0}  # 1 s in step 118, 1 s in step 119 before its collective


def test_straggler_report_names_the_busiest_rank():
    per_rank = [straggler.split(1.0, 0.7, 0.0), straggler.split(1.0, 0.7, 0.0), straggler.split(1.0, 0.05, 0.05),
                straggler.split(1.0, 0.72, 0.0)]
    row, line = straggler.report(per_rank, ratio=1.5)
    assert row["straggler_rank"] == 2 and row["straggler_ratio"] == pytest.approx(0.95 / 0.3, rel=1e-6)
    assert row["rank_comm_s"] == [0.7, 0.7, 0.05, 0.72]
    assert line.startswith("straggler: rank 2 of 4 is busy 0.950 s per step, 3.17x the median rank")
    _, quiet = straggler.report([straggler.split(1.0, 0.5, 0.0)] * 4, ratio=1.5)
    assert quiet is None


def test_fault_config_validation_and_process_group_timeout():
    assert process_group_timeout_s(FaultConfig(hang_seconds=5)) == 600
    assert process_group_timeout_s(FaultConfig(hang_seconds=900)) == 1800
    with pytest.raises(ValueError, match="hang_seconds"):
        FaultConfig(hang_seconds=-1)
    with pytest.raises(ValueError, match="straggler_ratio"):
        FaultConfig(straggler_ratio=0.5)
    with pytest.raises(ValueError, match="heartbeat_seconds"):
        FaultConfig(hang_seconds=3, heartbeat_seconds=2)
    assert "TORCH_NCCL_DUMP_ON_TIMEOUT" in collective_environment("/x/hang", cuda=True)
    assert "TORCH_NCCL_DUMP_ON_TIMEOUT" not in collective_environment("/x/hang", cuda=False)


WATCHDOG_SCRIPT = """
import sys, time, threading
from parallel.heartbeat import Heartbeat
from parallel.watchdog import Watchdog
hb = Heartbeat(0, 2)
hb.begin_step(2)
hb.end_step()  # the watchdog arms after one finished step
hb.begin_step(3)
hb.set_phase("forward_backward")
hb.enter("all_to_all")
Watchdog(hb, sys.argv[1], hang_seconds=1.0, exit_code=75, interval=0.2).start()
threading.Event().wait(60)  # the training thread, stuck
sys.exit(3)
"""


def test_watchdog_fires_dumps_stacks_names_the_silent_rank_and_exits_75(tmp_path):
    root = str(tmp_path / "hang")
    board = BeatBoard(root, 2)
    board.publish({**beat(1, 3, phase="data"), "world": 2, "time": time.time() - 30})  # rank 1: silent
    p = subprocess.run([sys.executable, "-c", WATCHDOG_SCRIPT, root], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert p.returncode == 75, p.stderr
    with open(os.path.join(root, "diagnosis.txt")) as f:
        line = f.read()
    assert line.startswith("rank 1 of 2 never entered all_to_all #1 of step 3 (silent for")
    assert line.strip().endswith("rank 0 waits in it")
    with open(os.path.join(root, "rank_0.txt")) as f:
        stacks = f.read()
    assert "no progress for 1 s" in stacks and "Thread" in stacks and "<string>" in stacks
    with open(board.path(0)) as f:
        assert json.load(f)["collective"] == "all_to_all"


def test_the_monitor_of_a_bare_run_does_nothing_at_step_ends():
    from trainer.diagnostics import Monitor
    mon = Monitor.off()
    mon.begin_step(10)
    mon.phase("forward_backward")
    assert mon.end_step(10, 0.1) == {} and mon.beat.steps_done == 1
    mon.close()


def test_fault_specs_are_checked():
    from trainer.diagnostics import parse_fault
    assert parse_fault("slow:1:0.5") == ("slow", 1, 0.5)
    for bad in ("hang:1:2", "stop:2", "stop:x:3", "stop:1:2:3"):
        with pytest.raises(ValueError, match="MOEPIPE_FAULT"):
            parse_fault(bad)
