"""The HTML report: structure, self-containment, escaping, edge cases, and a render in a real browser.

Sweeps write the report themselves into ``tmp_path``; ``python -m bench.report`` rebuilds it.
The shared ``small`` sweep and the one whose task is user code (run in worker processes, which
must find it on PYTHONPATH) go through the real CLI (``python -m bench.sweep``); the others run
``bench.sweep.main`` in this process, the same code without starting Python and torch again.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# Among the longest files: run first (see tests/conftest.py).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SECTION_IDS = ("header", "leaderboard", "heatmaps", "depth", "curves", "network", "pathologies", "data")
DATA_FILES = ("runs.csv", "runs.parquet", "summary.csv", "summary.parquet")
IMG = re.compile(r'<img[^>]*\bsrc="data:image/png;base64,([A-Za-z0-9+/=]+)"')

SMALL = """
name = "{name}"
[grid]
init = ["kaiming_normal", "zeros"]
depth = [2, 3]
lr = [0.01, 0.1]
seed = [0, 1]
[model]
arch = "mlp"
width = 8
[task]
name = "{task}"
{task_params}
[train]
steps = 30
batch_size = 16
log_every = 10
"""
TEACHER = "n_train = 64\nn_val = 32"
SINGLE = """
name = "<script>alert(1)</script>"
[model]
arch = "mlp"
depth = 2
width = 8
init = "kaiming_normal"
[task]
name = "teacher"
n_train = 64
n_val = 32
[train]
steps = 30
batch_size = 16
log_every = 10
"""


def _env(extra_path: Path | None = None) -> dict[str, str]:
    paths = [str(ROOT), *([str(extra_path)] if extra_path else []), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env or _env(), capture_output=True,
                          text=True, timeout=300)


def _sweep(tmp: Path, spec_text: str, *, expect: int = 0, extra_path: Path | None = None,
           cli: bool = False) -> Path:
    spec = tmp / "spec.toml"
    spec.write_text(spec_text)
    out = tmp / "out"
    if cli or extra_path:
        proc = _run(["bench.sweep", str(spec), "--out", str(out), "--quiet"], _env(extra_path))
        assert proc.returncode == expect, proc.stderr
    else:
        from bench import sweep

        assert sweep.main([str(spec), "--out", str(out), "--quiet"]) == expect
    assert (out / "report.html").is_file(), "the sweep did not write its report"
    return out


def _page(out: Path) -> str:
    return (out / "report.html").read_text(encoding="utf-8")


def _sections(page: str) -> None:
    for section in SECTION_IDS:
        assert f'<section id="{section}">' in page, f"section #{section} missing"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """2 inits x 2 depths x 2 lrs x 2 seeds, 30 steps: the report of a real (tiny) sweep."""
    return _sweep(tmp_path_factory.mktemp("small"), SMALL.format(name="small", task="teacher",
                                                                 task_params=TEACHER), cli=True)


def test_cli_rebuilds_the_report(small):
    (small / "report.html").unlink()
    proc = _run(["bench.report", str(small)])
    assert proc.returncode == 0, proc.stderr
    assert str(small / "report.html") in proc.stdout
    _sections(_page(small))


def test_every_section_has_content(small):
    page = _page(small)
    _sections(page)
    # profile, two heatmaps, depth scaling, curves, signal propagation, trajectories
    assert len(IMG.findall(page)) >= 7
    assert "initbench report: small" in page
    assert "kaiming_normal" in page and "zeros" in page
    assert "<details>" in page and 'name = &#34;small&#34;' in page  # the spec text, escaped


def test_every_figure_is_an_embedded_png_that_decodes(small):
    from matplotlib.image import imread

    images = IMG.findall(_page(small))
    assert images
    for encoded in images:
        raw = base64.b64decode(encoded, validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = imread(io.BytesIO(raw), format="png")
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100
        assert pixels.std() > 0.01, "a blank figure"


def test_page_is_self_contained(small):
    page = _page(small)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert "url(" not in page
    for attr, value in re.findall(r'\b(src|href)="([^"]*)"', page):
        if attr == "src":
            assert value.startswith("data:image/png;base64,"), value[:40]
        else:  # in-page anchors and the data files beside the page, nothing else
            assert value.startswith("#") or value in DATA_FILES, value
            assert "//" not in value


def test_data_files_are_written_and_linked(small):
    page = _page(small)
    for name in DATA_FILES:
        assert f'href="{name}"' in page
        assert (small / name).stat().st_size > 0
    runs = pd.read_parquet(small / "runs.parquet")
    assert len(runs) == 16 and set(runs["init"]) == {"kaiming_normal", "zeros"}
    assert len(pd.read_csv(small / "runs.csv")) == 16
    summary = pd.read_parquet(small / "summary.parquet")
    assert len(summary) == 8 and {"success_rate", "steps_to_target_median"} <= set(summary.columns)
    assert len(pd.read_csv(small / "summary.csv")) == 8


def test_spec_strings_are_escaped_and_a_single_job_gives_a_page(tmp_path):
    page = _page(_sweep(tmp_path, SINGLE))
    _sections(page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page.lower()
    assert "no data" in page  # one job: no heatmap axes, nothing to scale along
    assert IMG.search(page), "the learning curve of the single job is still drawn"


def test_a_sweep_whose_every_job_fails_gives_a_page(tmp_path):
    (tmp_path / "boom_task.py").write_text(
        "def load(seed, **params):\n    raise RuntimeError('no data for you <b>bold</b>')\n")
    spec = SMALL.format(name="all failed", task="boom_task:load", task_params="")
    spec = spec.replace("depth = [2, 3]", "depth = [2]").replace("seed = [0, 1]", "seed = [0]")
    out = _sweep(tmp_path, spec, expect=1, extra_path=tmp_path)
    page = _page(out)
    _sections(page)
    assert "every job failed" in page
    assert "no data for you &lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold" not in page
    assert not IMG.search(page)
    assert len(pd.read_csv(out / "runs.csv")) == 4


def test_nan_metrics_give_a_page(small, tmp_path):
    from bench.report import build

    out = tmp_path / "nan"
    out.mkdir()
    shutil.copy(small / "store.sqlite", out / "store.sqlite")
    con = sqlite3.connect(out / "store.sqlite")
    with con:
        for job_id, metrics in con.execute("SELECT job_id, metrics FROM runs").fetchall():
            nan = {k: float("nan") for k in json.loads(metrics)}
            con.execute("UPDATE runs SET metrics = ? WHERE job_id = ?", (json.dumps(nan), job_id))
    con.close()
    page = build(out).read_text(encoding="utf-8")
    _sections(page)
    assert "no run reached the target" in page


def test_a_store_with_no_jobs_yet_gives_a_page(tmp_path):
    from bench.report import build
    from bench.store import Store

    meta = {"spec_text": 'name = "fresh"', "spec_name": "fresh", "axes": ["init", "depth"], "env": {}}
    Store.open(tmp_path, fingerprint="0", meta=meta).close()  # what a sweep has written before its first job
    page = build(tmp_path).read_text(encoding="utf-8")
    _sections(page)
    assert "initbench report: fresh" in page and "no jobs yet" in page


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_cli_bad_directory_is_one_line_and_exit_2(tmp_path, make):
    target = tmp_path / "nothing-here"
    if make == "empty":
        target.mkdir()
    proc = _run(["bench.report", str(target)])
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert str(target) in proc.stderr


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("chromium is not installed; the report must be rendered in a real browser. Install it with "
                "`apt-get install -y --no-install-recommends chromium` (.ci/run does this)")


def test_report_renders_in_a_headless_browser(small, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1280,2000",
         (small / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    non_white = (pixels < 0.95).any(axis=-1).mean()
    colours = len(np.unique((pixels * 31).astype(np.uint8).reshape(-1, 3), axis=0))
    assert non_white > 0.05, f"the page looks blank ({non_white:.1%} non-white pixels)"
    assert colours > 100, f"the page has only {colours} distinct colours: figures missing?"


# --- the pieces, on data with known answers ------------------------------------------
def test_scheme_colours_are_fixed_and_colourblind_safe():
    import seaborn as sns

    from bench.report.grid import scheme_colors

    known = ["default", "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal", "zeros",
             "scaled_normal", "orthogonal", "mean_field", "lsuv"]
    everything = scheme_colors(known)
    assert len(set(everything.values())) == len(known)
    assert set(everything.values()) == set(sns.color_palette("colorblind", 10).as_hex())
    assert scheme_colors(["zeros"]) == {"zeros": everything["zeros"]}  # same colour, whatever else is there
    assert scheme_colors(["my_init", "zeros"])["zeros"] == everything["zeros"]


def test_performance_profile_on_known_steps():
    from bench.report.figures import performance_profile

    inf = np.inf
    steps = pd.DataFrame({"a": [10, 20, inf, inf], "b": [20, 20, 40, inf]})
    frac, ever = performance_profile(steps, np.array([1.0, 1.5, 2.0, 4.0]))
    # cell 1: a best, b at 2x; cell 2: tie; cell 3: only b; cell 4: nobody (counts against both)
    assert frac["a"].tolist() == [0.5, 0.5, 0.5, 0.5]
    assert frac["b"].tolist() == [0.5, 0.5, 0.75, 0.75]
    assert ever.to_dict() == {"a": 0.5, "b": 0.75}


def test_median_ci_counts_never_as_infinitely_slow():
    from bench.report.grid import median_ci

    med, low, high = median_ci(np.array([10.0, 20.0, np.inf, np.inf, np.inf]))
    assert med == np.inf and high == np.inf and 10 <= low <= np.inf
    med, low, high = median_ci(np.array([10.0, 10.0, 10.0]))
    assert (med, low, high) == (10.0, 10.0, 10.0)
    assert np.isnan(median_ci(np.array([np.nan]))[0])


def test_a_regression_check_gets_its_own_section(small, tmp_path):
    """bench.regress writes regression.json; the report shows its verdict and every flagged cell."""
    from bench.report import build

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(small / "store.sqlite", out / "store.sqlite")  # any finished sweep; the check is planted
    (out / "regression.json").write_text(json.dumps({
        "format": "initbench-regression", "version": 1, "baseline": "baselines/x.json", "passed": False,
        "summary": {"text": "regress: 1 regressions <b>bold</b>"},
        "rows": [{"verdict": "regression", "cell": "init=default depth=2", "metric": "final_loss",
                  "baseline": 0.1, "current": 0.3, "change_text": "+200%", "tolerance": "10%", "q": 0.001,
                  "message": "final_loss +200% exceeds 10%"},
                 {"verdict": "unchanged", "cell": "init=zeros depth=2", "metric": "final_loss",
                  "baseline": 1.0, "current": 1.0, "change_text": "0%", "tolerance": "10%", "q": 1.0,
                  "message": ""}],
        "missing": ["init=orthogonal depth=9"], "new": [], "crashed": {}}))
    page = build(out).read_text(encoding="utf-8")
    assert 'id="regression"' in page and "FAIL" in page and 'href="#regression"' in page
    section = page[page.index('id="regression"'):page.index('id="leaderboard"')]
    assert "final_loss +200% exceeds 10%" in section and "init=zeros" not in section
    assert "init=orthogonal depth=9" in section
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page


# --- the coordinate check and deep models --------------------------------------------
COORD = """
name = "coord"
[grid]
init = ["kaiming_normal", "mup"]
width = [16, 32, 64]
seed = [0]
[model]
arch = "resmlp"
depth = 2
[init_params.mup]
base_width = 16
[task]
name = "teacher"
n_train = 128
n_val = 32
[train]
optimizer = "adam"
lr = 0.01
steps = 2
batch_size = 32
log_every = 1
"""
# 5 pre-LN blocks of 8 probed modules each, plus tok, pos, ln_f and head: 44 modules (> MANY_MODULES).
DEEP = """
name = "deep"
[grid]
init = ["scaled_normal", "gpt2"]
seed = [0]
[model]
arch = "transformer"
depth = 5
width = 16
heads = 2
[task]
name = "markov"
seq_len = 8
[train]
optimizer = "adam"
lr = 0.003
steps = 2
batch_size = 8
log_every = 1
[init_params.scaled_normal]
std = 0.02
[init_params.gpt2]
std = 0.02
"""
TITLE = re.compile(r'<img[^>]*\balt="([^"]+)"')


def _section(page: str, section: str) -> str:
    start = page.index(f'<section id="{section}">')
    return page[start:page.index("</section>", start)]


def _planted(widths=(16, 32, 64, 128), steps=(0, 1)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs along width and probe rows whose sizes are planted: ``grows`` has RMS = width / 100 (slope
    1), ``flat`` RMS 0.5 at every width (slope 0); two seeds each, the seeds' sizes differing by a
    constant factor (which does not change a log-log slope)."""
    runs, rows = [], []
    for width in widths:
        for seed in (0, 1):
            job = f"w{width}s{seed}"
            runs.append({"job_id": job, "init": "sp", "width": width, "seed": seed, "status": "ok",
                         "steps_to_target": 1.0, "final_loss": 0.1})
            for step in steps:
                scale = 1 + seed
                rows += [{"job_id": job, "step": step, "layer": "grows", "index": 0, "param": "output",
                          "mean": 0.0, "std": scale * width / 100},
                         {"job_id": job, "step": step, "layer": "flat", "index": 1, "param": "act",
                          "mean": 0.3 * scale, "std": 0.4 * scale}]
    return pd.DataFrame(runs), pd.DataFrame(rows)


def test_coordinate_slopes_are_measured_on_planted_sizes():
    from bench.report import coord, network
    from bench.report.grid import prepare

    runs, layers = _planted()
    table = coord.slopes(coord.sizes(layers, runs), "init").set_index(["module", "step"])
    assert np.allclose(table["slope"].xs("grows", level="module"), 1.0)
    assert np.allclose(table["slope"].xs("flat", level="module"), 0.0, atol=1e-9)
    assert table.xs("grows", level="module")["grows"].all()
    assert not table.xs("flat", level="module")["grows"].any()

    grid = prepare(runs, {"axes": ["init", "width", "seed"]})
    section = network.coord_section(grid, layers)
    assert [row["scheme"] for row in section["flags"]] == ["sp"]
    assert section["flags"][0]["grow with width"] == 1 and section["flags"][0]["modules"] == 2
    # columns: scheme, module, slope at step 0, at step 1, grows with width
    rows = re.findall(r"<tr>(.*?)</tr>", section["modules"], re.S)
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in rows]
    assert cells == [["sp", "grows", "+1.00", "+1.00", "yes"], ["sp", "flat", "+0.00", "+0.00", ""]]
    assert section["figure"].uri.startswith("data:image/png;base64,")


def test_a_sweep_along_width_gets_a_coordinate_check(tmp_path, small):
    page = _page(_sweep(tmp_path, COORD))
    _sections(page)
    assert 'href="#coord"' in page
    coord = _section(page, "coord")
    assert TITLE.findall(coord) == ["Coordinate check: module output size against width"]
    assert "activations_grow_with_width" in coord and "<details class=\"modules\" open>" in coord
    for module in ("stem", "blocks.0", "blocks.1.fc2", "head"):
        assert f"<td>{module}</td>" in coord
    assert 'id="coord"' not in _page(small) and 'href="#coord"' not in _page(small)  # no width axis


def test_a_deep_transformer_is_drawn_per_block_with_the_modules_folded(tmp_path, small):
    out = _sweep(tmp_path, DEEP)
    page = _page(out)
    _sections(page)
    network = _section(page, "network")
    assert TITLE.findall(network) == ["Signal propagation at initialization",
                                      "Parameter trajectories during training"]
    assert "drawn per residual block: the model has 44 probed modules" in network
    details = network[network.index('<details class="modules">'):network.index("</details>")]
    assert "44 modules" in details
    for module in ("tok", "blocks.0.attn.qkv", "blocks.4.mlp.proj", "ln_f", "head"):
        assert f"<td>{module}</td>" in details
    # A small MLP keeps the figure per module, with nothing folded.
    small_page = _page(small)
    assert 'class="modules"' not in small_page and "per residual block" not in small_page
    assert TITLE.findall(_section(small_page, "network")) == ["Signal propagation at initialization",
                                                              "Parameter trajectories during training"]
    assert "x: each module&#39;s position in the forward pass" in small_page


DEEP_RESMLP = """
name = "deep_resmlp"
[grid]
init = ["default", "zero_residual"]
seed = [0]
[model]
arch = "resmlp"
depth = 14
width = 16
[task]
name = "teacher"
n_train = 64
[train]
steps = 2
batch_size = 32
"""


def test_a_deep_residual_mlp_is_drawn_per_block_with_its_stream_theory(tmp_path):
    from bench import sweep

    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(DEEP_RESMLP)
    assert sweep.main([str(spec_path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    network = _section(_page(tmp_path / "out"), "network")
    assert "drawn per residual block" in network
    assert "a third panel sets the stream&#39;s measured second moment q" in network
