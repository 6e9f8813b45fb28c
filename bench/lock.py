"""One writer per sweep directory: an OS lock on ``DIR/sweep.lock`` that dies with its process.

Why ``flock`` on a file that is never deleted: the kernel releases the lock when the process
that holds it ends, however it ends (SIGKILL, power loss of a node that mounted the directory
locally), so a stale lock can never block a resume, and there is no pid file to clean up or to
guess about. Deleting the file would reopen a race (a second runner locking an unlinked inode
while a third creates a new one), so it stays. The holder writes its pid, host and start time
into the file, for the message a second runner gets. Readers (``bench.load``, the report)
never take the lock. Python opens the file close-on-exec, so worker processes do not inherit it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from bench.errors import UserError

FILENAME = "sweep.lock"


class DirectoryLock:
    """The exclusive lock of one sweep directory, held from :meth:`acquire` until :meth:`release`."""

    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, directory: str | Path, action: str = "sweep") -> DirectoryLock:
        """Lock ``directory`` for writing, or raise :class:`UserError` naming the process that holds it.

        Args:
            directory: an existing sweep output directory.
            action: what this process is about to do there (recorded for the other's message).
        """
        path = Path(directory) / FILENAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"{path}: cannot create the sweep's lock file ({err})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(f"{directory} is in use by another {holder}; wait for it to finish (or stop it), "
                            "or choose another --out") from None
        except OSError as err:  # a filesystem without locks: refusing beats two writers unnoticed
            os.close(fd)
            raise UserError(f"{path}: cannot lock the sweep directory ({err}); "
                            "choose an --out on a local filesystem") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                           "action": action}).encode()
        # In place (not temp + rename): the lock belongs to this inode. One small write after the
        # truncate; a reader that catches it in between retries (see _holder).
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        return cls(fd, path)

    def release(self) -> None:
        """Unlock (closing the descriptor releases the flock); the file stays for the next holder."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _holder(fd: int, attempts: int = 50) -> str:
    """``sweep (pid 123 on host h, started 2025-01-01 12:00:00)`` from the lock file's contents.

    The holder writes them just after it locks: a runner started at the same moment may read an
    empty file, so it retries for up to about a second.
    """
    for _ in range(attempts):
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            info = None
        if isinstance(info, dict) and {"pid", "host", "started"} <= info.keys():
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
            return (f"{info.get('action', 'sweep')} (pid {info['pid']} on host {info['host']}, "
                    f"started {started})")
        time.sleep(0.02)
    return "sweep (its pid is not recorded in the lock file)"
