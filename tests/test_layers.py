"""The house rules of the import graph: imports flow one way, and readers stay torch-free.

Every ``import`` in the package is read from the source (function-local ones included, the
ones made only for type checking too), so a cycle or an upward import fails here, not in a
user's process. The layers, bottom to top:

0. ``base``: no initbench imports but each other (errors, settings, schema, policy, files, ...).
1. ``job``: the Job dataclass.
2. ``train``: everything that builds and trains a model.
3. ``spec``: TOML to Spec to jobs (validates names against train's registries).
4. ``results``: dispatch, record, metrics, store.
5. ``library``: report, regression statistics and baselines, the runner, exporters, audit, ...
6. ``commands``: modules with a ``main(argv)`` entry point; no command imports another.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bench"

LAYERS = {
    "base": ["bench.errors", "bench.environment", "bench.settings", "bench.schema", "bench.policy",
             "bench.files", "bench.factories", "bench.theory", "bench.lock", "bench.cli", "bench.overview"],
    "job": ["bench.job"],
    "train": ["bench.train"],
    "spec": ["bench.spec"],
    "results": ["bench.planner", "bench.dispatch", "bench.record", "bench.metrics", "bench.store"],
    "library": ["bench.report", "bench.verdict", "bench.baseline", "bench.runner", "bench.export",
                "bench.advice",
                "bench.plot", "bench.reproductions", "bench.tutorial", "bench.audit"],
    "commands": ["bench.sweep", "bench.regress", "bench.report.__main__", "bench.export.__main__",
                 "bench.__main__", "bench.advise"],
}
ORDER = list(LAYERS)
# Modules that are also commands (they define main(argv)) but whose library half others import.
COMMANDS = {"bench.sweep", "bench.regress", "bench.report.__main__", "bench.export.__main__", "bench.advise",
            "bench.__main__", "bench.audit", "bench.tutorial", "bench.reproductions"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(name: str) -> str:
    """The layer of a module: the longest matching prefix in LAYERS (commands win over their package)."""
    best, found = -1, None
    for lay, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), lay
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The initbench modules ``name`` imports anywhere in its source (resolved to module names)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 steps
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t == "bench" or t.startswith("bench.")}
    resolved = {t if t in known or t.rpartition(".")[0] not in known else t.rpartition(".")[0] for t in found}
    return resolved - {name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer(graph):
    assert [m for m in graph if m != "bench" and layer(m) is None] == []


def test_imports_flow_down_only(graph):
    upward = [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, targets in graph.items() if m != "bench"
              for t in targets if t != "bench" and ORDER.index(layer(t)) > ORDER.index(layer(m))]
    assert upward == []


def test_no_module_imports_the_package_facade(graph):
    """``import bench`` inside the package reaches up to the facade (bench.load, __version__)."""
    assert [m for m, targets in graph.items() if m != "bench" and "bench" in targets] == []


def test_commands_do_not_import_commands(graph):
    assert [(m, t) for m, targets in graph.items() if m in COMMANDS for t in targets
            if t in COMMANDS and m != "bench.__main__"] == []


def test_the_graph_has_no_cycle(graph):
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, path: list[str]) -> bool:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle.extend(path[path.index(t):] + [t] if t in path else [m, t])
                return True
            if state.get(t) is None and visit(t, path + [t]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if state.get(m) is None and visit(m, [m]):
            break
    assert cycle == []


def test_an_upward_import_is_caught(tmp_path):
    """The check can fail: a function-local import of a command from the results layer is found."""
    path = tmp_path / "store.py"
    path.write_text("def f():\n    from bench import sweep\n    return sweep\n")
    found = imports("bench.store", path, set(modules()))
    assert "bench.sweep" in found and ORDER.index(layer("bench.sweep")) > ORDER.index(layer("bench.store"))


READER = """
import sys
import bench
r = bench.load(sys.argv[1], traces=False)
bench.summarize(r)
r = bench.load(sys.argv[1])
print(len(r.runs), len(r.layers))
assert "torch" not in sys.modules and "scipy" not in sys.modules, "load/summarize imported torch or scipy"
from bench.report import build
build(sys.argv[1])
assert "torch" not in sys.modules, "the report imported torch"
from bench import regress
assert regress.main(["save", sys.argv[1], "--to", sys.argv[2]]) == 0
assert regress.main(["check", sys.argv[1], "--against", sys.argv[2]]) == 0
assert "torch" not in sys.modules, "regress save/check imported torch"
print("torch-free")
"""


def test_readers_do_not_import_torch(tmp_path, tiny_spec):
    from bench import sweep

    out = tmp_path / "out"
    assert sweep.main([str(tiny_spec), "--out", str(out), "--quiet", "--no-report", "--jobs", "1"]) == 0
    done = subprocess.run([sys.executable, "-c", READER, str(out), str(tmp_path / "base.json")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("torch-free")


SPECS = """
import sys
from bench import spec
for path in sys.argv[1:]:
    spec.load(path).jobs()
imported = [m for m in ("torch", "scipy") if m in sys.modules]
assert not imported, f"reading the specs imported {imported}"
print("torch-free")
"""


@pytest.mark.parametrize(("name", "expected"), [
    ("quick", "quick: 32 jobs in 2 bundles on cpu, no worker processes; results -> reports/quick"),
    ("init", "init: 240 jobs in "),  # the bundles and workers depend on this machine's cores
])
def test_dry_run_imports_neither_torch_nor_scipy(name, expected):
    """``python -m bench.sweep SPEC --dry-run`` of an MLP spec: torch-free declarations, arithmetic plan.

    Another arch's plan measures its model (bench.planner.measured), and a spec with init rules
    builds one: those import torch because they need it.
    """
    from bench import planner

    # With a GPU driver present only torch can count the devices, so ask for the CPU.
    devices = ["--devices", "cpu"] if planner._gpu_driver() else []
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "bench.sweep", f"sweeps/{name}.toml",
                           "--dry-run", *devices], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(expected)
    imported = [line for line in done.stderr.splitlines() if line.endswith((" torch", " scipy"))]
    assert imported == []


def test_every_shipped_spec_reads_without_torch():
    """Every shipped spec, whatever its arch or task, is read, checked and expanded into jobs torch-free."""
    specs = sorted(str(p) for p in (ROOT / "sweeps").glob("*.toml"))
    done = subprocess.run([sys.executable, "-c", SPECS, *specs], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch-free"

def test_the_declarations_and_the_torch_registries_name_the_same_things():
    """Each torch registry is keyed by exactly the names its torch-free declaration gives the spec."""
    import inspect

    from bench.train import activations, architectures, inits, models, names, residual_inits, schemes, tasks

    assert set(inits.INITS) == set(schemes.SCHEMES)
    assert set(inits.PER_TENSOR) == {n for n, d in schemes.SCHEMES.items() if d.per_tensor}
    assert set(inits.WHOLE_MODEL) == {n for n, d in schemes.SCHEMES.items() if not d.per_tensor}
    for name, entry in residual_inits.RESIDUAL_INITS.items():  # a residual scheme's own parameters
        if name in schemes.SCHEMES:
            # inits' wrappers consume muP's base_width, small_init's d (the model width) and the He
            # schemes' gain themselves
            declared = {k: v for k, v in schemes.SCHEMES[name].params.items()
                        if k not in ("base_width", "d", "gain")}
            assert declared == entry.params, name
    assert set(names.ACTIVATIONS) == set(activations.ACTIVATIONS)
    assert set(names.ARCHS) == set(models.ARCHS) | set(architectures.ARCHITECTURES)
    for name, fn in architectures.ARCHITECTURES.items():  # a built-in's settings are its signature
        params = inspect.signature(fn).parameters
        assert list(params)[:2] == ["in_shape", "out_dim"]
        assert {k: p.default for k, p in list(params.items())[2:]} == names.ARCHS[name], name
        assert list(params)[2:] == list(names.ARCHS[name]), name
    assert set(names.TASKS) == set(tasks.TASKS)
    for name, loader in tasks.TASKS.items():
        params = inspect.signature(loader).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            assert set(params) - {"seed"} == {*names.TASKS[name].params, *names.TASKS[name].added}, name
