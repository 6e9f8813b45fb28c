"""The results store: one SQLite file per sweep directory, written only by the parent.

Why SQLite in WAL mode: each job's row (settings, metrics, curves and layer
traces) is written in one transaction, so a killed sweep loses at most the jobs
in flight and never leaves half a row; readers (``bench.load``, the report) can
open the directory while the sweep is still writing. Curves and layer traces
are stored per job as compressed Arrow IPC blobs, so loading 10,000 jobs is a
few concatenations rather than millions of row inserts.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from bench.errors import UserError
from bench.schema import CURVE_COLUMNS, LAYER_COLUMNS

if TYPE_CHECKING:
    from bench.record import JobResult

FORMAT_VERSION = 1
FILENAME = "store.sqlite"
_ENV_COLUMNS = ("device", "host", "torch_version", "python", "initbench")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    job_id TEXT PRIMARY KEY, status TEXT NOT NULL, error TEXT NOT NULL, settings TEXT NOT NULL,
    metrics TEXT NOT NULL, pathologies TEXT NOT NULL, wall_s REAL, env TEXT NOT NULL,
    finished_at REAL NOT NULL, curves BLOB, layers BLOB
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
    opts = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, table.schema, options=opts) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_blob(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.BufferReader(blob)).read_all()


def _connect(path: Path) -> sqlite3.Connection:
    try:
        con = sqlite3.connect(path, timeout=30.0)
        # Read before any write: a foreign or corrupt file must be left byte for byte as it was.
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and not {"meta", "runs"} <= tables:
            con.close()
            raise UserError(f"{path}: an SQLite file that is not an initbench store (tables "
                            f"{sorted(tables)}); refusing to touch it: move it away or choose another --out")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process kills
        return con
    except sqlite3.DatabaseError as err:
        raise UserError(f"{path}: not a readable initbench store ({err}); "
                        "move it away or use --fresh") from None


class Store:
    """An open store for one sweep directory (see :meth:`open` and :func:`load`)."""

    def __init__(self, con: sqlite3.Connection, path: Path):
        self.con = con
        self.path = path

    @classmethod
    def open(cls, directory: str | Path, *, fingerprint: str, meta: dict[str, Any],
             fresh: bool = False) -> Store:
        """Open or create the store of a sweep; refuse one that belongs to a different spec.

        Args:
            directory: the sweep's output directory (created if needed).
            fingerprint: the spec's fingerprint; a store made by another spec is refused.
            meta: stored on creation (spec text, name, axes, environment).
            fresh: delete any existing results first.
        """
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if not os.access(directory, os.W_OK):
                raise PermissionError(f"{directory} is not writable")
        except OSError as err:
            raise UserError(f"--out {directory}: cannot create or write the output directory "
                            f"({err})") from None
        path = directory / FILENAME
        if fresh:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        con = _connect(path)
        try:
            con.executescript(_SCHEMA)
            stored = dict(con.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as err:
            con.close()
            raise UserError(f"{path}: not a readable initbench store ({err}); move it away or use --fresh") \
                from None
        if stored:
            _check_version(path, stored)
            if stored.get("fingerprint") != fingerprint:
                con.close()
                raise UserError(f"{directory} holds results of a different spec "
                                f"({stored.get('spec_path', '?')}); rerun with --fresh to replace them, "
                                "or choose another directory with --out")
        else:
            rows = {"version": str(FORMAT_VERSION), "fingerprint": fingerprint, "created": str(time.time()),
                    **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}}
            with con:
                con.executemany("INSERT INTO meta VALUES (?, ?)", rows.items())
        return cls(con, path)

    def finished(self) -> set[str]:
        """Ids of jobs that need no rerun: ok or diverged (failed ones are retried)."""
        return {r[0] for r in self.con.execute("SELECT job_id FROM runs WHERE status != 'failed'")}

    def add(self, result: JobResult) -> None:
        """Write one job's result atomically (replacing an earlier failed attempt)."""
        blobs: tuple[bytes | None, bytes | None] = (None, None)
        if result.status != "failed":
            blobs = (_to_blob(result.curves), _to_blob(result.layers))
        with self.con:
            self.con.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (result.job_id, result.status, result.error, json.dumps(result.settings),
                 json.dumps(result.metrics), result.pathologies, result.wall_s, json.dumps(result.env),
                 time.time(), *blobs))

    def set_meta(self, key: str, value: str) -> None:
        """Record a piece of sweep metadata (e.g. total wall time)."""
        with self.con:
            self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def close(self) -> None:
        self.con.close()


def _check_version(path: Path, meta: dict[str, str]) -> None:
    version = meta.get("version")
    if version != str(FORMAT_VERSION):
        raise UserError(f"{path}: store format version {version!r}, this initbench reads "
                        f"{FORMAT_VERSION}; rerun the sweep with --fresh")


@dataclass
class Results:
    """A sweep's results as pandas tables (see README "Results")."""

    runs: pd.DataFrame
    curves: pd.DataFrame
    layers: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def axes(self) -> list[str]:
        """The grid's axes (settings that vary), in spec order."""
        return list(self.meta.get("axes", []))

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
        blobs = "curves, layers" if traces else "NULL, NULL"
        rows = con.execute("SELECT job_id, status, error, settings, metrics, pathologies, wall_s, env, "
                           f"{blobs} FROM runs ORDER BY finished_at, job_id")
        records, curves, layers = _decode(rows)
    except sqlite3.DatabaseError as err:
        raise UserError(f"{path}: not a readable initbench store ({err})") from None
    finally:
        con.close()
    for key in ("axes", "env"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    runs = pd.DataFrame.from_records(records)
    return Results(runs=runs, curves=_concat(curves, CURVE_COLUMNS), layers=_concat(layers, LAYER_COLUMNS),
                   meta=meta)


def _decode(rows) -> tuple[list[dict], list[pa.Table], list[pa.Table]]:
    records: list[dict] = []
    curves: list[pa.Table] = []
    layers: list[pa.Table] = []
    for job_id, status, error, settings, mets, paths, wall_s, env, cblob, lblob in rows:
        env = json.loads(env)
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(settings).items()}
        records.append({**settings, "job_id": job_id, "status": status, "error": error,
                        **json.loads(mets), "pathologies": paths, "wall_s": wall_s,
                        **{k: env.get(k, "") for k in _ENV_COLUMNS}})
        for blob, sink in ((cblob, curves), (lblob, layers)):
            if blob is not None:
                table = _from_blob(blob)
                ids = pa.DictionaryArray.from_arrays(pa.array(np.zeros(table.num_rows, np.int32)),
                                                     pa.array([job_id]))
                sink.append(table.append_column("job_id", ids))
    return records, curves, layers


def _concat(tables: list[pa.Table], columns: tuple[str, ...]) -> pd.DataFrame:
    if not tables:
        return pd.DataFrame(columns=["job_id", *columns])
    # promote_options: stores written before a column existed load it as NaN.
    table = pa.concat_tables(tables, promote_options="default")
    tables.clear()  # the caller's list: let to_pandas free each column once it is converted
    # Dictionary-encoded while concatenating (compact); plain strings for the user.
    for name in ("job_id", "param"):
        i = table.schema.get_field_index(name)
        if i >= 0 and pa.types.is_dictionary(table.schema.field(i).type):
            table = table.set_column(i, name, table.column(name).cast(pa.string()))
    df = table.to_pandas(self_destruct=True, split_blocks=True)
    del table
    return df.reindex(columns=["job_id", *columns])
