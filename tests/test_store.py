"""The results store: what ``bench.load`` returns for results written with ``Store.add``.

Results are plain ``JobResult`` rows with small hand-made traces, written to a real
store in ``tmp_path`` and read back.
"""

from __future__ import annotations

import io
import sqlite3

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import bench
from bench.record import JobResult
from bench.schema import CURVE_COLUMNS, KINDS, LAYER_COLUMNS, STATS
from bench.store import Store


def _layers(rng: np.random.Generator, n_log: int, depth: int) -> pd.DataFrame:
    """A job's layer trace with the engine's dtypes: a row per (step, layer, kind)."""
    rows = n_log * depth * len(KINDS)
    return pd.DataFrame({
        "step": np.repeat(np.arange(n_log, dtype=np.int32) * 10, depth * len(KINDS)),
        "layer": pd.Categorical(np.tile(np.repeat(np.arange(depth), len(KINDS)), n_log).astype(str)),
        "index": np.tile(np.repeat(np.arange(depth, dtype=np.int32), len(KINDS)), n_log),
        "param": pd.Categorical.from_codes(np.tile(np.arange(len(KINDS)), n_log * depth), categories=KINDS),
        **{name: rng.random(rows, dtype=np.float32) for name in (*STATS, "q", "q_pred")}})


def _curves(rng: np.random.Generator, n_log: int) -> pd.DataFrame:
    return pd.DataFrame({"step": np.arange(n_log) * 10, "train_loss": rng.random(n_log),
                         **{name: rng.random(n_log, dtype=np.float32) for name in CURVE_COLUMNS[2:]}})


def _result(job_id: str, rng: np.random.Generator, n_log: int = 4, depth: int = 3) -> JobResult:
    return JobResult(job_id, {"init": "zeros", "depth": depth}, "ok", metrics={"final_loss": 0.5},
                     curves=_curves(rng, n_log), layers=_layers(rng, n_log, depth))


def _write(directory, results: list[JobResult]) -> None:
    db = Store.open(directory, fingerprint="f", meta={"spec_name": "t", "axes": ["depth"]})
    for r in results:
        db.add(r)
    db.close()


def test_traces_round_trip_with_categorical_job_id_and_param(tmp_path):
    rng = np.random.default_rng(0)
    # Jobs of different sizes, enough rows (> 4096) that the columns grow while loading.
    added = [_result(f"job{i}", rng, n_log=31, depth=2 + 5 * i) for i in range(4)]  # 4,712 layer rows
    added.insert(2, JobResult("crashed", {"init": "zeros", "depth": 2}, "failed", error="boom"))
    _write(tmp_path, added)
    r = bench.load(tmp_path)

    ids = list(r.runs["job_id"])
    assert ids == [a.job_id for a in added]
    traced = [a for a in added if a.status != "failed"]
    for table, name, columns in ((r.curves, "curves", CURVE_COLUMNS), (r.layers, "layers", LAYER_COLUMNS)):
        assert list(table.columns) == ["job_id", *columns]
        # One dtype for both tables: the categories are the runs, failed ones included, in order.
        assert isinstance(table["job_id"].dtype, pd.CategoricalDtype)
        assert list(table["job_id"].cat.categories) == ids
        expected = pd.concat([getattr(a, name).assign(job_id=a.job_id) for a in traced], ignore_index=True)
        text = {"job_id": str, **({"param": str, "layer": str} if name == "layers" else {})}
        got, expected = table.astype(text), expected.astype(text)
        pd.testing.assert_frame_equal(got, expected[got.columns], check_dtype=True)
    assert isinstance(r.layers["param"].dtype, pd.CategoricalDtype)
    assert isinstance(r.layers["layer"].dtype, pd.CategoricalDtype)  # module names, stored once
    assert list(r.layers["param"].cat.categories) == list(KINDS)
    assert r.layers["step"].dtype == np.int32 and r.layers["mean"].dtype == np.float32
    assert (r.layers["job_id"] == "crashed").sum() == 0


def test_categorical_columns_work_like_strings_for_callers(tmp_path):
    rng = np.random.default_rng(1)
    _write(tmp_path, [_result("a", rng), _result("b", rng)])
    r = bench.load(tmp_path)
    layers = r.layers
    assert set(layers["param"]) == set(KINDS)
    # merge with .runs (plain strings), filter, group, and build text as the report and the tutorial do
    merged = layers[layers["param"].isin(["weight", "bias"])].merge(r.runs[["job_id", "init"]], on="job_id")
    assert len(merged) == 2 * 4 * 3 * 2 and set(merged["init"]) == {"zeros"}
    assert (layers["job_id"] == "b").sum() == 4 * 3 * len(KINDS)
    assert layers.groupby("job_id", observed=True).size().to_dict() == {"a": 48, "b": 48}
    names = (layers["layer"].astype(str) + "." + layers["param"].astype(str)).unique()
    assert "0.weight" in names and "2.preact" in names


def _blob(df: pd.DataFrame) -> bytes:
    sink = io.BytesIO()
    table = pa.Table.from_pandas(df, preserve_index=False)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def test_columns_an_older_store_lacks_load_as_nan(tmp_path):
    rng = np.random.default_rng(2)
    _write(tmp_path, [_result("new", rng), _result("old", rng), _result("also_new", rng)])
    # "old" was written before q and q_pred existed, with param as plain strings.
    old = _layers(rng, 4, 3).drop(columns=["q", "q_pred"]).astype({"param": str})
    con = sqlite3.connect(tmp_path / "store.sqlite")
    with con:
        con.execute("UPDATE runs SET layers = ? WHERE job_id = 'old'", (_blob(old),))
    con.close()
    layers = bench.load(tmp_path).layers.set_index("job_id")
    assert layers.loc["old", "q"].isna().all() and layers.loc["old", "q_pred"].isna().all()
    assert layers.loc["new", "q"].notna().all() and layers.loc["also_new", "q"].notna().all()
    assert list(layers.loc["old", "param"].astype(str)) == list(old["param"])
    np.testing.assert_array_equal(layers.loc["old", "std"].to_numpy(), old["std"].to_numpy())


def test_a_column_first_seen_after_other_jobs_is_nan_before(tmp_path):
    rng = np.random.default_rng(3)
    first = _result("first", rng)
    first.curves = first.curves.drop(columns=["val_acc"])
    _write(tmp_path, [first, _result("second", rng)])
    curves = bench.load(tmp_path).curves.set_index("job_id")
    assert curves.loc["first", "val_acc"].isna().all() and curves.loc["second", "val_acc"].notna().all()
    assert curves["step"].dtype == np.int64  # present in every job: keeps its integer dtype


@pytest.mark.parametrize("traces", [True, False])
def test_no_traces_gives_empty_tables_of_the_same_columns(tmp_path, traces):
    _write(tmp_path, [JobResult("crashed", {"init": "zeros"}, "failed", error="boom")])
    if not traces:
        _write(tmp_path, [_result("ok", np.random.default_rng(4))])
    r = bench.load(tmp_path, traces=traces)
    assert len(r.runs) == (1 if traces else 2)
    for table, columns in ((r.curves, CURVE_COLUMNS), (r.layers, LAYER_COLUMNS)):
        assert table.empty and list(table.columns) == ["job_id", *columns]
        assert isinstance(table["job_id"].dtype, pd.CategoricalDtype)
    assert isinstance(r.layers["param"].dtype, pd.CategoricalDtype)


def test_a_format_1_store_is_a_one_line_error_that_says_what_to_do(tmp_path):
    """Stores from before module-keyed traces (format 1) are refused, never misread."""
    import sqlite3

    from bench.errors import UserError

    _write(tmp_path, [_result("a", np.random.default_rng(3))])
    con = sqlite3.connect(tmp_path / "store.sqlite")
    with con:
        con.execute("UPDATE meta SET value = '1' WHERE key = 'version'")
    con.close()
    with pytest.raises(UserError, match=r"format version '1'.*reads 2.*--fresh") as err:
        bench.load(tmp_path)
    assert "\n" not in str(err.value)


def test_every_traced_layer_names_a_module_of_the_catalog(tmp_path, tiny_spec):
    from bench import sweep

    out = tmp_path / "out"
    assert sweep.main([str(tiny_spec), "--out", str(out), "--quiet", "--no-report", "--jobs", "1"]) == 0
    r = bench.load(out)
    cat = r.modules.astype({"job_id": str, "name": str})
    assert set(cat["job_id"]) == set(r.runs["job_id"])
    traced = r.layers.astype({"job_id": str, "layer": str})[["job_id", "layer", "index"]].drop_duplicates()
    joined = traced.merge(cat, left_on=["job_id", "layer"], right_on=["job_id", "name"], how="left")
    assert joined["type"].notna().all() and (joined["index_x"] == joined["index_y"]).all()
    depth3 = cat[cat["job_id"] == r.runs.loc[r.runs["depth"] == 3, "job_id"].iloc[0]]
    assert list(depth3["type"].astype(str)) == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert depth3["fan_in"].iloc[[0, 2, 4]].tolist() == [16.0, 8.0, 8.0]  # teacher: 16 inputs, width 8
    assert depth3["fan_in"].iloc[[1, 3]].isna().all()  # activations hold no weight
