"""A run owns its output directory: `run.lock` holds an exclusive lock naming host and pid.

A second run pointed at the same `train.output_dir` stops with one line naming the holder. The
lock is an OS file lock (`flock`), released by the kernel when its holder dies however it dies,
so a lock file left by a killed run is simply taken over, with a log line naming the dead
holder. Holding the lock is what makes it safe to delete the partial `.tmp-*` checkpoint
directories found at start-up: no live process can still be writing them.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

LOCK_FILE = "run.lock"


class RunDirError(RuntimeError):
    """The output directory cannot be used by this run; the message names the holder or the path."""


def check_output_dir(path: str) -> None:
    """Raise RunDirError when `path` (or a parent) is a file rather than a directory."""
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise RunDirError(f"train.output_dir = {path!r}: {probe} is a file, not a directory; "
                          "choose another train.output_dir")


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}"


class RunDirLock:
    """`acquire()` at start, `release()` at exit (also released by the OS if the process dies)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._file = None

    def acquire(self) -> dict | None:
        """Take the lock; returns the dead previous holder taken over from (None if there was none)."""
        check_output_dir(self.output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(f)
            f.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RunDirError(f"train.output_dir = {self.output_dir!r}: in use by another run ({_describe(holder)}); "
                                  "wait for it to finish or choose another train.output_dir") from None
            raise
        previous = _read(f)
        f.seek(0)
        f.truncate()
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
        json.dump(me, f)
        f.flush()
        self._file = f
        return previous or None  # the caller logs the takeover once its log is set up

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.flush()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _read(f) -> dict:
    try:
        f.seek(0)
        data = json.loads(f.read() or "{}")
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}
