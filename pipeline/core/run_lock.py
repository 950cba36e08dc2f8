"""One run at a time per run directory: an advisory lock on RUN_DIR/.rectiflow.lock.

A second curate job or stage command on a directory that a live run holds is refused with
the holder's pid and host, instead of deleting the first run's temporaries or interleaving
shards with it. The lock is `fcntl.flock` on an open file, so the kernel releases it when
the holder exits or crashes (SIGKILL included); the file itself stays and means nothing
without the flock. flock belongs to the open file, so a second `open` in the same process
would block itself: the lock is re-entrant per process instead (nested stages of one curate
job share it). On NFS, flock is only as good as the server's lock support.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".rectiflow.lock"

_held: dict[Path, list] = {}  # run dir -> [open lock file, depth]
_guard = threading.Lock()


class RunLocked(Exception):
    """Another live process holds the run directory (a user's mistake: two runs at once)."""


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def holds_lock(run_dir: Path) -> bool:
    return Path(run_dir).resolve() in _held


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN_DIR's lock for the block; RunLocked at once if another process holds it.

    An object-store URL (s3://, gs://) has no flock: nothing is locked there, and one run per
    prefix is the user's to keep.
    """
    if "://" in str(run_dir) and not str(run_dir).startswith("file://"):
        yield
        return
    key = Path(str(run_dir).removeprefix("file://")).resolve()
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_acquire(key), 1]
    try:
        yield
    finally:
        with _guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                entry[0].close()  # closing the file releases the flock


def _acquire(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(lock_path(run_dir), "a+")  # noqa: SIM115 -- held open for as long as the lock
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process (it has not written its pid yet)"
        f.close()
        raise RunLocked(
            f"run directory {run_dir} is in use by {holder}; wait for that run to finish "
            f"(or stop it) before starting another on the same directory"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(
        f"pid {os.getpid()} on host {socket.gethostname()} "
        f"(since {time.strftime('%Y-%m-%d %H:%M:%S %Z')})\n"
    )
    f.flush()
    return f
