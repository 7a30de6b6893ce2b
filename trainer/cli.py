"""The one top-level handler of every command-line entry point: a user error is one line, exit 2.

`@user_errors` wraps a `main(argv) -> int`. Exceptions that describe something the user can fix
(a config value, a missing or unreadable file, a checkpoint that does not fit) end as
`error: <what> = <value>: <why>; <fix>` on stderr and exit code 2, never a traceback; anything
else is a bug and keeps its traceback. Under a launcher (RANK set) a config error is the same on
every rank, so only rank 0 prints it; other errors carry their rank. Every rank keeps the exit code.
A KeyboardInterrupt (a second Ctrl-C during training) is one line and exit 130.
"""
from __future__ import annotations

import functools
import os
import sys

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process killed by Ctrl-C


def _user_error_types() -> tuple:
    from data.indexed import IndexedDataError
    from parallel.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.errors import NonFiniteError
    from trainer.run_dir import RunDirError
    return (ConfigError, CheckpointError, NonFiniteError, IndexedDataError, RunDirError, ValueError,
            FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError,
            ImportError)


def error_line(e: BaseException) -> str | None:
    """The one line printed for `e` on this rank (None: another rank prints it)."""
    from trainer.config import ConfigError
    rank = os.environ.get("RANK", "0")
    if rank != "0" and isinstance(e, ConfigError):
        return None
    text = " ".join(str(e).split()) or type(e).__name__
    return f"error{'' if rank == '0' else f' (rank {rank})'}: {text}"


def mark_user_error() -> None:
    """Under slurm/lib.sh, leave `<MOEPIPE_PROGRESS_FILE>.user_error` so that the launcher, which
    sees torchrun's exit 1 for any failed worker, does not requeue a rejected input."""
    path = os.environ.get("MOEPIPE_PROGRESS_FILE")
    if path:
        try:
            open(path + ".user_error", "a").close()
        except OSError:
            pass


def user_errors(main):
    """Decorator for a CLI's `main`: user errors -> one line on stderr and EXIT_USER_ERROR."""
    @functools.wraps(main)
    def wrapped(argv=None, **options) -> int:
        try:
            return main(argv, **options)
        except _user_error_types() as e:
            line = error_line(e)
            if line:
                print(line, file=sys.stderr)
            mark_user_error()
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted: stopped at once without saving", file=sys.stderr)
            return EXIT_INTERRUPTED
    return wrapped
