"""``initbench export``: TensorBoard and MLflow runs read back with each tool's own reader.

One real sweep (ok, diverged and failed jobs: a user task that raises for one seed) is
exported through the command; TensorBoard's event files are read back with its
``EventAccumulator``, MLflow's SQLite store with ``mlflow.search_runs`` and
``MlflowClient.get_metric_history``, and compared with ``bench.load``. Each exporter's
tests run only where its extra is installed (``.ci/run`` installs both).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bench
from bench.__main__ import main as initbench
from bench.export import run_names
from tests.conftest import run_cli

FACTORY = '''
import torch

def data(seed, n_train=64):
    if seed == 2:
        raise ValueError("seed 2 is unlucky")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train, 4, generator=g)
    return x, x.sum(1, keepdim=True), x[:16], x[:16].sum(1, keepdim=True)
'''
SPEC = """
name = "export"
[grid]
init = ["kaiming_normal", "zeros"]
lr = [0.05, 50.0]
seed = [0, 1, 2]
[model]
depth = 3
width = 8
[task]
name = "exportdata:data"
[train]
steps = 20
batch_size = 16
log_every = 10
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """12 jobs: 2 schemes x 2 learning rates (one diverges) x 3 seeds (seed 2 fails)."""
    tmp = tmp_path_factory.mktemp("export")
    (tmp / "exportdata.py").write_text(FACTORY)
    (tmp / "spec.toml").write_text(SPEC)
    proc = run_cli("bench.sweep", str(tmp / "spec.toml"), "--out", str(tmp / "out"), "--quiet",
                   "--no-report", "--jobs", "1", env={"PYTHONPATH": str(tmp)})
    assert proc.returncode == 1, proc.stderr  # 1: some jobs failed, as intended
    statuses = set(bench.load(tmp / "out", traces=False).runs["status"])
    assert statuses == {"ok", "diverged", "failed"}, statuses
    return tmp / "out"


def _one_line_error(capsys, argv: list[str], *needles: str) -> None:
    try:
        code = initbench(argv)
    except SystemExit as exit_:  # argparse's errors exit, as they do from the console script
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


# --- TensorBoard --------------------------------------------------------------------
def _accumulator(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _hparams(acc) -> dict:
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    return {tag: HParamsPluginData.FromString(content)
            for tag, content in acc.PluginTagToContent("hparams").items()}


def test_tensorboard_one_run_per_job_with_curves_metrics_and_grouped_sessions(sweep, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    assert initbench(["export", str(sweep), "--to", "tensorboard", str(out)]) == 0
    assert "12 runs written" in capsys.readouterr().out
    r = bench.load(sweep)
    names = run_names(r)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(names.values())
    assert "init=zeros,lr=50,seed=1" in names.values()  # named by the axes, not by a hash
    groups: dict[str, set[str]] = {}
    for row in r.runs.to_dict("records"):
        acc = _accumulator(out / names[row["job_id"]])
        scalars = acc.Tags()["scalars"]
        assert not any(t.split("/")[0] in ("weight", "bias", "act", "preact") for t in scalars), \
            "per-layer statistics only with --layers"
        curve = r.curves[r.curves["job_id"] == row["job_id"]]
        if row["status"] == "failed":
            assert "curves/train_loss" not in scalars
        else:
            events = acc.Scalars("curves/train_loss")
            assert [e.step for e in events] == curve["step"].tolist()
            np.testing.assert_allclose([e.value for e in events], curve["train_loss"], rtol=1e-6)
            if np.isfinite(row["final_loss"]):  # NaN when diverged: no scalar for it
                final = acc.Scalars("summary/final_loss")[-1].value
                assert final == pytest.approx(row["final_loss"], rel=1e-6)
        assert "curves/final_loss" not in scalars and "summary/train_loss" not in scalars
        session = _hparams(acc)
        start = session["_hparams_/session_start_info"].session_start_info
        end = session["_hparams_/session_end_info"].session_end_info
        assert "seed" not in start.hparams  # seeds aggregate in a group instead
        assert start.hparams["init"].string_value == row["init"]
        assert start.hparams["lr"].number_value == row["lr"]
        assert start.hparams["betas"].string_value == "(0.9, 0.999)"  # a tuple, as text
        assert end.status == (2 if row["status"] == "failed" else 1)  # STATUS_FAILURE / STATUS_SUCCESS
        groups.setdefault(start.group_name, set()).add(row["seed"])
    assert len(groups) == 4 and all(seeds == {0, 1, 2} for seeds in groups.values()), groups
    experiment = _hparams(_accumulator(out))["_hparams_/experiment"].experiment
    assert [h.name for h in experiment.hparam_infos][:2] == ["init", "lr"]  # the axes first
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"summary/final_loss", "summary/loss_auc"} <= metrics


def test_tensorboard_layers_and_rerun_adds_nothing(sweep, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    assert initbench(["export", str(sweep), "--to", "tensorboard", str(out), "--layers"]) == 0
    capsys.readouterr()
    r = bench.load(sweep)
    job = r.runs[r.runs["status"] == "ok"].iloc[0]["job_id"]
    acc = _accumulator(out / run_names(r)[job])
    layers = r.layers[(r.layers["job_id"] == job) & (r.layers["param"] == "weight")]
    for label, rows in layers.groupby("layer"):
        events = acc.Scalars(f"weight/std/{label}")  # the layer label as text: opaque, maybe a module name
        assert [e.step for e in events] == rows["step"].tolist()
        np.testing.assert_allclose([e.value for e in events], rows["std"], rtol=1e-6)
    files = sorted(out.rglob("events.out.tfevents.*"))
    assert initbench(["export", str(sweep), "--to", "tensorboard", str(out), "--layers"]) == 0
    assert "0 runs written" in capsys.readouterr().out
    assert len(sorted(out.rglob("events.out.tfevents.*"))) == len(files)  # no run twice


# --- MLflow ---------------------------------------------------------------------------
def _children(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("export")  # named after the sweep
    runs = mlflow.search_runs([experiment.experiment_id])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    return client, parents, runs[runs["tags.mlflow.parentRunId"].notna()]


def test_mlflow_one_child_per_job_with_metrics_equal_to_load(sweep, tmp_path, capsys):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = bench.load(sweep)
    from bench.export.mlflow import write

    partial = bench.load(sweep)
    partial.runs = partial.runs.iloc[:5]
    assert write(partial, uri).written == 5
    assert initbench(["export", str(sweep), "--to", "mlflow", uri]) == 0  # adds only the other 7
    assert "7 child runs written" in capsys.readouterr().out
    client, parents, children = _children(uri)
    assert len(parents) == 1 and (children["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]).all()
    assert sorted(children["tags.initbench.job_id"]) == sorted(r.runs["job_id"])
    children = children.set_index("tags.initbench.job_id").loc[r.runs["job_id"]]
    for metric in ("final_loss", "loss_auc", "diverged_at", "grad_ratio_init"):
        np.testing.assert_allclose(children[f"metrics.{metric}"].astype(float), r.runs[metric].astype(float),
                                   rtol=1e-12, equal_nan=True, err_msg=metric)
    assert (children["params.lr"].astype(float).to_numpy() == r.runs["lr"].to_numpy()).all()
    assert (children["params.betas"] == "(0.9, 0.999)").all()
    expected = np.where(r.runs["status"] == "failed", "FAILED", "FINISHED")
    assert (children["status"].to_numpy() == expected).all()
    assert (children["tags.initbench.status"].to_numpy() == r.runs["status"].to_numpy()).all()
    ok = r.runs[r.runs["status"] == "ok"].iloc[0]["job_id"]
    history = client.get_metric_history(children.loc[ok, "run_id"], "train_loss")
    curve = r.curves[r.curves["job_id"] == ok]
    assert [m.step for m in history] == curve["step"].tolist()
    np.testing.assert_allclose([m.value for m in history], curve["train_loss"].astype(float), rtol=1e-12)


def test_mlflow_reexport_skips_finished_and_redoes_interrupted(sweep, tmp_path, capsys):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert initbench(["export", str(sweep), "--to", "mlflow", uri]) == 0
    client, parents, children = _children(uri)
    victim = children.iloc[0]
    # An export killed mid-job leaves a RUNNING child: rewritten, since its params cannot be amended.
    client.delete_run(victim["run_id"])
    half = client.create_run(victim["experiment_id"], tags={
        "mlflow.parentRunId": parents["run_id"].iloc[0], "initbench.job_id": victim["tags.initbench.job_id"]})
    capsys.readouterr()
    assert initbench(["export", str(sweep), "--to", "mlflow", uri]) == 0
    assert "1 child runs written" in capsys.readouterr().out
    _, _, again = _children(uri)
    assert len(again) == 12 and half.info.run_id not in set(again["run_id"])
    assert (again["status"] != "RUNNING").all()


def test_mlflow_batches_stay_within_log_batch_limits():
    from bench.export.mlflow import batches

    metrics, params = list(range(2500)), [f"p{i}" for i in range(250)]
    calls = batches(metrics, params)
    assert all(len(m) <= 1000 and len(p) <= 100 and len(m) + len(p) <= 1000 for m, p in calls)
    assert [x for m, _ in calls for x in m] == metrics and [x for _, p in calls for x in p] == params
    assert batches([], []) == []


# --- the command: bad input, missing extras, lazy imports --------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["frob"], ("invalid choice", "sweep", "export")),
    ([], ("missing COMMAND",)),
    (["export", "{dir}", "--to", "wandb"], ("unknown export target", "tensorboard, mlflow")),
    (["export", "{missing}", "--to", "tensorboard"], ("no such directory",)),
    (["export", "{empty}", "--to", "tensorboard"], ("no results store",)),
    (["export", "{dir}"], ("--to",)),
    (["export", "{dir}", "--to", "mlflow", "a", "b"], ("at most one destination",)),
    (["export", "{dir}", "--to", "mlflow", "--layers"], ("--layers does not apply to --to mlflow",)),
])
def test_bad_input_is_one_line_and_exit_2(argv, needles, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    empty = str(tmp_path / "empty")
    values = {"dir": empty, "missing": str(tmp_path / "nope"), "empty": empty}
    _one_line_error(capsys, [a.format(**values) for a in argv], *needles)


@pytest.mark.parametrize("target", ["tensorboard", "mlflow"])
def test_missing_extra_names_it(target, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, target, None)  # as if not installed: import raises ImportError
    _one_line_error(capsys, ["export", str(tmp_path), "--to", target], f"pip install 'initbench[{target}]'")


def test_the_command_without_an_exporter_imported(tmp_path):
    code = ("import sys, bench, bench.export, bench.export.tensorboard, bench.export.mlflow, bench.plot, "
            "bench.overview, bench.__main__; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'mlflow', 'torch')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = run_cli("bench", "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"initbench {bench.__version__}"
    proc = run_cli("bench", "--help")
    assert proc.returncode == 0
    assert all(c in proc.stdout for c in ("sweep", "report", "regress", "audit", "export"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_subcommands_run_each_modules_main(tiny_spec, capsys):
    from bench import sweep

    assert sweep.main([str(tiny_spec), "--dry-run"]) == 0
    direct = capsys.readouterr().out
    assert initbench(["sweep", str(tiny_spec), "--dry-run"]) == 0
    assert capsys.readouterr().out == direct and "12" in direct
    script = Path(sys.executable).parent / "initbench"  # the console script of `pip install -e .`
    if script.exists():
        proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.startswith("initbench ")
