"""The results store: one SQLite file per sweep directory, written only by the parent.

Why SQLite in WAL mode: each job's row (settings, metrics, curves and layer
traces) is written in one transaction, so a killed sweep loses at most the jobs
in flight and never leaves half a row; readers (``bench.load``, the report) can
open the directory while the sweep is still writing. Curves and layer traces
are stored per job as compressed Arrow IPC blobs, so loading 10,000 jobs is a
few concatenations rather than millions of row inserts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from bench.errors import UserError
from bench.lock import DirectoryLock
from bench.schema import CURVE_COLUMNS, LAYER_COLUMNS, MODULE_COLUMNS, axis_column

if TYPE_CHECKING:
    from bench.record import JobResult

FORMAT_VERSION = 2  # 2: traces keyed by module name, with the module catalog (.modules)
FILENAME = "store.sqlite"
# engine: which engine trained the job (stacked, vmap or loop), engine_note: why the loop, if it was
_ENV_COLUMNS = ("device", "host", "torch_version", "python", "initbench", "engine", "engine_note")
# Serial (de)compression: a blob's buffers are a few KB each, too small to pay for a thread pool
# (about a third of the time of storing and of decoding a job's traces).
_WRITE = pa.ipc.IpcWriteOptions(compression="zstd", use_threads=False)
_READ = pa.ipc.IpcReadOptions(use_threads=False)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    job_id TEXT PRIMARY KEY, status TEXT NOT NULL, error TEXT NOT NULL, settings TEXT NOT NULL,
    metrics TEXT NOT NULL, pathologies TEXT NOT NULL, wall_s REAL, env TEXT NOT NULL,
    finished_at REAL NOT NULL, curves BLOB, layers BLOB, modules BLOB
);
"""


def _column(series: pd.Series) -> pa.Array:
    if isinstance(series.dtype, pd.CategoricalDtype):
        categories = pa.array(series.cat.categories.astype(str))
        return pa.DictionaryArray.from_arrays(pa.array(series.cat.codes.to_numpy()), categories)
    return pa.array(series.to_numpy())


def _to_blob(df: pd.DataFrame) -> bytes:
    # Column by column from numpy: pa.Table.from_pandas spends most of its time on pandas metadata
    # we never read back, and storing is a sweep's per-job cost in the parent.
    table = pa.table({name: _column(df[name]) for name in df.columns})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema, options=_WRITE) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_blob(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.BufferReader(blob), options=_READ).read_all()


def _connect(path: Path) -> sqlite3.Connection:
    try:
        con = sqlite3.connect(path, timeout=30.0)
    except sqlite3.DatabaseError as err:
        raise _unreadable(path, err) from None
    try:
        # Read before any write: a foreign, corrupt or damaged file must be left byte for byte as it was.
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and not {"meta", "runs"} <= tables:
            raise UserError(f"{path}: an SQLite file that is not an initbench store (tables "
                            f"{sorted(tables)}); refusing to touch it: move it away or choose another --out")
        if tables:
            # Every page once (about a second per GB): resuming into a damaged file could spread the damage.
            problems = [r[0] for r in con.execute("PRAGMA quick_check(1)")]
            if problems != ["ok"]:
                first = problems[0].splitlines()[-1]
                raise sqlite3.DatabaseError(f"database disk image is malformed: {first}")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process kills
        return con
    except sqlite3.DatabaseError as err:
        con.close()
        raise _unreadable(path, err) from None
    except UserError:
        con.close()
        raise


def _unreadable(path: Path, err: sqlite3.DatabaseError) -> UserError:
    """The one-line error for a store that cannot be read: damaged (say what a recovery would keep) or
    not an SQLite file at all."""
    if not _is_damage(err):
        return UserError(f"{path}: not a readable initbench store ({err}); move it away or use --fresh")
    return damaged(path, err)


def _is_damage(err: Exception) -> bool:
    if not isinstance(err, sqlite3.Error):
        return True  # a blob or JSON field that no longer decodes
    name = getattr(err, "sqlite_errorname", "")
    return name.startswith("SQLITE_CORRUPT") or "malformed" in str(err) or "decode" in str(err)


def damaged(path: Path, err: Exception) -> UserError:
    """A store that SQLite (or a blob's decoder) reports damaged: count what ``recover`` would keep."""
    cause = f"{path}: the store is damaged ({_first_line(err)}); it is left as it is"
    try:
        with _readable_copy(path) as readable:
            con = _read_only(readable)
            try:
                dict(con.execute("SELECT key, value FROM meta").fetchall())
                n = sum(1 for _ in _salvage(con))
            finally:
                con.close()
    except sqlite3.Error:
        return UserError(f"{cause}; its meta table (which spec it holds) is unreadable too, so nothing "
                         "can be recovered: move it away and rerun the sweep with --fresh")
    return UserError(f"{cause}. {n} jobs can be read back: `python -m bench.store recover {path.parent}` "
                     "copies them into a fresh store (keeping the damaged file beside it), then the same "
                     "sweep command trains the rest")


@contextlib.contextmanager
def _readable_copy(path: Path) -> Iterator[Path]:
    """``path``, or where it is shorter than its header says (a truncated copy), a copy padded with
    zeros to that length: SQLite refuses a file shorter than its header's page count outright, and
    padded, the pages that are there read back while the missing ones read as damaged."""
    with open(path, "rb") as f:
        header = f.read(100)
    size = path.stat().st_size
    page_size = int.from_bytes(header[16:18], "big") if len(header) == 100 else 0
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big") if len(header) == 100 else 0
    if not page_size or pages * page_size <= size:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=".salvage-", dir=path.parent) as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        with open(copy, "r+b") as f:
            f.truncate(pages * page_size)
        if Path(f"{path}-wal").exists():
            shutil.copyfile(f"{path}-wal", f"{copy}-wal")
        yield copy


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class Store:
    """An open store for one sweep directory (see :meth:`open` and :func:`load`), held by this process
    alone (:class:`~bench.lock.DirectoryLock`) until :meth:`close`."""

    def __init__(self, con: sqlite3.Connection, path: Path, lock: DirectoryLock | None = None):
        self.con = con
        self.path = path
        self.lock = lock

    @classmethod
    def open(cls, directory: str | Path, *, fingerprint: str, meta: dict[str, Any],
             fresh: bool = False) -> Store:
        """Lock a sweep directory, then open or create its store; refuse one of a different spec.

        Args:
            directory: the sweep's output directory (created if needed).
            fingerprint: the spec's fingerprint; a store made by another spec is refused.
            meta: stored on creation (spec text, name, axes, environment).
            fresh: delete any existing results first.

        Raises:
            UserError: the directory cannot be written, another live process writes it, or the store
                is foreign, damaged, of another format version or of another spec.
        """
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if not os.access(directory, os.W_OK):
                raise PermissionError(f"{directory} is not writable")
        except OSError as err:
            raise UserError(f"--out {directory}: cannot create or write the output directory "
                            f"({err})") from None
        lock = DirectoryLock.acquire(directory)  # before --fresh deletes anything
        try:
            return cls._open(directory, lock, fingerprint, meta, fresh)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _open(cls, directory: Path, lock: DirectoryLock, fingerprint: str, meta: dict[str, Any],
              fresh: bool) -> Store:
        path = directory / FILENAME
        if fresh:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        con = _connect(path)
        db = cls(con, path, lock)
        try:
            con.executescript(_SCHEMA)
            stored = dict(con.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError as err:
            con.close()
            raise db._write_error(err) from None
        except sqlite3.DatabaseError as err:
            con.close()
            raise _unreadable(path, err) from None
        if stored:
            try:
                _check_version(path, stored)
            except UserError:
                con.close()
                raise
            if stored.get("fingerprint") != fingerprint:
                con.close()
                raise UserError(f"{directory} holds results of a different spec "
                                f"({stored.get('spec_path', '?')}); rerun with --fresh to replace them, "
                                "or choose another directory with --out")
        else:
            rows = {"version": str(FORMAT_VERSION), "fingerprint": fingerprint, "created": str(time.time()),
                    **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}}
            db._write("INSERT INTO meta VALUES (?, ?)", list(rows.items()), many=True)
        return db

    def finished(self) -> set[str]:
        """Ids of jobs that need no rerun: ok or diverged (failed ones are retried)."""
        return {r[0] for r in self.con.execute("SELECT job_id FROM runs WHERE status != 'failed'")}

    def count(self) -> int:
        """Jobs stored so far (any status)."""
        return self.con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    def add(self, result: JobResult) -> None:
        """Write one job's result atomically (replacing an earlier failed attempt).

        Raises:
            UserError: the store cannot be written (disk full, quota, file-size limit); the
                transaction is rolled back, so every job stored before stays intact.
        """
        blobs: tuple[bytes | None, ...] = (None, None, None)
        if result.status != "failed":
            blobs = (_to_blob(result.curves), _to_blob(result.layers), _to_blob(result.modules))
        self._write("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (result.job_id, result.status, result.error, json.dumps(result.settings),
                     json.dumps(result.metrics), result.pathologies, result.wall_s, json.dumps(result.env),
                     time.time(), *blobs))

    def set_meta(self, key: str, value: str) -> None:
        """Record a piece of sweep metadata (e.g. total wall time)."""
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def _write(self, sql: str, params: Any, many: bool = False) -> None:
        try:
            with self.con:
                (self.con.executemany if many else self.con.execute)(sql, params)
        except sqlite3.OperationalError as err:
            raise self._write_error(err) from None

    def _write_error(self, err: sqlite3.OperationalError) -> UserError:
        """One line naming the store and why it cannot be written, and what is safe."""
        try:
            kept = f"the {self.count()} jobs stored before are intact"
        except sqlite3.Error:
            kept = "the jobs stored before are intact"
        return UserError(f"{self.path}: cannot write the results store: {_write_cause(self.path, err)}; "
                         f"{kept}: once there is room, rerun the same command to resume")

    def close(self) -> None:
        """Close the database (SQLite checkpoints its WAL when it can) and release the directory lock."""
        try:
            self.con.close()
        except sqlite3.Error:
            pass  # a final checkpoint that cannot be written leaves the WAL, which readers use
        if self.lock is not None:
            self.lock.release()


def _write_cause(path: Path, err: sqlite3.OperationalError) -> str:
    """Why a write failed, in the user's terms: SQLite says only "disk I/O error" for EFBIG and quotas.

    A file at the process's file-size limit (``ulimit -f``) is that limit; little free space on the
    directory's filesystem is a full disk; otherwise SQLite's own words.
    """
    said = f"sqlite: {_first_line(err)}"
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        sizes = [os.path.getsize(f) for f in (path, Path(f"{path}-wal")) if f.exists()]
        if sizes and max(sizes) >= soft - 65536:
            return f"the file-size limit (ulimit -f) of {soft} bytes is reached ({said})"
    try:
        stat = os.statvfs(path.parent)
        free = stat.f_bavail * stat.f_frsize
    except OSError:
        return said
    if free < 2**20 or getattr(err, "sqlite_errorname", "") == "SQLITE_FULL":
        return f"the disk is full ({free // 1024} KiB free on its filesystem; {said})"
    return said


def _check_version(path: Path, meta: dict[str, str]) -> None:
    version = meta.get("version")
    if version != str(FORMAT_VERSION):
        raise UserError(f"{path}: store format version {version!r}, this initbench reads "
                        f"{FORMAT_VERSION} (traces keyed by module name, with a module catalog); rerun the "
                        "sweep with --fresh to rebuild it")


@dataclass
class Results:
    """A sweep's results as pandas tables (see README "Results")."""

    runs: pd.DataFrame
    curves: pd.DataFrame
    layers: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the store file these results were loaded from
    # The module catalog: one row per (job, parameter-holding or probed module), schema.MODULE_COLUMNS.
    modules: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["job_id", *MODULE_COLUMNS]))

    def __repr__(self) -> str:
        from bench.overview import text

        return text(self)

    def _repr_html_(self) -> str:
        """Jupyter's view: the same summary as ``repr``, as an escaped HTML table."""
        from bench.overview import to_html

        return to_html(self)

    @property
    def axes(self) -> list[str]:
        """The grid's axes (settings that vary), in spec order, as ``.runs`` columns (``axis_column``)."""
        return list(dict.fromkeys(axis_column(a) for a in self.meta.get("axes", [])))

    @property
    def spec_text(self) -> str:
        return str(self.meta.get("spec_text", ""))


def load(directory: str | Path, *, traces: bool = True) -> Results:
    """Load a sweep directory's results (safe while the sweep is still writing).

    Args:
        directory: a sweep's output directory.
        traces: also load ``.curves`` and ``.layers`` (False: empty tables, much faster for
            callers that only read ``.runs``).

    Returns:
        :class:`Results` with ``.runs`` (one row per job: settings, status, error,
        metrics, pathologies, wall_s, device, host, torch_version), ``.curves`` and
        ``.layers`` (long tables keyed by ``job_id``) and ``.meta``.

        In ``.curves`` and ``.layers``, ``job_id`` is a pandas ``Categorical`` whose categories
        are ``.runs["job_id"]`` in the same order (so both tables share one dtype), and
        ``.layers["layer"]`` (the module's dotted name) and ``.layers["param"]`` (weight, bias,
        act, preact, ...) are ``Categorical``: 10,000 jobs' layer traces are tens of millions of
        rows, and as strings such columns took about 0.5 GB. Comparisons, ``isin``, merges with
        ``.runs`` and groupby work as with strings; string arithmetic needs ``.astype(str)``
        first, and a groupby on them should pass ``observed=True`` (pandas 2 otherwise lists
        every category, traced or not).
        The numbers are float32 (stats) and int32 (step, index) in ``.layers``. ``.modules`` is
        the catalog: per job, every parameter-holding or probed module's name, type, forward
        ``index``, parameter ``shapes`` and PyTorch's ``fan_in`` / ``fan_out``.
    """
    path = Path(directory) / FILENAME
    if not path.is_file():
        raise UserError(f"{directory}: no results store ({FILENAME}) here; run bench.sweep first")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    try:
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        _check_version(path, meta)
        # One statement is one consistent snapshot in WAL mode, even while a sweep writes; rows are
        # decoded as they stream, so the compressed blobs are never all in memory at once.
        blobs = "curves, layers, modules" if traces else "NULL, NULL, NULL"
        rows = con.execute("SELECT job_id, status, error, settings, metrics, pathologies, wall_s, env, "
                           f"{blobs} FROM runs ORDER BY finished_at, job_id")
        records, curves, layers, modules = _decode(rows)
    except sqlite3.DatabaseError as err:
        raise _unreadable(path, err) from None
    except (pa.ArrowException, ValueError) as err:  # a blob or a JSON field damaged inside its pages
        raise damaged(path, err) from None
    finally:
        con.close()
    for key in ("axes", "env", "metrics", "regression"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    runs = pd.DataFrame.from_records(records)
    ids = pd.Index([r["job_id"] for r in records], dtype=str)
    return Results(runs=runs, curves=curves.frame(ids, CURVE_COLUMNS),
                   layers=layers.frame(ids, LAYER_COLUMNS), meta=meta, path=path,
                   modules=modules.frame(ids, MODULE_COLUMNS))


def _decode(rows) -> tuple[list[dict], _Columns, _Columns, _Columns]:
    records: list[dict] = []
    curves, layers, modules = _Columns(), _Columns(), _Columns()
    for job_id, status, error, settings, mets, paths, wall_s, env, cblob, lblob, mblob in rows:
        env = json.loads(env)
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(settings).items()}
        for blob, sink in ((cblob, curves), (lblob, layers), (mblob, modules)):
            if blob is not None:
                sink.add(_from_blob(blob), len(records))
        records.append({**settings, "job_id": job_id, "status": status, "error": error,
                        **json.loads(mets), "pathologies": paths, "wall_s": wall_s,
                        **{k: env.get(k, "") for k in _ENV_COLUMNS}})
    return records, curves, layers, modules


class _Columns:
    """One trace table (curves or layers) of every job, copied into growing numpy columns blob by blob.

    Why not decode every blob and concatenate at the end: the decoded blobs are tens of thousands
    of small allocations, each column's interleaved with the others', which the allocator cannot
    hand back to the system until the last is freed; the table then exists twice at the peak
    (2.0 GB for 10,000 jobs' layer traces, 0.9 GB of them the final frame). Here one decoded blob
    is alive at a time. Capacity doubles when full; pages never written are never resident.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.capacity = 0  # of every array in .data
        self.data: dict[str, np.ndarray] = {}  # rows [:self.rows] are filled, the rest is capacity
        self.categories: dict[str, dict[Any, int]] = {}  # dictionary columns: value -> code
        self.jobs: list[int] = []  # row of .runs of each added table ...
        self.counts: list[int] = []  # ... and its number of rows

    def add(self, table: pa.Table, job: int) -> None:
        """Append one job's table: columns it lacks are NaN (a store from before they existed)."""
        n, start = table.num_rows, self.rows
        self._reserve(start + n)
        for name in table.column_names:
            values = self._values(name, table.column(name).combine_chunks())
            if name not in self.data:
                self.data[name] = self._empty(name, values.dtype)
                self._fill_missing(name, 0, start)
            column = self.data[name]
            if np.result_type(column.dtype, values.dtype) != column.dtype:
                column = self._retype(name, np.result_type(column.dtype, values.dtype))
            column[start:start + n] = values
        for name in self.data.keys() - set(table.column_names):
            self._fill_missing(name, start, start + n)
        self.rows += n
        self.jobs.append(job)
        self.counts.append(n)

    def frame(self, ids: pd.Index, columns: tuple[str, ...]) -> pd.DataFrame:
        """The table: job_id (categories ``ids``, the runs in order), then ``columns`` in order."""
        codes = np.repeat(np.asarray(self.jobs, dtype=np.int16 if len(ids) < 2**15 else np.int32),
                          self.counts)
        data: dict[str, Any] = {"job_id": pd.Categorical.from_codes(codes, categories=ids)}
        for name in columns:
            if name in self.categories:
                data[name] = pd.Categorical.from_codes(self.data[name][:self.rows],
                                                       categories=list(self.categories[name]))
            elif name in self.data:
                data[name] = self.data[name][:self.rows]
            elif name in ("param", "layer"):  # stay categorical for callers even when no job has traces
                data[name] = pd.Categorical([])
            else:
                data[name] = np.full(self.rows, np.nan)
        # copy=False: one block per column, not a consolidated (copied) 2-D block per dtype.
        return pd.DataFrame(data, copy=False)

    def _values(self, name: str, array: pa.Array) -> np.ndarray:
        if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
            array = array.dictionary_encode()
        if not pa.types.is_dictionary(array.type):
            return array.to_numpy(zero_copy_only=False)  # nulls become NaN
        cats = self.categories.setdefault(name, {})
        lookup = [cats.setdefault(v, len(cats)) for v in array.dictionary.to_pylist()]
        indices = array.indices.fill_null(len(lookup)).to_numpy()
        return np.array([*lookup, -1], dtype=np.int16 if len(cats) < 2**15 else np.int32)[indices]

    def _reserve(self, rows: int) -> None:
        if rows <= self.capacity:
            return
        self.capacity = max(rows, 2 * self.capacity, 4096)
        for name in self.data:
            self._retype(name, self.data[name].dtype)

    def _empty(self, name: str, dtype: np.dtype) -> np.ndarray:
        # A column first seen after some rows needs NaN for them: float, unless it holds codes.
        if self.rows and name not in self.categories and not np.issubdtype(dtype, np.floating):
            dtype = np.result_type(dtype, np.float32)
        return np.empty(self.capacity, dtype)

    def _fill_missing(self, name: str, start: int, stop: int) -> None:
        if start == stop:
            return
        column = self.data[name]
        if name in self.categories:
            column[start:stop] = -1
            return
        if not np.issubdtype(column.dtype, np.floating):
            column = self._retype(name, np.result_type(column.dtype, np.float32))
        column[start:stop] = np.nan

    def _retype(self, name: str, dtype: np.dtype) -> np.ndarray:
        old = self.data[name]
        new = np.empty(self.capacity, dtype)
        new[:self.rows] = old[:self.rows]
        self.data[name] = new
        return new


# --- Recovery: ``python -m bench.store recover DIR`` ---------------------------------------------

_RUN_COLUMNS = ("job_id, status, error, settings, metrics, pathologies, wall_s, env, finished_at, "
                "curves, layers, modules")


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)


def _salvage(con: sqlite3.Connection) -> Iterator[tuple]:
    """Every row of ``runs`` that reads back whole (settings, metrics and traces decode).

    The table is walked forwards, backwards and through its primary-key index, each walk kept
    up to the first damaged page it meets, so rows on both sides of a damaged page are found;
    then each row is read alone by rowid.
    """
    rowids: set[int] = set()
    for sql in ("SELECT rowid FROM runs", "SELECT rowid FROM runs ORDER BY rowid DESC",
                "SELECT rowid FROM runs INDEXED BY sqlite_autoindex_runs_1 ORDER BY job_id"):
        try:
            for (rowid,) in con.execute(sql):
                rowids.add(rowid)
        except sqlite3.DatabaseError:
            pass  # this walk ends at a damaged page; the others may go past it
    for rowid in sorted(rowids):
        try:
            row = con.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE rowid = ?", (rowid,)).fetchone()
            if row is None or row[1] not in ("ok", "diverged", "failed"):
                continue
            for text in (row[3], row[4], row[7]):
                json.loads(text)
            for blob in row[9:]:
                if blob is not None:
                    _from_blob(blob)
        except (sqlite3.DatabaseError, pa.ArrowException, ValueError, TypeError):
            continue
        yield row


def recover(directory: str | Path) -> tuple[int, int, Path | None]:
    """Copy every readable job of a damaged store into a fresh one; keep the damaged file beside it.

    Returns:
        (jobs recovered, rows seen that could not be read back, where the damaged file was kept);
        the last is None when the store was not damaged (nothing is changed then).

    Raises:
        UserError: no store, a sweep is writing the directory, or the store's meta table (the
            spec it belongs to) cannot be read, so nothing can be recovered safely.
    """
    directory = Path(directory)
    path = directory / FILENAME
    if not path.is_file():
        raise UserError(f"{directory}: no results store ({FILENAME}) here; nothing to recover")
    lock = DirectoryLock.acquire(directory, action="store recovery")
    try:
        return _recover(path, directory)
    finally:
        lock.release()


def _recover(path: Path, directory: Path) -> tuple[int, int, Path | None]:
    with _readable_copy(path) as readable:
        return _copy_readable(readable, path, directory)


def _copy_readable(readable: Path, path: Path, directory: Path) -> tuple[int, int, Path | None]:
    con = _read_only(readable)
    try:
        try:
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as err:
            raise UserError(f"{path}: its meta table is unreadable ({_first_line(err)}), so the spec it "
                            "belongs to is unknown and nothing can be recovered safely; move it away "
                            "and rerun the sweep with --fresh") from None
        _check_version(path, meta)
        try:
            healthy = [r[0] for r in con.execute("PRAGMA quick_check(1)")] == ["ok"]
            stored = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        except sqlite3.DatabaseError:
            healthy, stored = False, -1
        tmp = directory / f"{FILENAME}.recovering"
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        new = sqlite3.connect(tmp)
        try:
            new.executescript(_SCHEMA)
            with new:
                new.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                recovered = 0
                for row in _salvage(con):
                    new.execute(f"INSERT OR REPLACE INTO runs ({_RUN_COLUMNS}) VALUES "
                                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                    recovered += 1
            seen = max(stored, 0)
        finally:
            new.close()
    finally:
        con.close()
    if healthy and recovered == stored:
        tmp.unlink()
        return recovered, 0, None
    kept = directory / f"store.damaged-{time.strftime('%Y%m%d-%H%M%S')}.sqlite"
    # The damaged file keeps its name's WAL beside it; the fresh store takes its place atomically.
    try:
        os.link(path, kept)
    except OSError:
        shutil.copy2(path, kept)
    wal = Path(f"{path}-wal")
    if wal.exists():
        os.replace(wal, f"{kept}-wal")
    Path(f"{path}-shm").unlink(missing_ok=True)
    os.replace(tmp, path)
    return recovered, max(seen - recovered, 0), kept


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.store recover DIR``: exit 0 when done, 2 when nothing can be done."""
    from bench import cli

    def body(argv: Sequence[str] | None) -> int:
        p = cli.Parser(prog="python -m bench.store", description="Maintain a sweep's results store.")
        commands = p.add_subparsers(dest="command", required=True)
        r = commands.add_parser("recover", help="copy the readable jobs of a damaged store into a fresh one")
        r.add_argument("directory", help="a sweep's output directory")
        args = p.parse_args(argv)
        recovered, lost, kept = recover(args.directory)
        if kept is None:
            print(f"{args.directory}/{FILENAME} is not damaged: all {recovered} jobs read back; "
                  "nothing to do")
            return 0
        print(f"recovered {recovered} jobs into a fresh {args.directory}/{FILENAME}"
              + (f"; {lost} more could not be read back" if lost else "")
              + f"; the damaged file is kept as {kept}. Rerun the same sweep command to train the jobs "
              "that were not recovered.")
        return 0

    return cli.run(body, argv)


if __name__ == "__main__":
    sys.exit(main())
