"""Notebook use: ``bench.load``'s short repr and escaped HTML, and ``bench.plot``'s figures."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

import bench
import bench.plot
from bench import sweep
from bench.errors import UserError
from tests.conftest import TINY_SPEC

NAME = "<script>alert('x')</script> & co"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """The tiny sweep (12 jobs), under a hostile name, with an easy target so that jobs reach it."""
    tmp = tmp_path_factory.mktemp("notebook")
    spec = tmp / "tiny.toml"
    text = TINY_SPEC.replace('name = "tiny"', f'name = "{NAME}"')
    spec.write_text(text + "[metrics]\ntarget_ratio = 0.9\n")
    assert sweep.main([str(spec), "--out", str(tmp / "out"), "--quiet", "--no-report"]) == 0
    return tmp / "out"


def test_repr_is_a_short_summary(store):
    r = bench.load(store)
    text = repr(r)
    assert len(text.splitlines()) <= 12 and len(text) < 1000, text
    assert "12: 12 ok" in text
    assert "init (3): default, kaiming_normal, zeros" in text and "seed (2): 0, 1" in text
    assert str(store / "store.sqlite") in text
    assert "curves 48 rows" in text
    assert "layers 0 rows" in repr(bench.load(store, traces=False))


def test_html_summary_is_escaped(store):
    page = bench.load(store)._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp; co" in page
    assert "kaiming_normal" in page and "median final_loss" in page


@pytest.mark.parametrize("name", list(bench.plot.FIGURES))
def test_every_report_figure_is_a_matplotlib_figure(store, name):
    fig = bench.plot.FIGURES[name](bench.load(store))
    assert isinstance(fig, Figure) and fig.axes
    assert any(line.get_xydata().size for ax in fig.axes for line in ax.get_lines()) or \
        any(ax.images or ax.collections for ax in fig.axes), f"{name}: nothing drawn"
    png = io.BytesIO()
    fig.savefig(png, format="png")
    assert png.getvalue()[:4] == b"\x89PNG"
    assert plt.get_fignums() == []  # not left in pyplot's registry: a notebook shows the returned one once


def test_a_subset_and_figures_with_nothing_to_draw(store):
    r = bench.load(store)
    r.runs = r.runs[r.runs["init"] != "zeros"]
    assert isinstance(bench.plot.heatmap(r, "final_loss"), Figure)
    with pytest.raises(UserError, match="unknown metric 'loss'"):
        bench.plot.heatmap(r, "loss")
    with pytest.raises(UserError, match="no data"):
        bench.plot.propagation(bench.load(store, traces=False))
