"""Bad input through the command line: exit code 2 and one clear stderr line, never a traceback.

Every case of the table runs ``bench.sweep.main`` in this process (``--dry-run``, so a valid spec
would only print its plan), which is exactly what ``python -m bench.sweep`` runs. The cases marked
``sub`` - one per distinct error path - also run as a real subprocess. Each subprocess imports
torch (2+ s of CPU), so those run concurrently in one module-scoped fixture.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bench import sweep
from tests.conftest import ROOT, run_cli

torch.set_num_threads(1)

FILE = "{file}"  # stands for the spec's path in a case's expected substrings

# A valid tiny spec; each case edits it (str.replace must hit, checked below).
BASE = """name = "cli-tiny"
[grid]
init = ["kaiming_normal", "xavier_uniform"]
seed = [0, 1]
[model]
depth = 2
width = 8
activation = "relu"
[task]
name = "teacher"
n_train = 32
[train]
lr = 0.1
steps = 5
batch_size = 8
"""


@dataclass(frozen=True)
class Case:
    id: str
    edit: tuple[str, str] | None = None  # (old, new) applied to BASE; None: BASE as is
    append: str = ""  # appended to the spec
    args: tuple[str, ...] = ()  # extra command-line flags
    needles: tuple[str, ...] = ()  # substrings the stderr line must contain
    no_file: bool = False  # do not write the spec file at all
    text: str | None = None  # the whole spec text, instead of BASE
    sub: bool = False  # also run as a subprocess

    def spec_text(self) -> str:
        if self.text is not None:
            return self.text
        text = BASE
        if self.edit is not None:
            old, new = self.edit
            assert old in text, (self.id, old)
            text = text.replace(old, new)
        return text + self.append


CASES = [
    Case("missing-file", sub=True, no_file=True, needles=(FILE, "not found")),
    Case("toml-syntax", sub=True, edit=("[model]", "[model"), needles=(FILE, "TOML syntax error", "line 5")),
    Case("toml-duplicate-key", edit=("width = 8", "width = 8\nwidth = 9"), needles=(FILE, "line 8")),
    Case("unknown-top-level-key", text='bogus = 1\n' + BASE, needles=(FILE, "'bogus'", "'grid'", "'model'")),
    Case("unknown-model-key", edit=("width = 8", "widht = 8"),
         needles=(FILE, "[model]", "'widht'", "'width'")),
    Case("unknown-train-key", edit=("lr = 0.1", "lrate = 0.1"), needles=(FILE, "[train]", "'lrate'", "'lr'")),
    Case("unknown-task-key", edit=("n_train", "n_trian"),
         needles=(FILE, "[task]", "'n_trian'", "'teacher'", "'n_train'")),
    Case("unknown-metrics-key", append="[metrics]\ntarget = 0.1\n",
         needles=(FILE, "[metrics]", "'target'", "'target_ratio'")),
    Case("unknown-runtime-key", append='[runtime]\ndevice = "cpu"\n',
         needles=(FILE, "[runtime]", "'device'", "'devices'")),
    Case("unknown-scheme-param", append="[init_params.scaled_normal]\nsdt = 0.1\n",
         needles=(FILE, "[init_params.scaled_normal]", "'sdt'", "'std'")),
    Case("unknown-scheme-table", append="[init_params.xavier]\ngain = 1.0\n",
         needles=(FILE, "[init_params.xavier]", "unknown init", "'xavier_uniform'")),
    Case("depth-wrong-type", edit=("depth = 2", 'depth = "four"'),
         needles=(FILE, "[model] depth", "'four'", "integer")),
    Case("lr-wrong-type", edit=("lr = 0.1", 'lr = "fast"'), needles=(FILE, "[train] lr", "'fast'", "number")),
    Case("axis-not-a-list", edit=("seed = [0, 1]", "seed = 3"), needles=(FILE, "[grid] seed", "3", "list")),
    Case("axis-wrong-type", edit=("seed = [0, 1]", 'seed = [0, "one"]'),
         needles=(FILE, "[grid] seed", "'one'")),
    Case("unknown-init", sub=True, edit=('"xavier_uniform"]', '"xavier"]'),
         needles=(FILE, "[grid] init", "'xavier'", "'xavier_uniform'", "'kaiming_normal'")),
    Case("unknown-activation", edit=('"relu"', '"swish"'),
         needles=(FILE, "[model] activation", "'swish'", "'gelu'")),
    Case("unknown-task", edit=('"teacher"', '"mnist"'),
         needles=(FILE, "[task] name", "'mnist'", "'teacher'")),
    Case("unknown-optimizer", edit=("lr = 0.1", 'lr = 0.1\noptimizer = "rmsprop"'),
         needles=(FILE, "[train] optimizer", "'rmsprop'", "'sgd'", "'adam'")),
    Case("unknown-arch", edit=("depth = 2", 'depth = 2\narch = "convnet"'),
         needles=(FILE, "[model] arch", "'convnet'", "'cnn'", "'mlp'", "pkg.module:function")),
    Case("depth-zero", edit=("depth = 2", "depth = 0"), needles=(FILE, "[model] depth = 0", ">= 1")),
    Case("width-zero", edit=("width = 8", "width = 0"), needles=(FILE, "[model] width = 0", ">= 1")),
    Case("steps-zero", edit=("steps = 5", "steps = 0"), needles=(FILE, "[train] steps = 0", ">= 1")),
    Case("batch-size-negative", edit=("batch_size = 8", "batch_size = -8"),
         needles=(FILE, "[train] batch_size = -8", ">= 1")),
    Case("lr-zero", edit=("lr = 0.1", "lr = 0"), needles=(FILE, "[train] lr = 0", "> 0")),
    Case("lr-negative", edit=("lr = 0.1", "lr = -0.1"), needles=(FILE, "[train] lr = -0.1", "> 0")),
    Case("lr-axis-zero", edit=("seed = [0, 1]", "lr = [0.1, 0.0]"), needles=(FILE, "[grid] lr = 0.0", "> 0")),
    Case("empty-axis", edit=("seed = [0, 1]", "seed = []"), needles=(FILE, "[grid] seed = []")),
    Case("huge-integer", edit=("lr = 0.1", "lr = 1" + "0" * 400),
         needles=(FILE, "[train] lr", "finite number")),
    Case("runtime-devices", append='[runtime]\ndevices = "tpu"\n',
         needles=(FILE, "[runtime] devices", "'tpu'", "'cpu'")),
    Case("line-break-in-key", edit=("seed = [0, 1]", '"a\\nb" = [1]'), needles=(FILE, "[grid]", "a\\nb")),
    Case("unknown-flag", sub=True, args=("--bogus",), needles=("--bogus", "--jobs", "--devices")),
    Case("jobs-zero", sub=True, args=("--jobs", "0"), needles=("--jobs", "'0'", ">= 1")),
    Case("devices-cuda-7", sub=True, args=("--devices", "cuda:7"), needles=("--devices", "cuda:7")),
    Case("devices-tpu", args=("--devices", "tpu"), needles=("--devices", "'tpu'", "'cpu'", "'cuda'")),
    Case("bool-lr", edit=("lr = 0.1", "lr = true"), needles=(FILE, "[train] lr = true", "number")),
    # A scheme that needs a structure the model lacks: the mlp (known without torch), and a built-in
    # built on the meta device (the cnn has no residual blocks; resmlp's blocks have no gates).
    Case("fixup-on-mlp", edit=('init = ["kaiming_normal", "xavier_uniform"]', 'init = ["fixup"]'),
         needles=(FILE, "init = 'fixup'", "residual blocks", "arch 'mlp' has none")),
    Case("mup-on-mlp", edit=('init = ["kaiming_normal", "xavier_uniform"]', 'init = ["mup"]'),
         needles=(FILE, "init = 'mup'", "rebuilt at another width")),
    Case("fixup-on-cnn", text=BASE.replace('init = ["kaiming_normal", "xavier_uniform"]', 'init = ["fixup"]')
         .replace("depth = 2", 'arch = "cnn"\ndepth = 2').replace('name = "teacher"\nn_train = 32',
                                                                   'name = "digits"\nimages = true'),
         needles=(FILE, "arch 'cnn' with init 'fixup'", "needs residual blocks")),
    Case("skipinit-without-gates",
         text=BASE.replace('init = ["kaiming_normal", "xavier_uniform"]', 'init = ["skipinit"]')
         .replace("depth = 2", 'arch = "resmlp"\ndepth = 2'),
         needles=(FILE, "arch 'resmlp' with init 'skipinit'", "branch_gates")),
]


def _write(case: Case, tmp: Path) -> list[str]:
    path = tmp / f"{case.id}.toml"
    if not case.no_file:
        path.write_text(case.spec_text())
    return [str(path), "--dry-run", "--out", str(tmp / "out"), *case.args]


def _in_process(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    handlers = logging.root.handlers[:]  # main() configures logging: leave no handler on our StringIO
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = sweep.main(args)
        except SystemExit as exit_:  # argparse's errors exit from inside main
            code = exit_.code
        finally:
            logging.root.handlers[:] = handlers
    return code, out.getvalue(), err.getvalue()


def _subprocess(args: list[str]) -> tuple[int, str, str]:
    proc = run_cli("bench.sweep", *args)
    return proc.returncode, proc.stdout, proc.stderr


def _check(case: Case, path: Path, code: int, stdout: str, stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert code == 2, (code, stderr)
    for needle in case.needles:
        needle = needle.replace(FILE, str(path))
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert stdout == ""


def _skip_if_cuda_7(case: Case) -> None:
    if case.id == "devices-cuda-7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case: Case, tmp_path):
    _skip_if_cuda_7(case)
    args = _write(case, tmp_path)
    _check(case, Path(args[0]), *_in_process(args))
    assert not (tmp_path / "out").exists()


SUB = [c for c in CASES if c.sub]


@pytest.fixture(scope="module")
def processes(tmp_path_factory) -> dict[str, tuple[tuple[int, str, str], Path]]:
    """Run the ``sub`` cases and two valid dry runs as subprocesses, concurrently."""
    tmp = tmp_path_factory.mktemp("cli")
    commands = {case.id: _write(case, tmp) for case in SUB}
    valid = tmp / "valid.toml"
    valid.write_text(BASE)
    commands["valid"] = [str(valid), "--dry-run", "--out", str(tmp / "out")]
    commands["quick"] = [str(ROOT / "sweeps" / "quick.toml"), "--dry-run", "--out", str(tmp / "out")]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {k: pool.submit(_subprocess, args) for k, args in commands.items()}
        out = {k: (f.result(), Path(commands[k][0])) for k, f in futures.items()}
    assert not (tmp / "out").exists(), "a dry run or a rejected spec wrote results"
    return out


@pytest.mark.parametrize("case", SUB, ids=[c.id for c in SUB])
def test_bad_input_through_a_real_process(case: Case, processes):
    _skip_if_cuda_7(case)
    result, path = processes[case.id]
    _check(case, path, *result)


def test_valid_dry_run_prints_the_plan(processes):
    (code, stdout, stderr), _ = processes["valid"]
    assert code == 0, stderr
    assert stderr == ""
    # 2 inits x 2 seeds = 4 jobs of one shape: one bundle
    assert re.search(r"\b4 jobs in 1 bundles\b", stdout), stdout


def test_quick_dry_run_counts_jobs_and_bundles(processes):
    (code, stdout, stderr), _ = processes["quick"]
    assert code == 0, stderr
    # 4 inits x 2 depths x 2 lrs x 2 seeds; the two depths are two shapes
    assert re.search(r"\b32 jobs in 2 bundles\b", stdout), stdout


def test_a_flag_error_names_the_program_the_user_typed(capsys):
    """``initbench sweep --jobs 0`` says ``initbench sweep: error``; ``python -m bench.sweep``, its name."""
    from bench.__main__ import main as initbench

    for run, name in ((lambda: initbench(["sweep", "x.toml", "--jobs", "0"]), "initbench sweep"),
                      (lambda: sweep.main(["x.toml", "--jobs", "0"]), "python -m bench.sweep"),
                      (lambda: initbench(["regress", "check"]), "initbench regress check")):
        with pytest.raises(SystemExit) as stop:
            run()
        assert stop.value.code == 2
        assert capsys.readouterr().err.startswith(f"{name}: error: "), name
