"""Init schemes on any module, init rules by parameter name, and trunc_normal.

Each scheme is applied through ``bench.train.inits.apply`` to several copies of one module (pooled
so that every parameter checked has >= 32k draws) and compared with its formula, with the fans
written out here by hand (PyTorch's convention: a convolution's fan_in is in_channels x kernel
size; a ConvTranspose weight (in, out, *k) reads dim 1 as fan_in; an Embedding (num, dim) has
fan_in = dim). Every draw is seeded, so each check is deterministic.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from bench import spec, theory
from bench.errors import UserError
from bench.train import inits, schemes
from tests.test_inits import MIN_DRAWS, SE, check_normal, check_uniform

torch.set_num_threads(1)
ROOT = Path(__file__).parents[1]
RELU = math.sqrt(2)


class Custom(nn.Module):
    """A user module with raw parameters: a (d, d) matrix, a bias, and a gain that is neither."""

    def __init__(self, d: int = 48) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(d, d))
        self.bias = nn.Parameter(torch.randn(d))
        self.gain = nn.Parameter(torch.full((d,), 3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * (x @ self.mix) + self.bias


class Resettable(Custom):
    """The same, drawn only by its own reset_parameters (which `default` must call)."""

    def __init__(self, d: int = 48) -> None:
        nn.Module.__init__(self)
        self.mix = nn.Parameter(torch.empty(d, d))
        self.bias = nn.Parameter(torch.empty(d))
        self.gain = nn.Parameter(torch.ones(d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.mix.uniform_(-0.5, 0.5)
            self.bias.uniform_(-0.1, 0.1)


# module -> (builder, {parameter: (fan_in, fan_out) of each initialized block}); the MHA's packed
# in_proj_weight (3E, E) is three (E, E) blocks, each with the fans of a square matrix.
CASES = {
    "Conv2d": (lambda: nn.Conv2d(16, 32, 3), {"weight": (16 * 9, 32 * 9)}),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(32, 16, 4, stride=2), {"weight": (16 * 16, 32 * 16)}),
    "Conv1d": (lambda: nn.Conv1d(8, 24, 5), {"weight": (8 * 5, 24 * 5)}),
    "Embedding": (lambda: nn.Embedding(1000, 32), {"weight": (32, 1000)}),
    "MultiheadAttention": (lambda: nn.MultiheadAttention(64, 4),
                           {"in_proj_weight": (64, 64), "out_proj.weight": (64, 64)}),
    "Custom": (Custom, {"mix": (48, 48)}),
}


def copies(build, n_values: int) -> nn.ModuleList:
    """Enough copies of ``build()`` for every parameter to reach MIN_DRAWS values."""
    torch.manual_seed(123)
    smallest = min(p.numel() for p in build().parameters() if p.dim() >= 2)
    return nn.ModuleList(build() for _ in range(math.ceil(n_values / smallest)))


def init(model: nn.Module, name: str, params: dict | None = None, activation: str | None = "relu",
         seed: int = 0, init_bias: str | float = "auto", rules=()) -> nn.Module:
    torch.manual_seed(seed)
    inits.apply(model, name, inits.InitContext(activation, schemes.resolve_params(name, params or {})),
                init_bias, rules)
    return model


def pooled(model: nn.ModuleList, leaf: str) -> np.ndarray:
    return np.concatenate([m.get_parameter(leaf).detach().double().numpy().ravel() for m in model])


# --- every scheme's std with PyTorch's fans -----------------------------------------------------
FORMULAS = {  # scheme -> (family, scale from (fan_in, fan_out)), gains written out
    "kaiming_normal": ("normal", lambda fi, fo: RELU / math.sqrt(fi)),
    "kaiming_uniform": ("uniform", lambda fi, fo: math.sqrt(3) * RELU / math.sqrt(fi)),
    "xavier_normal": ("normal", lambda fi, fo: math.sqrt(2 / (fi + fo))),
    "xavier_uniform": ("uniform", lambda fi, fo: math.sqrt(6 / (fi + fo))),
    "scaled_normal": ("normal", lambda fi, fo: 0.02),
    "mean_field": ("normal", lambda fi, fo: math.sqrt(2.0 / fi)),
}


@pytest.mark.parametrize("module", sorted(CASES))
@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_scheme_std_matches_its_formula_with_pytorch_fans(name, module):
    build, fans = CASES[module]
    model = init(copies(build, MIN_DRAWS), name)
    family, scale = FORMULAS[name]
    for leaf, (fan_in, fan_out) in fans.items():
        w = pooled(model, leaf)
        bound = scale(fan_in, fan_out)
        check_normal(w, bound) if family == "normal" else check_uniform(w, bound)


@pytest.mark.parametrize("name", ["kaiming_normal", "xavier_normal"])
def test_mha_q_k_v_blocks_each_have_square_fans(name):
    # Each block alone: a packed (3E, E) Xavier would give Var 1/(2E) (PyTorch's own default), ours 1/E.
    model = init(copies(lambda: nn.MultiheadAttention(64, 4), 3 * MIN_DRAWS), name)
    blocks = [np.concatenate([m.in_proj_weight.detach().double().chunk(3)[i].numpy().ravel() for m in model])
              for i in range(3)]
    for w in blocks:
        check_normal(w, FORMULAS[name][1](64, 64))


def test_orthogonal_on_any_module():
    conv = init(nn.Conv2d(8, 16, 3), "orthogonal", {"gain": 0.5})
    w = conv.weight.detach().double().reshape(16, -1)  # (16, 72): orthonormal rows
    assert torch.allclose(w @ w.T, 0.25 * torch.eye(16, dtype=torch.float64), atol=1e-5)
    mha = init(nn.MultiheadAttention(16, 2), "orthogonal")
    for block in mha.in_proj_weight.detach().double().chunk(3):  # q, k, v each a rotation
        assert torch.allclose(block @ block.T, torch.eye(16, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("name", ["zeros", "kaiming_normal", "xavier_uniform", "trunc_normal"])
def test_biases_norms_and_other_small_parameters(name):
    model = nn.ModuleDict({"conv": nn.Conv2d(3, 8, 3), "ln": nn.LayerNorm(8), "bn": nn.BatchNorm2d(8),
                           "gn": nn.GroupNorm(2, 8), "mha": nn.MultiheadAttention(8, 2, add_bias_kv=True),
                           "custom": Custom(8)})
    with torch.no_grad():
        for norm in ("ln", "bn", "gn"):
            model[norm].weight.fill_(5.0)
            model[norm].bias.fill_(5.0)
    init(model, name)
    for norm in ("ln", "bn", "gn"):  # a norm starts as the identity: weight 1, bias 0
        assert torch.all(model[norm].weight == 1) and torch.all(model[norm].bias == 0), norm
    for bias in ("conv.bias", "mha.in_proj_bias", "mha.out_proj.bias", "mha.bias_k", "mha.bias_v",
                 "custom.bias"):
        assert torch.all(model.get_parameter(bias) == 0), bias
    assert torch.all(model["custom"].gain == 3.0)  # neither weight nor bias: kept as constructed
    init(model, name, init_bias=0.5)
    assert torch.all(model["custom"].bias == 0.5) and torch.all(model["ln"].bias == 0)


def test_embedding_padding_row_stays_zero():
    emb = init(nn.Embedding(10, 4, padding_idx=3), "kaiming_normal")
    assert torch.all(emb.weight[3] == 0) and torch.all(emb.weight[[0, 1, 2, 4]] != 0)


# --- default: every module's own reset, as its constructor draws -------------------------------
class Block(nn.Module):
    """A transformer-ish block: every kind of module above, built in forward order."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.up = nn.ConvTranspose1d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.mix = Resettable(16)
        self.head = nn.Linear(16, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.emb(tokens))
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = self.bn(self.up(self.conv(x.transpose(1, 2)))).transpose(1, 2)
        return self.head(self.mix(x))


DEFAULT_CASES = {**{k: v[0] for k, v in CASES.items() if k != "Custom"}, "Resettable": Resettable,
                 "LayerNorm": lambda: nn.LayerNorm(32), "BatchNorm2d": lambda: nn.BatchNorm2d(8),
                 "Block": Block}


@pytest.mark.parametrize("module", sorted(DEFAULT_CASES))
def test_default_equals_the_constructors_draw(module):
    build = DEFAULT_CASES[module]
    torch.manual_seed(5)
    reference = build()
    model = build()  # another state of the RNG
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    init(model, "default", seed=5)
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        if name.endswith("gain"):  # Resettable's reset leaves its gain alone
            assert torch.equal(q, p + 1.0), name
            continue
        assert torch.equal(p, q), name


def test_default_keeps_a_custom_module_without_reset_parameters():
    model = Custom()
    before = [p.detach().clone() for p in model.parameters()]
    init(model, "default")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# --- gains without an activation ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kaiming_normal", "kaiming_uniform"])
def test_kaiming_without_an_activation_asks_for_a_gain(name):
    with pytest.raises(UserError, match=rf"init '{name}'.*no single activation.*\[init_params.{name}\] gain"):
        init(Block(), name, activation=None)
    model = init(copies(lambda: nn.Conv2d(16, 32, 3), MIN_DRAWS), name, {"gain": 2.0}, activation=None)
    scale = 2.0 / math.sqrt(144)
    w = pooled(model, "weight")
    check_normal(w, scale) if name == "kaiming_normal" else check_uniform(w, math.sqrt(3) * scale)


def test_gain_one_schemes_need_no_activation():
    init(Block(), "xavier_uniform", activation=None)
    init(Block(), "orthogonal", activation=None)
    with pytest.raises(UserError, match="no single activation"):
        init(Block(), "orthogonal", {"gain": "activation"}, activation=None)


# --- LSUV on any module -------------------------------------------------------------------------------
def _unit_variances(model: nn.Module, x: torch.Tensor, kinds: tuple[type, ...]) -> dict[str, float]:
    out: dict[str, float] = {}

    def hook(name: str):
        def record(module, args, output) -> None:
            out.setdefault(name, (output[0] if isinstance(output, tuple) else output).var().item())
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_lsuv_on_a_conv_net_with_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.ConvTranspose2d(16, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    x = torch.randn(64, 3, 10, 10) * 3.0
    ctx = inits.InitContext("relu", schemes.resolve_params("lsuv", {"tol": 0.05}), data=x)
    inits.apply(model, "lsuv", ctx)
    bn = model[3]  # LSUV's forward passes must not leave running statistics behind
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1) and bn.num_batches_tracked == 0
    variances = _unit_variances(model, x, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
    assert len(variances) == 4 and all(abs(v - 1) < 0.05 for v in variances.values()), variances


def test_lsuv_on_embedding_and_attention():
    torch.manual_seed(0)
    model = Block()
    tokens = torch.randint(1, 50, (32, 12))
    inits.apply(model, "lsuv", inits.InitContext(None, schemes.resolve_params("lsuv", {}), data=tokens))
    variances = _unit_variances(model, tokens, (nn.Embedding, nn.MultiheadAttention, nn.Conv1d,
                                                nn.ConvTranspose1d, Custom, nn.Linear))
    assert set(variances) == {"emb", "attn", "conv", "up", "mix", "head"}
    assert all(abs(v - 1) < 0.1 for v in variances.values()), variances


# --- rules ---------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(16, 32), "fc2": nn.Linear(32, 16)})
                                    for _ in range(3))
        self.head = nn.Linear(16, 4)


def rules(*tables: dict) -> tuple[inits.Rule, ...]:
    return tuple(schemes.parse_rule(t, f"rule {i}") for i, t in enumerate(tables, 1))


def test_rules_apply_after_the_scheme_in_order():
    plain = init(Net(), "kaiming_normal", seed=1)
    ruled = init(Net(), "kaiming_normal", seed=1, rules=rules(
        {"match": "blocks.*.fc2.weight", "value": 0.0},  # zero-init last layer of each residual branch
        {"match": "head.weight", "init": "orthogonal", "gain": 0.01},  # RL's small-gain head
        {"match": "blocks.0.fc1.weight", "scale": 2.0},
        {"match": "blocks.[12].fc1.bias", "value": 1.0},
        {"match": "blocks.2.fc1.bias", "scale": 3.0},  # sees the previous rule's value
    ))
    for i in range(3):
        assert torch.all(ruled.blocks[i].fc2.weight == 0)
    w = ruled.head.weight.detach().double()
    assert torch.allclose(w @ w.T, 1e-4 * torch.eye(4, dtype=torch.float64), atol=1e-9)
    assert torch.equal(ruled.blocks[0].fc1.weight, 2.0 * plain.blocks[0].fc1.weight)
    assert torch.equal(ruled.blocks[1].fc1.weight, plain.blocks[1].fc1.weight)  # the rest untouched
    assert torch.all(ruled.blocks[1].fc1.bias == 1) and torch.all(ruled.blocks[2].fc1.bias == 3)
    assert torch.all(ruled.blocks[0].fc1.bias == 0)


def test_scheme_rule_on_an_mha_weight_uses_the_blocks():
    model = init(nn.ModuleDict({"attn": nn.MultiheadAttention(16, 2)}), "default",
                 rules=rules({"match": "attn.in_proj_weight", "init": "orthogonal"}))
    for block in model["attn"].in_proj_weight.detach().double().chunk(3):
        assert torch.allclose(block @ block.T, torch.eye(16, dtype=torch.float64), atol=1e-5)


def test_a_rule_matching_nothing_is_an_error_naming_it():
    with pytest.raises(UserError, match=r"rule 2 \{match = 'haed.weight', value = 0.0\} matches no "
                                        r"parameter; .*'blocks.0.fc1.weight', 'blocks.0.fc1.bias'.*"
                                        r"\(14 in all\)"):
        init(Net(), "kaiming_normal", rules=rules({"match": "head.weight", "scale": 2.0},
                                                  {"match": "haed.weight", "value": 0.0}))


BAD_RULES = [
    ({"mtach": "head.weight", "value": 0}, "unknown key 'mtach'"),
    ({"match": "head.weight", "init": "orthogonal", "gian": 0.1}, "unknown key 'gian'"),
    ({"match": "head.weight", "init": "lsuv"}, "not per-parameter"),
    ({"match": "head.weight", "init": "default"}, "not per-parameter"),
    ({"match": "head.weight", "init": "xavier"}, "'xavier_uniform'"),
    ({"match": "head.weight", "value": 0, "scale": 2}, "exactly one of"),
    ({"match": "head.weight"}, "exactly one of"),
    ({"match": "head.weight", "scale": "2"}, "scale = '2'"),
    ({"match": "head.weight", "value": float("nan")}, "finite number"),
    ({"match": 3, "value": 0}, "match = 3"),
    ({"match": "head.weight", "init": "scaled_normal", "std": -1}, "must be > 0"),
    ({"match": "head.weight", "init": "trunc_normal", "a": 2, "b": 1}, "must be below b"),
]


@pytest.mark.parametrize(("table", "needle"), BAD_RULES, ids=[n for _, n in BAD_RULES])
def test_bad_rules_are_user_errors(table, needle):
    with pytest.raises(UserError, match=r"^rule 1") as info:
        schemes.parse_rule(table, "rule 1")
    assert needle in str(info.value)


def test_a_fan_scheme_rule_on_a_bias_is_an_error():
    with pytest.raises(UserError, match="needs fans.*'head.bias'"):
        init(Net(), "default", rules=rules({"match": "head.*", "init": "kaiming_normal"}))
    init(Net(), "default", rules=rules({"match": "head.*", "init": "scaled_normal", "std": 0.1}))


# --- rules in specs ------------------------------------------------------------------------------------
RULES_SPEC = """
name = "rules"
[grid]
rules = ["none", "zero_head", "rl_head"]
init = ["orthogonal"]
[model]
depth = 3
width = 8
[task]
name = "teacher"
n_train = 64
n_val = 16
[train]
steps = 4
batch_size = 32
log_every = 2

[[init_rules.zero_head]]
match = "4.weight"
value = 0.0

[init_rules.rl_head]
rules = [{match = "4.weight", init = "orthogonal", gain = 0.01}, {match = "*.bias", value = 0.1}]
"""


def test_a_rule_set_axis_expands_into_distinct_jobs():
    jobs = spec.parse(RULES_SPEC, "rules.toml").jobs()
    assert [j.rules for j in jobs] == ["none", "zero_head", "rl_head"]
    assert len({j.job_id for j in jobs}) == 3
    assert jobs[0].init_rules == () and "init_rules" not in jobs[0].settings()
    assert jobs[2].init_rules[0] == inits.Rule("4.weight", "orthogonal", (("gain", 0.01),))
    assert jobs[1].settings()["init_rules"] == '[{"match":"4.weight","value":0.0}]'
    from bench.train import bundle, tasks

    job = jobs[2]
    model = bundle.build_model(job, tasks.load(job.task, job.task_params, job.seed))
    assert torch.all(model[4].bias == 0.1) and model[4].weight.abs().max() < 0.011


def test_rules_none_keeps_old_job_ids_and_rule_content_changes_them():
    base = RULES_SPEC.split("\n[[init_rules")[0].replace('rules = ["none", "zero_head", "rl_head"]\n', "")
    (plain,) = spec.parse(base, "a.toml").jobs()
    (explicit,) = spec.parse(base.replace("[model]\n", '[model]\nrules = "none"\n'), "b.toml").jobs()
    assert plain.job_id == explicit.job_id and spec.parse(base, "a.toml").fingerprint == spec.parse(
        base.replace("[model]\n", '[model]\nrules = "none"\n'), "b.toml").fingerprint
    assert replace(plain, rules="x").job_id != plain.job_id
    one = spec.parse(RULES_SPEC, "r.toml").jobs()[1]
    other = spec.parse(RULES_SPEC.replace("value = 0.0", "value = 0.5"), "r.toml").jobs()[1]
    assert one.rules == other.rules and one.job_id != other.job_id


BAD_SPECS = [
    (RULES_SPEC.replace('match = "4.weight"\nvalue', 'match = "head.weight"\nvalue'),
     ["[init_rules.zero_head] rule 1 {match = 'head.weight', value = 0.0} matches no parameter",
      "'0.weight'"]),
    (RULES_SPEC.replace('match = "4.weight"\nvalue', 'mtach = "4.weight"\nvalue'),
     ["[init_rules.zero_head] rule 1: unknown key 'mtach'", "'match'"]),
    (RULES_SPEC.replace('"zero_head", "rl_head"]', '"zero_haed"]'),
     ["[grid] rules = 'zero_haed'", "unknown rule set", "'zero_head'"]),
    (RULES_SPEC.replace("[init_rules.rl_head]\nrules", "[init_rules.rl_head]\nrulez"),
     ["unknown key 'rulez'"]),
    (RULES_SPEC.replace("init_rules.zero_head", "init_rules.none"), ["[init_rules.none]", "'none' means"]),
    (RULES_SPEC.replace('init = "orthogonal", gain = 0.01', 'init = "kaiming_normal"').replace(
        '"4.weight", init', '"4.*", init'), ["needs fans", "'4.bias'"]),
]


@pytest.mark.parametrize(("text", "needles"), BAD_SPECS, ids=[f"bad{i}" for i in range(len(BAD_SPECS))])
def test_bad_rule_specs_are_one_line_user_errors(text, needles):
    with pytest.raises(UserError) as info:
        spec.parse(text, "rules.toml")
    message = str(info.value)
    assert message.startswith("rules.toml: ") and "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("bad", [0, 1], ids=["no-match", "misspelled-key"])
def test_sweep_cli_exits_2_with_one_line(tmp_path, bad):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_SPECS[bad][0])
    done = subprocess.run([sys.executable, "-m", "bench.sweep", str(path), "--out", str(tmp_path / "out"),
                           "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and BAD_SPECS[bad][1][0] in done.stderr, done.stderr


# --- trunc_normal ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("std", "a", "b"), [(0.02, -2.0, 2.0), (0.5, -2.0, 2.0), (1.0, -1.0, 3.0)])
def test_trunc_normal_matches_theory(std, a, b):
    model = init(copies(lambda: nn.Linear(128, 64), 4 * MIN_DRAWS), "trunc_normal",
                 {"std": std, "a": a, "b": b})
    w = pooled(model, "weight")
    mean, var, kurt = (float(v) for v in stats.truncnorm.stats(a, b, moments="mvk"))
    n = w.size
    assert w.min() >= a * std * (1 + 1e-6) and w.max() <= b * std * (1 + 1e-6)
    assert w.min() < 0.99 * a * std and w.max() > 0.99 * b * std  # the cut is where it is said to be
    assert abs(w.mean() - mean * std) < SE * std * math.sqrt(var / n)
    assert abs(w.std() - std * math.sqrt(var)) < SE * std * math.sqrt(var * (kurt + 2) / (4 * n))
    assert abs(stats.kurtosis(w) - kurt) < SE * math.sqrt(24 / n)
    assert stats.kstest(w / std, "truncnorm", args=(a, b)).pvalue > 1e-4
    if (std, a, b) == (0.02, -2.0, 2.0):  # the numbers users of a 2-std cut expect
        assert w.std() == pytest.approx(0.0176, abs=1e-4)
        assert stats.kurtosis(w) == pytest.approx(-0.63, abs=0.03)
    assert theory.truncated_variance(a, b) == pytest.approx(var, rel=1e-12)


def test_trunc_normal_bounds_are_in_units_of_std():
    # torch.nn.init.trunc_normal_(w, std=0.02) with its default a=-2, b=2 cuts at 100 std: no cut at all.
    w = init(nn.Linear(256, 256), "trunc_normal").weight
    assert w.abs().max() <= 0.04 * (1 + 1e-6)
    assert schemes.check_param("trunc_normal", "a", -3, "x") == -3.0
    with pytest.raises(UserError, match="must be below b"):
        spec.parse('[model]\ninit = "trunc_normal"\n[init_params.trunc_normal]\na = 1\nb = 1\n', "t.toml")


def test_the_readme_rules_example_parses():
    text = (ROOT / "README.md").read_text()
    start = text.index("```toml", text.index("## Init rules by parameter name")) + len("```toml")
    jobs = spec.parse(text[start:text.index("```", start)], "README.md").jobs()
    assert [j.rules for j in jobs] == ["none", "zero_head", "rl_head"]


def test_a_rules_sweep_runs_end_to_end(tmp_path):
    import bench

    path = tmp_path / "rules.toml"
    path.write_text(RULES_SPEC)
    done = subprocess.run([sys.executable, "-m", "bench.sweep", str(path), "--out", str(tmp_path / "out"),
                           "--no-report", "--quiet", "--jobs", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    r = bench.load(tmp_path / "out")
    assert sorted(r.runs["rules"]) == ["none", "rl_head", "zero_head"] and set(r.runs["status"]) == {"ok"}
    start = r.layers[r.layers["step"] == 0].merge(r.runs[["job_id", "rules"]], on="job_id")
    # theory predicts the scheme, not what rules change after it: no q_pred for ruled jobs
    assert start.loc[start["rules"] != "none", "q_pred"].isna().all()
    assert start.loc[(start["rules"] == "none") & (start["param"] == "preact"), "q_pred"].notna().all()


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 64)
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.tok.weight  # tied, as GPT-2's head


def test_default_keeps_a_tied_weight_as_constructed():
    """Re-running every reset would leave the head's U(+-1/8) on the shared tensor (its reset runs
    last); the constructor's tying keeps the embedding's N(0, 1)."""
    torch.manual_seed(0)
    model = _Tied()
    inits.apply(model, "default", inits.InitContext("relu", {}))
    assert model.head.weight is model.tok.weight
    assert 0.9 < float(model.tok.weight.std()) < 1.1
