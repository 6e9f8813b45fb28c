"""Atomic file writes: every file initbench writes appears whole or not at all.

A killed process or a full disk never leaves a half-written report, baseline or data file:
each is written to a temp file in the same folder, flushed to disk, then renamed over the
target with ``os.replace`` (atomic on POSIX and Windows).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from bench.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes | Callable[[IO], None]) -> None:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: the file to (over)write; its folder is created if needed.
        data: text, bytes, or a function that writes to the open binary file object it is given
            (e.g. ``lambda fh: frame.to_parquet(fh)``).

    Raises:
        UserError: the folder cannot be created or written (one line naming the path).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(f"cannot write {path}: {err}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file should be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
