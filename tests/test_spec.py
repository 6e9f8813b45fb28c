"""Tests for bench.spec: grid expansion, job ids, fingerprints, and that bad input is a UserError.

Everything here runs in-process on spec text; tests/test_cli_errors.py runs the same kinds of
bad input through the real command line.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import spec
from bench.errors import UserError
from bench.train import inits

torch.set_num_threads(1)

ROOT = Path(__file__).parents[1]
QUICK = (ROOT / "sweeps" / "quick.toml").read_text()

# A small spec whose first job's id is pinned below: if this id changes, every stored
# result and baseline loses its resume key. Change it only on purpose, with a format bump.
TINY = """
name = "tiny"
[grid]
init = ["kaiming_normal", "scaled_normal"]
seed = [0, 1]
[model]
depth = 3
width = 16
activation = "tanh"
[task]
name = "teacher"
n_train = 64
[train]
lr = 0.05
steps = 20
batch_size = 16
[init_params.scaled_normal]
std = 0.05
"""
TINY_FIRST_ID = "bacf9f7879be29b1"

# The same spec as TINY, formatted differently: other whitespace, comments, key and table
# order, dotted keys, equivalent number spellings, and defaults written out.
TINY_REFORMATTED = """name = "tiny"   # a comment
[init_params]
scaled_normal.std = 5e-2     # dotted key instead of a table

[train]
batch_size=16
steps=20
lr=5.0e-2
momentum = 0                 # the default, written out
[task]
n_train=64
name="teacher"
[model]
activation="tanh"
width=16
depth=3
arch = "mlp"
[grid]
init=[ "kaiming_normal",
       "scaled_normal" ]
seed=[0,1]
"""


def parse(text: str) -> spec.Spec:
    return spec.parse(text, "test.toml")


def ids(text: str) -> list[str]:
    return [j.job_id for j in parse(text).jobs()]


# --- grid expansion ---------------------------------------------------------------
def test_grid_is_the_cartesian_product_in_grid_order():
    s = parse("""
    [grid]
    init = ["default", "kaiming_normal", "xavier_uniform"]
    depth = [2, 4]
    lr = [0.01, 0.1]
    seed = [0, 1, 2]
    """)
    jobs = s.jobs()
    got = [(j.init, j.depth, j.lr, j.seed) for j in jobs]
    want = list(itertools.product(["default", "kaiming_normal", "xavier_uniform"], [2, 4], [0.01, 0.1],
                                  [0, 1, 2]))
    assert got == want
    assert len({j.job_id for j in jobs}) == len(jobs) == 36


def test_fixed_settings_and_defaults_fill_every_job():
    s = parse('[model]\nwidth = 8\n[train]\nsteps = 7\n[grid]\nseed = [3]\n')
    (job,) = s.jobs()
    assert (job.width, job.steps, job.seed) == (8, 7, 3)
    defaults = {k: v.default for k, v in spec.SETTINGS.items()}
    for key in ("arch", "depth", "activation", "init", "init_bias", "task", "optimizer", "lr", "batch_size"):
        assert getattr(job, key) == defaults[key]


AXES = [
    ("init", ["zeros", "orthogonal"]),
    ("depth", [1, 3]),
    ("width", [4, 9]),
    ("activation", ["gelu", "selu"]),
    ("lr", [0.5, 0.25]),
    ("seed", [5, 6]),
    ("optimizer", ["sgd", "adam"]),
    ("batch_size", [8, 32]),
    ("steps", [3, 11]),
    ("task", ["spirals", "blog"]),
    ("momentum", [0.0, 0.9]),
    ("weight_decay", [0.0, 0.01]),
    ("init_bias", ["default", 0.1]),
    ("log_every", [1, 5]),
    ("betas", [[0.9, 0.99], [0.5, 0.999]]),
]


@pytest.mark.parametrize(("key", "values"), AXES, ids=[k for k, _ in AXES])
def test_any_setting_can_be_an_axis(key, values):
    text = f"[grid]\n{key} = {_toml(values)}\n"
    jobs = parse(text).jobs()
    got = [getattr(j, key) for j in jobs]
    want = [tuple(v) if isinstance(v, list) else v for v in values]
    assert got == want
    assert jobs[0].job_id != jobs[1].job_id


def test_task_param_axis():
    text = '[task]\nname = "spirals"\n[grid]\n"task.n_train" = [32, 64]\n"task.turns" = [1, 2.5]\n'
    jobs = parse(text).jobs()
    got = [(dict(j.task_params)["n_train"], dict(j.task_params)["turns"]) for j in jobs]
    assert got == [(32, 1.0), (32, 2.5), (64, 1.0), (64, 2.5)]
    assert all(isinstance(dict(j.task_params)["turns"], float) for j in jobs)  # canonical type
    assert len({j.job_id for j in jobs}) == 4
    # Task settings are the task's identity: jobs with different data are never bundled together.
    assert len({j.shape_key() for j in jobs}) == 4


def test_init_param_axis_reaches_only_its_scheme():
    jobs = parse("""
    [grid]
    init = ["scaled_normal", "kaiming_normal"]
    "init_params.scaled_normal.std" = [0.01, 0.1]
    """).jobs()
    # kaiming_normal does not depend on std: its two copies are one job
    assert [(j.init, dict(j.init_params).get("std")) for j in jobs] == [
        ("scaled_normal", 0.01), ("scaled_normal", 0.1), ("kaiming_normal", None)]
    assert dict(jobs[2].init_params) == {"gain": "activation", "mode": "fan_in"}


def test_init_params_table_sets_the_scheme_parameters():
    text = '[model]\ninit = "xavier_normal"\n[init_params.xavier_normal]\ngain = "activation"\n'
    (job,) = parse(text).jobs()
    assert dict(job.init_params) == {"gain": "activation"}
    (job,) = parse('[model]\ninit = "mean_field"\n[init_params.mean_field]\nsigma_w2 = 1.5\n').jobs()
    assert dict(job.init_params) == {"sigma_w2": 1.5, "sigma_b2": 0.0}
    assert job.settings()["init.sigma_w2"] == 1.5


# --- job ids --------------------------------------------------------------------------
def test_job_id_is_pinned():
    assert ids(TINY)[0] == TINY_FIRST_ID


def test_job_id_is_stable_across_parses_and_formatting():
    first = ids(TINY)
    assert ids(TINY) == first
    assert ids(TINY_REFORMATTED) == first
    assert re.fullmatch(r"[0-9a-f]{16}", first[0])


def test_axis_order_changes_the_job_order_only():
    swapped = TINY.replace('init = ["kaiming_normal", "scaled_normal"]\nseed = [0, 1]',
                           'seed = [0, 1]\ninit = ["kaiming_normal", "scaled_normal"]')
    assert swapped != TINY
    assert ids(swapped) != ids(TINY) and sorted(ids(swapped)) == sorted(ids(TINY))
    assert parse(swapped).fingerprint == parse(TINY).fingerprint


def test_job_id_ignores_the_spec_name_and_grid_vs_fixed():
    # The same configuration reached through a fixed setting or a one-value axis is the same job.
    a = ids('name = "a"\n[model]\ndepth = 3\n')
    b = ids('name = "b"\n[grid]\ndepth = [3]\n')
    assert a == b


def test_every_setting_changes_the_job_id():
    (base,) = parse(TINY.replace('init = ["kaiming_normal", "scaled_normal"]', 'init = ["kaiming_normal"]')
                    .replace("seed = [0, 1]", "seed = [0]")).jobs()
    changed = {  # every field but arch (only one architecture is registered today)
        "depth": 4, "width": 17, "activation": "relu", "init": "xavier_normal",
        "init_bias": 0.5, "task": "spirals", "optimizer": "adam", "lr": 0.051, "momentum": 0.9,
        "weight_decay": 1e-4, "betas": (0.8, 0.9), "steps": 21, "batch_size": 17, "log_every": 3,
        "seed": 1, "init_params": (("gain", 2.0), ("mode", "fan_in")), "task_params": (("n_train", 65),),
    }
    for key, value in changed.items():
        assert replace(base, **{key: value}).job_id != base.job_id, key


def test_init_params_of_other_schemes_do_not_change_ids():
    other = TINY.replace("std = 0.05", "std = 0.07")
    a, b = parse(TINY).jobs(), parse(other).jobs()
    kaiming_a = [j.job_id for j in a if j.init == "kaiming_normal"]
    kaiming_b = [j.job_id for j in b if j.init == "kaiming_normal"]
    assert kaiming_a == kaiming_b and len(kaiming_a) == 2
    scaled_a = {j.job_id for j in a if j.init == "scaled_normal"}
    scaled_b = {j.job_id for j in b if j.init == "scaled_normal"}
    assert scaled_a.isdisjoint(scaled_b)


def test_duplicates_are_removed():
    jobs = parse('[grid]\nseed = [0, 0, 1]\ninit = ["zeros", "zeros"]\nlr = [0.1, 1e-1]\n').jobs()
    assert [(j.seed, j.init, j.lr) for j in jobs] == [(0, "zeros", 0.1), (1, "zeros", 0.1)]


def test_equivalent_spellings_are_one_job():
    # lr = 1 and 1.0, momentum 0 and 0.0, task noise 0 and 0.0: canonical floats, one id
    a = ids("[train]\nlr = 1\nmomentum = 0\n[task]\nnoise = 0\n")
    b = ids("[train]\nlr = 1.0\nmomentum = 0.0\n[task]\nnoise = 0.0\n")
    assert a == b


# --- fingerprint ------------------------------------------------------------------------
def test_fingerprint_ignores_formatting_but_not_the_grid():
    assert parse(TINY).fingerprint == parse(TINY_REFORMATTED).fingerprint
    assert parse(TINY).fingerprint == parse(TINY.replace("\n", "\n\n  ") + "# done\n").fingerprint
    assert parse(TINY).fingerprint != parse(TINY.replace("seed = [0, 1]", "seed = [0, 1, 2]")).fingerprint
    assert parse(TINY).fingerprint != parse(TINY.replace("width = 16", "width = 32")).fingerprint
    assert parse(TINY).fingerprint != parse(TINY.replace("std = 0.05", "std = 0.06")).fingerprint


def test_fingerprint_ignores_runtime():
    # Where a sweep runs is not what it means: moving it to a GPU must not orphan its store.
    assert parse(TINY).fingerprint == parse(TINY + '[runtime]\ndevices = "cpu"\njobs = 2\n').fingerprint


# --- bad input, in-process -------------------------------------------------------------
BAD = [
    # (spec text, substrings the message must contain)
    ("[train]\nlr = 1" + "0" * 400, ["[train] lr", "finite number"]),
    ("[init_params.mean_field]\nsigma_w2 = 1" + "0" * 400, ["[init_params.mean_field] sigma_w2"]),
    ("[model]\ninit_bias = 1" + "0" * 400, ["[model] init_bias", "'auto'"]),
    ("[task]\nnoise = 1" + "0" * 400, ["[task] noise"]),
    ("[task]\nnoise = nan", ["[task] noise = nan"]),
    ("[task]\nn_train = 2.5", ["[task] n_train = 2.5", "integer"]),
    ("[runtime]\nmax_bundle = 0", ["[runtime] max_bundle = 0", ">= 1"]),
    ('[runtime]\ndevices = "tpu"', ["[runtime] devices = 'tpu'", "'cpu'"]),
    ("[regression]\nwatch = 1", ["[regression]", "'watch'", "'metrics'"]),
    ("[init_params.lsuv]\nmax_iter = 2.5", ["[init_params.lsuv] max_iter = 2.5", "integer"]),
    ('[init_params.kaiming_normal]\nmode = "fanin"', ["mode = 'fanin'", "'fan_out'"]),
    ('[init_params.xavier_uniform]\ngain = "relu"', ["gain = 'relu'", "'activation'"]),
    ("[init_params.orthogonal]\nscale = 2", ["[init_params.orthogonal] scale", "'gain'"]),
    ('[grid]\n"init_params.xavier.gain" = [1]', ["init_params.xavier.gain", "xavier_normal"]),
    ('[grid]\n"task.n_trian" = [1]', ["'n_trian'", "n_train"]),
    ('[grid]\nwdith = [1]', ["[grid] 'wdith'", "width"]),
    ('[model]\ninit = "zeros"\n[grid]\ninit = ["default"]', ["[grid] init", "[model]"]),
    ('[task]\nname = "json:dumps"\nwhen = 1979-05-27', ["[task] when"]),
    ('[task]\nname = "no_such_module_xyz:load"', ["no_such_module_xyz"]),
    ("[train]\nbetas = [0.9, 1.0]", ["[train] betas", "[0, 1)"]),
    ('[grid]\n"init_params.x\\ny" = [1]', ["[grid] init_params.x\\ny"]),  # a line break in a key
    ('[init_params."a\\nb"]\nstd = 1', ["[init_params.a\\nb]", "scaled_normal"]),
    ('name = ""', ["name = ''"]),
    ("a = " + "[" * 5000, ["TOML syntax error"]),
    ("grid = 3", ["grid = 3", "[grid]"]),
    ("[metrics]\ntarget_ratio = 0", ["[metrics] target_ratio = 0", "> 0"]),
    ('[runtime]\nbackend = "mpi"', ["backend = 'mpi'", "'loky'"]),
    ('[model]\nrules = "zero_head"', ["[model] rules = 'zero_head'", "unknown rule set", "'none'"]),
    ("[model]\nrules = 3", ["[model] rules = 3", "[init_rules.<name>]"]),
    ("[init_rules]\nzero_head = 3", ["[init_rules.zero_head] = 3", "list of rule tables"]),
    ("[init_rules]\nzero_head = []", ["[init_rules.zero_head] = []", "non-empty"]),
    ("[init_rules]\nzero_head = [1]", ["[init_rules.zero_head] rule 1 = 1", "expected a table"]),
    ('[[init_rules.h]]\nmatch = "*"\nscale = true', ["[init_rules.h] rule 1: scale = True", "finite number"]),
    ('[[init_rules.h]]\nmatch = "*"\ninit = "orthogonal"\ngain = "relu"', ["rule 1 gain = 'relu'"]),
    ('[[init_rules.h]]\nmatch = "*"\ninit = "orthogonal"\nstd = 1', ["unknown key 'std'", "'gain'"]),
]


@pytest.mark.parametrize(("text", "needles"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_specs_raise_one_line_user_errors(text, needles):
    with pytest.raises(UserError) as info:
        parse(text)
    message = str(info.value)
    assert message.startswith("test.toml: ")
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_rules_none_changes_no_id_and_a_rule_set_changes_it():
    (job,) = parse(TINY.replace('init = ["kaiming_normal", "scaled_normal"]', 'init = ["kaiming_normal"]')
                   .replace("seed = [0, 1]", "seed = [0]")).jobs()
    assert job.rules == "none" and job.init_rules == () and job.settings()["rules"] == "none"
    assert replace(job, rules="none").job_id == job.job_id
    rule = inits.Rule("2.weight", value=0.0)
    assert replace(job, rules="zero", init_rules=(rule,)).job_id != job.job_id
    assert replace(job, rules="zero", init_rules=(rule,)).job_id != replace(
        job, rules="zero", init_rules=(inits.Rule("2.weight", value=1.0),)).job_id


def test_factory_task_settings_are_hashable_and_stable():
    # A list setting of a user factory must survive job ids (JSON) and bundle keys (hashing).
    s = parse('[task]\nname = "json:dumps"\nsizes = [1, 2]\n')
    (job,) = s.jobs()
    assert dict(job.task_params)["sizes"] == (1, 2)
    hash(job.shape_key())
    assert job.job_id == parse('[task]\nsizes = [1,2]\nname = "json:dumps"\n').jobs()[0].job_id


def test_load_reads_files(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[grid]\nseed = [0, 1]\n")
    s = spec.load(path)
    assert s.name == "mine" and len(s.jobs()) == 2 and s.path == str(path)
    with pytest.raises(UserError, match="not found"):
        spec.load(tmp_path / "absent.toml")


def test_quick_spec_parses():
    s = spec.parse(QUICK, "sweeps/quick.toml")
    assert len(s.jobs()) == 4 * 2 * 2 * 2


# --- property: no input makes the parser raise anything but UserError ------------------
TOML_VALUES = ['0', '-1', '3', '2.5', '1e400', '1' + '0' * 40, 'inf', 'nan', '-0.0', 'true', '""', '"relu"',
               '"teacher"', '"os:getcwd"', '"zeros"', '"activation"', '1979-05-27', '07:32:00', '{a = 1}',
               '[]', '[1, "a"]', '[[0.9, 0.99]]', '["kaiming_normal", "lsuv"]']


def _check_parse(text: str) -> None:
    try:
        s = spec.parse(text, "fuzz.toml")
    except UserError as err:
        assert len(str(err).splitlines()) == 1, str(err)
        return
    # What the parser accepts must expand into jobs with ids and bundle keys.
    s.fingerprint  # noqa: B018
    for job in s.jobs():
        assert job.job_id
        hash(job.shape_key())


@st.composite
def garbled_quick(draw) -> str:
    lines = QUICK.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["delete", "duplicate", "value", "text", "cut"]))
        if action == "delete":
            del lines[i]
        elif action == "duplicate":
            lines.insert(i, lines[i])
        elif action == "value" and "=" in lines[i]:
            lines[i] = lines[i].split("=")[0] + "= " + draw(st.sampled_from(TOML_VALUES))
        elif action == "text":
            lines.insert(i, draw(st.text(max_size=30)))
        else:
            j = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:j]
        if not lines:
            break
    return "\n".join(lines)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_raises_user_error(text):
    _check_parse(text)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbled_quick())
def test_garbled_quick_spec_parses_or_raises_user_error(text):
    _check_parse(text)


def _toml(values: list) -> str:
    def one(v):
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, list):
            return "[" + ", ".join(one(x) for x in v) + "]"
        return repr(v)

    return one(values)


def test_job_fields_are_the_spec_settings():
    """Readers of results (baselines, exporters) know the settings from bench.job without torch."""
    from bench.job import SETTING_NAMES

    assert set(SETTING_NAMES) == set(spec.SETTINGS)


def test_the_residual_schemes_gain_default_leaves_their_job_ids_as_they_were():
    """The He-drawing residual schemes got a gain parameter after their sweeps shipped: at its default
    it is not hashed (ids and baseline cells stay valid); Kaiming's gain, as old as its ids, is."""
    from bench.schema import hashed

    text = ('[grid]\ninit = ["{}"]\n[model]\narch = "resmlp"\ndepth = 2\nwidth = 8\ngates = true\n'
            'scalar_biases = true\n')
    fixup = spec.parse(text.format("fixup")).jobs()[0]
    assert fixup.settings()["init.gain"] == "activation" and "init.gain" not in hashed(fixup.settings())
    kaiming = spec.parse(text.format("kaiming_normal")).jobs()[0]
    assert hashed(kaiming.settings())["init.gain"] == "activation"
    given = spec.parse(text.format("fixup") + "[init_params.fixup]\ngain = 1.0\n").jobs()[0]
    assert given.job_id != fixup.job_id
