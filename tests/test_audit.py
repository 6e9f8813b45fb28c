"""Tests for bench.audit: default-init fingerprints, the scheme matcher, and --save/--against."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from bench import audit
from bench.errors import UserError

ROOT = Path(__file__).parents[1]
KAIMING = audit.KAIMING_A5
HIDDEN = "U(+-1/sqrt(hidden))"
ARCH = "nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))"
CLEAN_MOD = f"from torch import nn\n\n\ndef build():\n    return {ARCH}\n"
# Imported only by the patched run: every Linear weight gets half the default std.
PATCHED_MOD = f"""import torch
from torch import nn

_orig = nn.Linear.reset_parameters


def _half(self):
    _orig(self)
    with torch.no_grad():
        self.weight.mul_(0.5)


nn.Linear.reset_parameters = _half


def build():
    return {ARCH}
"""


def expected_scheme(module: str, parameter: str) -> str:
    """The scheme PyTorch documents for each built-in module's default init."""
    if module in ("LSTM", "GRU"):
        return HIDDEN
    if module == "Embedding":
        return "N(0,1)"
    if module in ("LayerNorm", "BatchNorm2d"):
        return "ones" if parameter == "weight" else "zeros"
    if module == "MultiheadAttention":
        return {"out_proj.weight": KAIMING, "out_proj.bias": "zeros", "in_proj_bias": "zeros"}.get(
            parameter, "xavier_uniform"
        )
    return KAIMING  # Linear and every Conv: kaiming_uniform(a=sqrt(5)) for weight and bias


def cli(*args: str, env_path: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real command line from the repository root."""
    env = dict(os.environ)
    if env_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(env_path), str(ROOT)])
    return subprocess.run(
        [sys.executable, "-m", "bench.audit", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )


ORIGINAL_LINEAR_RESET = nn.Linear.reset_parameters


def half_linear(self: nn.Linear) -> None:
    """A regressed reset_parameters: the default init at half the std."""
    ORIGINAL_LINEAR_RESET(self)
    with torch.no_grad():
        self.weight.mul_(0.5)


@pytest.fixture(scope="module")
def default_audit() -> list[audit.Fingerprint]:
    return audit.audit(list(audit.MODULES))  # the default draws, as `python -m bench.audit` runs


def test_every_builtin_parameter_matches_its_documented_scheme(default_audit):
    assert {fp.module for fp in default_audit} == set(audit.MODULES)
    for fp in default_audit:
        where = f"{fp.module} {fp.shape} {fp.parameter}"
        assert fp.scheme == expected_scheme(fp.module, fp.parameter), where
        assert fp.n >= 20_000, where
        if fp.scheme in ("zeros", "ones"):
            assert fp.std == 0 and (fp.zeros if fp.scheme == "zeros" else fp.ones) == 1.0, where
        else:
            assert fp.ks < 0.05 and fp.ks_p > audit.UNKNOWN_P, where
            assert fp.zeros < 1e-5, where
        if fp.scheme == KAIMING:
            assert fp.std_fan == pytest.approx(1 / math.sqrt(3), rel=0.03), where
            assert fp.absmax_fan == pytest.approx(1.0, abs=0.01), where
            assert fp.kurtosis == pytest.approx(-1.2, abs=0.1), where
        if fp.scheme == "N(0,1)":
            assert fp.std == pytest.approx(1.0, rel=0.03) and fp.kurtosis == pytest.approx(0, abs=0.2)


def test_fans_follow_torch(default_audit):
    by_key = {fp.key: fp for fp in default_audit}
    assert by_key["Conv2d", "32->32 k3 g4", "weight"].fan_in == 8 * 3 * 3  # groups divide fan_in
    assert by_key["Conv2d", "32->32 k3 g4", "bias"].fan_in == 8 * 3 * 3  # a bias takes its weight's fan_in
    assert by_key["ConvTranspose2d", "32->16 k4", "weight"].fan_in == 16 * 4 * 4  # dim 1 is fan_in
    assert by_key["LayerNorm", "64", "weight"].fan_in is None


def test_same_seed_is_identical_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = audit.audit(["Linear", "LSTM"], draws=5, seed=7)
    assert torch.equal(torch.rand(3), expected)
    assert audit.audit(["Linear", "LSTM"], draws=5, seed=7) == first
    assert audit.audit(["Linear", "LSTM"], draws=5, seed=8) != first


def test_compare_catches_patched_linear_reset_in_process():
    clean = audit.audit(["Linear"], draws=40, seed=0)
    try:
        nn.Linear.reset_parameters = half_linear
        patched = audit.audit(["Linear"], draws=40, seed=1)
    finally:
        nn.Linear.reset_parameters = ORIGINAL_LINEAR_RESET
    changes = audit.compare(clean, patched)
    moved = {(c.shape, c.parameter, c.field) for c in changes}
    for shape, _ in audit.MODULES["Linear"]:
        assert {(shape, "weight", "std"), (shape, "weight", "scheme")} <= moved
    assert not [c for c in changes if c.parameter == "bias"]
    std = next(c for c in changes if c.field == "std")
    assert float(std.new) == pytest.approx(float(std.old) / 2, rel=0.05)
    assert audit.compare(clean, audit.audit(["Linear"], draws=40, seed=2)) == []


def test_compare_lists_missing_and_extra_entries():
    fps = audit.audit(["LayerNorm"], draws=2)
    changes = audit.compare(fps[:-1], fps[1:])
    assert [(c.parameter, c.old, c.new) for c in changes] == [("weight", "present", "missing"),
                                                              ("bias", "missing", "present")]


def test_cli_save_then_against_same_and_different_seed(tmp_path, capsys):
    # In this process: the file round trip is the point; exit 2 and the patched factory below need
    # a process of their own.
    base = tmp_path / "sub" / "audit.json"
    common = ["--modules", "Linear,Embedding,LayerNorm,GRU,MultiheadAttention", "--draws", "30"]
    assert audit.main([*common, "--save", str(base)]) == 0
    doc = json.loads(base.read_text())
    assert doc["format"] == audit.FORMAT and doc["version"] == audit.VERSION
    assert doc["environment"]["torch_version"] == torch.__version__ and "host" in doc["environment"]
    assert not list(base.parent.glob("*.tmp"))
    for seed in ("0", "1"):
        capsys.readouterr()
        code = audit.main([*common, "--seed", seed, "--against", str(base)])
        out, err = capsys.readouterr()
        assert code == 0, out + err
        assert "match" in out


def test_plain_run_prints_the_fingerprint_table(capsys):
    assert audit.main(["--modules", "Embedding,LayerNorm", "--draws", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["module", "shape", "parameter"]
    assert len(out) == 1 + 2 + 4 and "N(0,1)" in out[1] and out[-1].split()[-3] == "zeros"


def test_cli_catches_patched_reset_parameters_via_factory(tmp_path, monkeypatch, capsys):
    # Only the patched factory needs a process of its own (importing it patches nn.Linear for good);
    # the clean one runs in this process.
    (tmp_path / "clean_mod.py").write_text(CLEAN_MOD)
    (tmp_path / "patched_mod.py").write_text(PATCHED_MOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = tmp_path / "base.json"
    common = ["--draws", "100"]
    assert audit.main([*common, "--factory", "clean_mod:build", "--save", str(base)]) == 0
    bad = cli(*common, "--factory", "patched_mod:build", "--seed", "1", "--against", str(base),
              env_path=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    rows = [line.split() for line in bad.stdout.splitlines()]
    flagged = {(r[2], r[3]) for r in rows if len(r) >= 4 and r[0] == "factory"}
    assert {("0.weight", "std"), ("2.weight", "std"), ("0.weight", "scheme")} <= flagged
    assert not {p for p, _ in flagged if p.endswith("bias")}
    capsys.readouterr()
    code = audit.main([*common, "--factory", "clean_mod:build", "--seed", "1", "--against", str(base)])
    assert code == 0, capsys.readouterr()


def test_cli_unknown_module_exits_2_with_one_line():
    result = cli("--modules", "Linear,Foo")
    assert result.returncode == 2 and not result.stdout
    assert result.stderr == (
        f"error: unknown module 'Foo'; choose from [{', '.join(audit.MODULES)}]\n"
    )


def test_save_with_against_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:  # argparse's own error path, via cli.Parser
        audit.main(["--save", "a.json", "--against", "b.json"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not allowed with argument" in err, err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--factory", "nonsense"], "'nonsense'"),
        (["--factory", "no_such_module_xyz:build"], "no_such_module_xyz"),
        (["--modules", ","], "--modules"),
        (["--draws", "0"], "--draws"),
        (["--against", "absent.json"], "absent.json"),
    ],
)
def test_main_bad_input_returns_2_with_one_line(args, needle, capsys):
    assert audit.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"format": "something-else"}),
     json.dumps({"format": audit.FORMAT, "version": 99, "fingerprints": []}),
     json.dumps({"format": audit.FORMAT, "version": audit.VERSION, "fingerprints": [{"module": "Linear"}]})],
)
def test_corrupt_or_foreign_baseline_is_a_user_error(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match="bad.json"):
        audit.load(path)


def test_corrupt_against_file_exits_2(tmp_path, capsys):
    good = tmp_path / "good.json"
    audit.save(good, audit.audit(["LayerNorm"], draws=2), {})
    doc = json.loads(good.read_text())
    doc["fingerprints"][0]["std"] = "wide"
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(doc))
    assert audit.main(["--modules", "LayerNorm", "--against", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "edited.json" in err and "std" in err, err


@pytest.mark.parametrize("spec", ["math:pi", "builtins:dict", "json:dumps", "json:", ":build"])
def test_factory_that_is_not_a_module_builder_is_a_user_error(spec):
    with pytest.raises(UserError, match="--factory"):
        audit.load_factory(spec)()


def test_conv_transpose_fans_are_explained_where_printed(capsys):
    """PyTorch's fan_in of a transposed convolution is out_channels x kernel: the table says so."""
    assert audit.main(["--modules", "ConvTranspose2d", "--draws", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("ConvTranspose2d")]
    weight = next(r for r in rows if r[3] == "weight" and r[1:3] == ["32->16", "k4"])
    assert weight[5:7] == ["256", "512"]  # (32, 16, 4, 4): fan_in = 16 x 16, fan_out = 32 x 16
    assert "out_channels x kernel size" in out
    assert audit.main(["--modules", "Linear", "--draws", "2"]) == 0
    assert "ConvTranspose" not in capsys.readouterr().out


TRUNC_MOD = """import torch
from torch import nn


def build():
    model = nn.Sequential(nn.Linear(256, 128), nn.Linear(256, 128))
    with torch.no_grad():
        nn.init.trunc_normal_(model[0].weight, std=0.02, a=-0.04, b=0.04)  # a 2-std cut: absolute bounds
        model[1].weight.normal_(0.0, 0.02)
    return model
"""


def test_factory_names_a_truncated_normal(tmp_path, monkeypatch, capsys):
    # KS on 2000 values cannot tell a +-2 std cut from the plain normal (the CDFs differ by at most
    # 0.023); the kurtosis can (-0.634 against 0), and so must the audit. In this process: the
    # factory patches nothing, so no fresh interpreter is needed.
    (tmp_path / "trunc_mod.py").write_text(TRUNC_MOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    capsys.readouterr()
    code = audit.main(["--factory", "trunc_mod:build", "--draws", "40"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stdout + stderr
    rows = {r[2]: r for r in (line.split() for line in stdout.splitlines()) if r[0] == "factory"}
    cols = stdout.splitlines()[0].split()
    trunc, plain = rows["0.weight"], rows["1.weight"]
    assert trunc[cols.index("scheme")] == "trunc_normal(0.02,+-2std)"
    assert plain[cols.index("scheme")] == "N(0,0.02)"
    assert float(trunc[cols.index("std")]) == pytest.approx(0.0176, abs=2e-4)
    assert float(trunc[cols.index("kurtosis")]) == pytest.approx(-0.634, abs=0.05)


def test_kurtosis_rejects_a_normal_for_its_truncation():
    rng = np.random.default_rng(0)
    x = stats.truncnorm.rvs(-2, 2, scale=0.02, size=40_000, random_state=rng)
    fps = audit._match(x, 256, 128, None, rng, audit._kurtosis(x), 0.02)
    assert fps[0] == "trunc_normal(0.02,+-2std)" and fps[3]["N(0,0.02)"] == 0.0
    y = rng.normal(0, 0.02, 40_000)
    assert audit._match(y, 256, 128, None, rng, audit._kurtosis(y), 0.02)[0] == "N(0,0.02)"
