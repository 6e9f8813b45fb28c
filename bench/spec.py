"""Sweep specs: TOML in, frozen dataclasses out, expanded into jobs.

The TOML is validated here and only here: every unknown key, wrong type and
unknown name becomes a :class:`~bench.errors.UserError` naming the file, the
key, the value and the valid choices. Downstream code receives a :class:`Spec`
and a list of :class:`Job` and never reads raw dicts again.

A job's id is a hash of its canonical settings, so the same configuration has
the same id on every machine; resume and baselines rely on that.

Names and settings are checked against the torch-free declarations (``bench.train.names``,
``bench.train.schemes``), so reading a spec imports no torch, unless the spec needs it: a user's
factory (``"pkg.module:fn"``) is imported to read its signature, and init rules are checked
against a model's parameter names (:func:`_check_rules`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bench.errors import UserError, is_number, shown
from bench.job import Job, Rule
from bench.policy import parse_table
from bench.schema import hashed
from bench.settings import MetricsConfig, RuntimeConfig
from bench.train import names, schemes

OPTIMIZERS = ("sgd", "adam")


# --- the settings a job has ----------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One job setting: which table holds it, its type check and its default."""

    table: str
    check: Callable[[str, Any], Any]  # (where, value) -> normalised value, or raise UserError
    default: Any  # every setting has a default, so a spec names only what it changes


def _int(minimum: int) -> Callable[[str, Any], int]:
    def check(where: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} = {shown(value)}: expected an integer >= {minimum}")
        if value < minimum:
            raise UserError(f"{where} = {shown(value)}: must be >= {minimum}")
        return value

    return check


def _float(minimum: float, *, strict: bool) -> Callable[[str, Any], float]:
    bound = f"{'>' if strict else '>='} {minimum:g}"

    def check(where: str, value: Any) -> float:
        if not is_number(value):
            raise UserError(f"{where} = {shown(value)}: expected a finite number {bound}")
        if value < minimum or (strict and value == minimum):
            raise UserError(f"{where} = {shown(value)}: must be {bound}")
        return float(value)

    return check


def _choice(choices: Callable[[], list[str]], *, allow_factory: bool = False) -> Callable[[str, Any], str]:
    def check(where: str, value: Any) -> str:
        if not isinstance(value, str):
            raise UserError(f"{where} = {shown(value)}: expected a string; choose from {choices()}")
        if value in choices() or (allow_factory and ":" in value):
            return value
        extra = " or 'pkg.module:function'" if allow_factory else ""
        raise UserError(f"{where} = {shown(value)}: unknown name; choose from {choices()}{extra}")

    return check


def _betas(where: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise UserError(f"{where} = {shown(value)}: expected two numbers in [0, 1), e.g. [0.9, 0.999]")
    out = tuple(_float(0.0, strict=False)(where, v) for v in value)
    if any(v >= 1 for v in out):
        raise UserError(f"{where} = {shown(value)}: each beta must be in [0, 1)")
    return out  # type: ignore[return-value]


def _rules_name(where: str, value: Any) -> str:
    # Which [init_rules.<name>] set exists is known only once the whole spec is read (_parse).
    if not isinstance(value, str) or not value:
        raise UserError(f"{where} = {shown(value)}: expected the name of an [init_rules.<name>] set, "
                        "or 'none'")
    return value


def _init_bias(where: str, value: Any) -> str | float:
    if isinstance(value, str) and value in schemes.BIAS_MODES:
        return value
    if is_number(value):
        return float(value)
    raise UserError(f"{where} = {shown(value)}: choose from {list(schemes.BIAS_MODES)} or a number")


SETTINGS: dict[str, Setting] = {
    # [model]
    "arch": Setting("model", _choice(names.arch_names, allow_factory=True), "mlp"),
    "depth": Setting("model", _int(1), 4),
    "width": Setting("model", _int(1), 64),
    "activation": Setting("model", _choice(lambda: sorted(names.ACTIVATIONS)), "relu"),
    "init": Setting("model", _choice(lambda: sorted(schemes.SCHEMES)), "default"),
    "init_bias": Setting("model", _init_bias, "auto"),
    "rules": Setting("model", _rules_name, "none"),  # a named [init_rules.<name>] set, applied after init
    # [task]; its own settings (n_train, noise, ...) are checked by the task's registry entry
    "task": Setting("task", _choice(lambda: sorted(names.TASKS), allow_factory=True), "teacher"),
    # [train]
    "optimizer": Setting("train", _choice(lambda: list(OPTIMIZERS)), "sgd"),
    "lr": Setting("train", _float(0.0, strict=True), 0.01),
    "momentum": Setting("train", _float(0.0, strict=False), 0.0),
    "weight_decay": Setting("train", _float(0.0, strict=False), 0.0),
    "betas": Setting("train", _betas, (0.9, 0.999)),
    "steps": Setting("train", _int(1), 300),
    "batch_size": Setting("train", _int(1), 128),
    "log_every": Setting("train", _int(1), 10),
    "seed": Setting("train", _int(0), 0),
}
TABLES = ("model", "task", "train", "init_params", "init_rules", "metrics", "runtime", "regression")


# --- what a spec becomes ---------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """A validated sweep: its name, the grid, the fixed settings and the configs."""

    name: str
    path: str
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    fixed: tuple[tuple[str, Any], ...]
    init_params: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    text: str = ""
    # [regression]: watched metrics and tolerances, validated by bench.regress.parse_table
    regression: tuple[tuple[str, Any], ...] = ()
    init_rules: tuple[tuple[str, tuple[Rule, ...]], ...] = ()  # [init_rules.<name>] sets

    @property
    def fingerprint(self) -> str:
        """Hash of what the spec means (not how it is formatted): refuses mixing two specs in one store."""
        # Axes sorted by key: listing them in another order changes the job order, not the sweep.
        fixed = tuple(hashed(dict(self.fixed)).items())  # rules = "none" left out, as in job ids
        canon = {"name": self.name, "grid": sorted(self.grid), "fixed": fixed,
                 "init_params": self.init_params, "metrics": self.metrics.__dict__}
        if self.init_rules:  # only then: fingerprints of specs without rules stay as they were
            canon["init_rules"] = [(n, [r.as_dict() for r in rules]) for n, rules in self.init_rules]
        blob = json.dumps(canon, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def jobs(self) -> list[Job]:
        """Expand the grid (cartesian product) into jobs, de-duplicated by job id, in grid order."""
        fixed = dict(self.fixed)
        init_params = dict(self.init_params)
        axes = [k for k, _ in self.grid]
        seen: dict[str, Job] = {}
        for values in itertools.product(*(v for _, v in self.grid)):
            settings = {**fixed, **dict(zip(axes, values, strict=True))}
            job = _make_job(settings, init_params, dict(self.init_rules))
            seen.setdefault(job.job_id, job)
        return list(seen.values())


def _make_job(settings: dict[str, Any], init_params: dict[str, tuple],
              rule_sets: dict[str, tuple[Rule, ...]]) -> Job:
    core = {k: settings[k] for k in SETTINGS}
    scheme_params = dict(init_params.get(core["init"], ()))
    scheme_params.update({k.split(".", 2)[2]: v for k, v in settings.items()
                          if k.startswith(f"init_params.{core['init']}.")})
    task_params = {k[5:]: v for k, v in settings.items() if k.startswith("task.")}
    model_params = tuple(sorted((k[6:], v) for k, v in settings.items() if k.startswith("model.")))
    return Job(**core, init_rules=rule_sets.get(core["rules"], ()), model_params=model_params,
               init_params=tuple(sorted(schemes.resolve_params(core["init"], scheme_params).items())),
               task_params=tuple(sorted(names.resolve_task_params(core["task"], task_params).items())))


# --- loading -------------------------------------------------------------------
def load(path: str | Path) -> Spec:
    """Read and validate a spec file; every problem is a UserError naming file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read spec: {err}") from None
    return parse(text, str(path))


def parse(text: str, where: str = "<spec>") -> Spec:
    """Validate spec text (TOML) into a :class:`Spec`; ``where`` names it in messages."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{where}: TOML syntax error: {_one_line(err)}") from None
    except RecursionError:  # tomllib recurses per nesting level: "a = [[[[..." hundreds deep
        raise UserError(f"{where}: TOML syntax error: arrays or tables nested too deeply") from None
    try:
        return _parse(raw, where, text)
    except UserError as err:
        raise UserError(f"{where}: {_one_line(err)}") from None


def _one_line(err: Exception) -> str:
    # A quoted TOML key may hold a line break ("a\nb" = 1); a message must stay one line.
    return "\\n".join(str(err).splitlines())


def _parse(raw: dict[str, Any], where: str, text: str) -> Spec:
    valid_top = ["name", "grid", *TABLES]
    for key in raw:
        if key not in valid_top:
            raise UserError(f"unknown key {key!r}; choose from {valid_top}")
    name = raw.get("name", Path(where).stem)
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"name = {name!r}: expected a non-empty string")
    tables = {t: _table(raw, t) for t in (*TABLES, "grid")}

    fixed: dict[str, Any] = {}
    for setting, meta in SETTINGS.items():
        key = "name" if setting == "task" else setting
        if key in tables[meta.table]:
            fixed[setting] = meta.check(f"[{meta.table}] {key}", tables[meta.table][key])
    task_fixed = {k: v for k, v in tables["task"].items() if k != "name"}
    # An architecture other than the MLP takes settings of its own: [model] keys initbench does not
    # know are passed to its factory (checked against its signature once the jobs are expanded).
    archs = [fixed.get("arch", "mlp")] + [v for v in tables["grid"].get("arch", [])
                                          if isinstance(tables["grid"].get("arch"), list)]
    own_ok = any(a != "mlp" for a in archs)
    model_fixed = {}
    for table in ("model", "train"):
        for key in tables[table]:
            if key not in SETTINGS or SETTINGS[key].table != table:
                if table == "model" and own_ok and key not in SETTINGS:
                    model_fixed[key] = tables[table][key]
                    continue
                valid = [k for k, s in SETTINGS.items() if s.table == table]
                hint = " (an architecture's own settings need arch = a built-in other than mlp, or " \
                    "'pkg.module:fn')" if table == "model" else ""
                raise UserError(f"unknown key [{table}] {key!r}; choose from {valid}{hint}")

    grid: list[tuple[str, tuple[Any, ...]]] = []
    for key, values in tables["grid"].items():
        if not isinstance(values, list):
            raise UserError(f"[grid] {key} = {values!r}: a grid axis must be a list of values")
        if not values:
            raise UserError(f"[grid] {key} = []: a grid axis needs at least one value")
        grid.append((key, tuple(_check_axis(key, v, tables["grid"]) for v in values)))
    grid_keys = {k for k, _ in grid}
    for setting in SETTINGS:
        if setting in grid_keys and setting in fixed:
            raise UserError(f"[grid] {setting} is also fixed in [{SETTINGS[setting].table}]; keep one")

    defaults = {k: s.default for k, s in SETTINGS.items()}
    fixed = {**defaults, **fixed, **{f"task.{k}": v for k, v in task_fixed.items()},
             **{f"model.{k}": v for k, v in model_fixed.items()}}

    init_params: dict[str, dict[str, Any]] = {}
    for scheme, params in tables["init_params"].items():
        if scheme not in schemes.SCHEMES:
            raise UserError(f"[init_params.{scheme}]: unknown init scheme; "
                            f"choose from {sorted(schemes.SCHEMES)}")
        if not isinstance(params, dict):
            raise UserError(f"[init_params] {scheme} = {params!r}: expected a table")
        init_params[scheme] = {k: schemes.check_param(scheme, k, v, f"[init_params.{scheme}] {k}")
                               for k, v in params.items()}

    rule_sets = _init_rules_table(tables["init_rules"])
    used = [("[model] rules", fixed["rules"])] if "rules" not in grid_keys else [
        ("[grid] rules", v) for v in dict(grid)["rules"]]
    for key, value in used:
        if value != "none" and value not in rule_sets:
            choices = ["none", *sorted(rule_sets)]
            raise UserError(f"{key} = {shown(value)}: unknown rule set; choose from {choices} "
                            "(define one as [[init_rules.<name>]] tables)")

    spec = Spec(
        name=name.strip(), path=where, grid=tuple(grid), fixed=tuple(sorted(fixed.items())),
        init_params=tuple(sorted((s, tuple(sorted(p.items()))) for s, p in init_params.items())),
        metrics=_dataclass_table(MetricsConfig, tables["metrics"], "metrics"),
        runtime=_dataclass_table(RuntimeConfig, tables["runtime"], "runtime"), text=text,
        regression=_regression_table(tables["regression"]),
        init_rules=tuple(sorted(rule_sets.items())),
    )
    jobs = spec.jobs()  # resolves every task and scheme parameter: fail now, not in a worker
    seen_factories = set()
    for job in jobs:  # a factory's signature against the settings it gets: fail now, before training
        own = tuple(k for k, _ in job.model_params)
        if job.arch == "mlp":
            if own:
                raise UserError(f"[model] {own[0]}: the built-in mlp takes no setting {own[0]!r}")
            continue
        if (job.arch, own, job.init, job.init_params) not in seen_factories:
            seen_factories.add((job.arch, own, job.init, job.init_params))
            kwargs = names.factory_settings(job.arch, {"depth": job.depth, "width": job.width,
                                                        "activation": job.activation,
                                                        **dict(job.model_params)}, own)
            if dict(job.init_params).get("gain") == "activation" and "activation" not in kwargs:
                raise UserError(f"[init_params.{job.init}] gain: {job.arch} takes no activation setting, "
                                f"so init {job.init!r} has no activation gain to use; give one: "
                                f"[init_params.{job.init}] gain = <number> (e.g. 1.414 for relu)")
    _check_rules(jobs)
    return spec


def _check_rules(jobs: list[Job]) -> None:
    """A rule that matches nothing is a typo: fail now, for the MLP's parameter names.

    The names come from the model built on the meta device, so a spec with init rules imports
    torch here (one without does not). A user factory's names are known only when it is built:
    its engine checks them there.
    """
    todo = {(job.depth, job.rules): job.init_rules for job in jobs if job.init_rules and job.arch == "mlp"}
    if not todo:
        return
    from bench.train import inits, models  # torch: only this check needs a model

    for (depth, rules), init_rules in todo.items():
        inits.check_rules(models.skeleton("mlp", depth), init_rules, f"[init_rules.{rules}]")


def check_models(jobs: list[Job], where: str) -> None:
    """Raise a UserError, before a sweep plans (``--dry-run`` included), when a job's model cannot
    take its init: a scheme that needs a structure the model lacks (Fixup without residual
    blocks), or an init rule that matches none of its parameters. Not one failed job per seed.

    The built-in mlp is known without torch (its rules are checked when the spec is read). Any
    other architecture, built-in or a user's factory, is built on the meta device (nothing drawn,
    nothing allocated) and initialized, once per distinct model, init and rule set. That imports
    torch, so it is not part of :func:`parse`, which stays torch-free. A factory that cannot be
    built on the meta device is left to its jobs, which fail with the same message.
    """
    todo = {}
    for job in jobs:
        need = schemes.needs(job.init, dict(job.init_params))
        if job.arch == "mlp":
            if need:
                raise UserError(f"{where}: init = {job.init!r} needs {need}; arch 'mlp' has none")
            continue
        if need or job.init_rules:
            todo.setdefault((job.arch, job.depth, job.width, job.activation, job.model_params, job.init,
                             job.init_params, job.init_bias, job.rules, job.task, job.task_params), job)
    if not todo:
        return
    import torch  # only these checks need a model

    from bench.train import tasks
    from bench.train.bundle import build_model

    for job in todo.values():
        try:
            data = tasks.load(job.task, job.task_params, job.seed)  # a user task's error: its jobs' rows
            with torch.device("meta"):
                build_model(job, data)
        except UserError as err:
            raise UserError(f"{where}: arch {job.arch!r} with init {job.init!r}: {err}") from None
        except Exception:  # noqa: BLE001, S112 - a task that raises, an op the meta device lacks: the jobs tell
            continue


def _init_rules_table(table: dict[str, Any]) -> dict[str, tuple[Rule, ...]]:
    """``[[init_rules.<name>]]`` arrays of tables (or ``[init_rules.<name>] rules = [...]``) -> rules."""
    out: dict[str, tuple[Rule, ...]] = {}
    for name, rules in table.items():
        where = f"[init_rules.{name}]"
        if name == "none":
            raise UserError(f"{where}: 'none' means no rules; give the set another name")
        if isinstance(rules, dict):
            if set(rules) != {"rules"}:
                extra = sorted(set(rules) - {"rules"}) or ["rules"]
                raise UserError(f"{where}: unknown key {extra[0]!r}; write the rules as "
                                f"[[init_rules.{name}]] tables, or as rules = [{{match = ..., ...}}, ...]")
            rules = rules["rules"]
        if not isinstance(rules, list) or not rules:
            raise UserError(f"{where} = {rules!r}: expected a non-empty list of rule tables, "
                            "e.g. [[init_rules.zero_head]] match = \"head.weight\" value = 0.0")
        out[name] = tuple(schemes.parse_rule(r, f"{where} rule {i}") for i, r in enumerate(rules, 1))
    return out


def _regression_table(table: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    if not table:
        return ()
    parse_table(table, "[regression]")  # raises UserError naming the key
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in table.items()))


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise UserError(f"{name} = {table!r}: expected a table [{name}]")
    return table


def _check_axis(key: str, value: Any, grid: Mapping[str, Any]) -> Any:
    where = f"[grid] {key}"
    if key in SETTINGS:
        return SETTINGS[key].check(where, value)
    if key.startswith(("task.", "model.")):
        return value  # checked by the task's registry entry / the model's factory once jobs are expanded
    if key.startswith("init_params."):
        parts = key.split(".")
        if len(parts) != 3 or parts[1] not in schemes.SCHEMES:
            raise UserError(f"{where}: expected 'init_params.<scheme>.<param>' with scheme in "
                            f"{sorted(schemes.SCHEMES)}")
        return schemes.check_param(parts[1], parts[2], value, where)
    raise UserError(f"unknown key [grid] {key!r}; choose from {sorted(SETTINGS)}, "
                    "'task.<param>', 'model.<param>' or 'init_params.<scheme>.<param>'")


def _dataclass_table(cls: type, table: dict[str, Any], name: str) -> Any:
    valid = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in valid:
            raise UserError(f"unknown key [{name}] {key!r}; choose from {sorted(valid)}")
        default = getattr(cls(), key)
        where = f"[{name}] {key}"
        if isinstance(default, str):
            if not isinstance(value, str):
                raise UserError(f"{where} = {shown(value)}: expected a string")
        elif isinstance(default, int) and not isinstance(default, bool):
            # max_bundle = 0 would divide by zero when planning bundles; jobs = 0 means "choose"
            value = _int(1 if key == "max_bundle" else 0)(where, value)
        else:
            value = _float(0.0, strict=True)(where, value)
        values[key] = value
    if name == "runtime" and values.get("backend", "loky") not in ("loky", "dask", "threading"):
        raise UserError(f"[runtime] backend = {values['backend']!r}: "
                        "choose from ['dask', 'loky', 'threading']")
    if name == "runtime" and "devices" in values and not _DEVICES.fullmatch(values["devices"].strip()):
        # Only the syntax: whether cuda:N exists is checked where the sweep runs (planner.parse_devices);
        # without this the error would blame a '--devices' flag the user never gave.
        raise UserError(f"[runtime] devices = {values['devices']!r}: choose from 'auto', 'cpu', 'cuda' "
                        "or a list like 'cuda:0,cuda:1'")
    return cls(**values)


_DEVICES = re.compile(r"auto|cpu|cuda|cuda:\d+(\s*,\s*cuda:\d+)*")
