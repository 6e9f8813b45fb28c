"""Every init scheme checked against its defining distribution, statistically.

Each scheme is applied through ``bench.train.inits.apply`` to plain ``nn.Linear`` layers (several of one
shape, pooled, so that a test sees >= 32k draws); the pooled sample is then compared with the
formula: mean and std within 5 standard errors (the SE of a sample std is
sigma * sqrt((kurtosis - 1) / 4n): kurtosis 3 for a normal, 1.8 for a uniform), the shape by
excess kurtosis and a Kolmogorov-Smirnov test against the exact distribution, and a uniform's
support bound. Every draw is seeded, so each check is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F

from bench import spec
from bench.errors import UserError
from bench.train import bundle, inits, models, schemes, tasks

torch.set_num_threads(1)

SHAPES = [(64, 64), (128, 32), (32, 256)]  # (fan_in, fan_out): square, wide in, wide out
ACTIVATIONS = ["relu", "tanh", "selu", "gelu", "linear", "leaky_relu"]
# What each gain must be, written out (not computed by the code under test).
GAINS = {"relu": math.sqrt(2), "tanh": 5 / 3, "selu": 3 / 4, "linear": 1.0, "sigmoid": 1.0,
         "leaky_relu": math.sqrt(2 / (1 + 0.01**2)), "gelu": 1.534}
MIN_DRAWS = 32768
BIAS_DRAWS = 4096  # biases are fan_out per layer: pool this many (many small layers)
SE = 5.0  # tolerance, in standard errors
KS_P = 1e-4  # a KS p-value below this rejects the distribution


# --- helpers -----------------------------------------------------------------------------
def linears(fan_in: int, fan_out: int, n_layers: int | None = None, bias: bool = True) -> nn.Sequential:
    """Several independent layers of one shape: apply() initializes each; we pool their draws."""
    n_layers = n_layers or math.ceil(MIN_DRAWS / (fan_in * fan_out))
    return nn.Sequential(*(nn.Linear(fan_in, fan_out, bias=bias) for _ in range(n_layers)))


def init(model: nn.Module, name: str, activation: str = "relu", params: dict | None = None,
         init_bias: str | float = "auto", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    ctx = inits.InitContext(activation=activation, params=schemes.resolve_params(name, params or {}))
    inits.apply(model, name, ctx, init_bias)
    return model


def pooled(model: nn.Module, what: str = "weight") -> np.ndarray:
    return np.concatenate([getattr(m, what).detach().double().numpy().ravel()
                           for m in model if isinstance(m, nn.Linear)])


def check_normal(w: np.ndarray, sigma: float) -> None:
    n = w.size
    assert abs(w.mean()) < SE * sigma / math.sqrt(n), (w.mean(), sigma)
    assert abs(w.std() - sigma) < SE * sigma * math.sqrt(2 / (4 * n)), (w.std(), sigma)
    assert abs(stats.kurtosis(w)) < SE * math.sqrt(24 / n), stats.kurtosis(w)  # excess kurtosis 0
    assert stats.kstest(w, "norm", args=(0.0, sigma)).pvalue > KS_P


def check_uniform(w: np.ndarray, bound: float) -> None:
    n, sigma = w.size, bound / math.sqrt(3)
    assert abs(w.mean()) < SE * sigma / math.sqrt(n), (w.mean(), sigma)
    assert abs(w.std() - sigma) < SE * sigma * math.sqrt(0.8 / (4 * n)), (w.std(), sigma)
    assert np.abs(w).max() <= bound * (1 + 1e-6)
    assert np.abs(w).max() > 0.98 * bound  # P(all n draws inside 0.98 b) = 0.98^n: nil
    # a uniform's excess kurtosis is -1.2; its sample SE is about 1.1 / sqrt(n)
    assert abs(stats.kurtosis(w) + 1.2) < SE * 1.25 / math.sqrt(n), stats.kurtosis(w)
    assert stats.kstest(w, "uniform", args=(-bound, 2 * bound)).pvalue > KS_P


# --- gains ---------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", sorted(GAINS))
def test_activation_gain(activation):
    gain = inits.activation_gain(activation)
    assert gain == pytest.approx(GAINS[activation], abs=1e-3)
    if activation != "gelu":  # PyTorch has no gain for gelu
        param = 0.01 if activation == "leaky_relu" else None
        assert gain == pytest.approx(nn.init.calculate_gain(activation, param), rel=1e-12)


def test_gelu_gain_keeps_the_second_moment():
    # The documented definition, by Monte Carlo: E[(g * gelu(z))^2] = 1 for z ~ N(0, 1).
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moment = (inits.activation_gain("gelu") * F.gelu(z)).pow(2)
    se = moment.std().item() / math.sqrt(len(z))
    assert abs(moment.mean().item() - 1.0) < SE * se


def test_unknown_activation_and_init_fail_with_choices():
    with pytest.raises(UserError, match=r"'swish'.*'relu'"):
        inits.activation_gain("swish")
    with pytest.raises(UserError, match=r"unknown init 'xavier'.*'xavier_uniform'"):
        inits.apply(nn.Linear(2, 2), "xavier", inits.InitContext("relu"))


# --- kaiming ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ["kaiming_normal", "kaiming_uniform"])
def test_kaiming(name, shape, activation, mode):
    fan_in, fan_out = shape
    w = pooled(init(linears(fan_in, fan_out), name, activation, {"mode": mode}))
    std = GAINS[activation] / math.sqrt(fan_in if mode == "fan_in" else fan_out)
    if activation == "gelu":
        std *= inits.activation_gain("gelu") / GAINS["gelu"]  # the pinned 1.534 is rounded
    if name == "kaiming_normal":
        check_normal(w, std)
    else:
        check_uniform(w, math.sqrt(3) * std)


@pytest.mark.parametrize("gain", [0.5, 2.0])
@pytest.mark.parametrize("name", ["kaiming_normal", "kaiming_uniform"])
def test_kaiming_with_an_explicit_gain(name, gain):
    w = pooled(init(linears(128, 32), name, "relu", {"gain": gain}))
    std = gain / math.sqrt(128)
    check_normal(w, std) if name == "kaiming_normal" else check_uniform(w, math.sqrt(3) * std)


# --- xavier --------------------------------------------------------------------------------
XAVIER_GAINS = [  # (params, activation, expected gain)
    ({}, "relu", 1.0),  # Glorot's scheme: gain 1 whatever the activation
    ({}, "tanh", 1.0),
    ({"gain": "activation"}, "tanh", 5 / 3),
    ({"gain": "activation"}, "relu", math.sqrt(2)),
    ({"gain": 0.5}, "relu", 0.5),
    ({"gain": 3}, "linear", 3.0),
]


@pytest.mark.parametrize(("params", "activation", "gain"), XAVIER_GAINS,
                         ids=[f"{a}-{p.get('gain', 'default')}" for p, a, _ in XAVIER_GAINS])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ["xavier_normal", "xavier_uniform"])
def test_xavier(name, shape, params, activation, gain):
    fan_in, fan_out = shape
    w = pooled(init(linears(fan_in, fan_out), name, activation, params))
    std = gain * math.sqrt(2 / (fan_in + fan_out))
    check_normal(w, std) if name == "xavier_normal" else check_uniform(w, math.sqrt(3) * std)


def test_unresolved_params_still_mean_the_documented_scheme():
    # A caller that passes no params gets each scheme's defaults (xavier: gain 1, not relu's).
    torch.manual_seed(0)
    model = linears(64, 64)
    inits.apply(model, "xavier_normal", inits.InitContext("relu"))
    check_normal(pooled(model), math.sqrt(2 / 128))
    inits.apply(model, "scaled_normal", inits.InitContext("relu"))
    check_normal(pooled(model), 0.02)


# --- orthogonal, zeros, scaled_normal, mean_field -----------------------------------------------
@pytest.mark.parametrize(("params", "gain"),
                         [({}, 1.0), ({"gain": 0.5}, 0.5), ({"gain": "activation"}, math.sqrt(2))])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_orthogonal(shape, params, gain):
    fan_in, fan_out = shape
    model = init(linears(fan_in, fan_out, n_layers=3), "orthogonal", "relu", params)
    for layer in model:
        w = layer.weight.detach().double()  # (fan_out, fan_in)
        gram = w @ w.T if fan_out <= fan_in else w.T @ w  # the orthonormal side: rows or columns
        assert torch.allclose(gram, gain**2 * torch.eye(len(gram), dtype=torch.float64), atol=1e-5, rtol=0)
        assert torch.all(layer.bias == 0)
    first, second = model[0].weight, model[1].weight
    assert not torch.equal(first, second)  # each layer its own random rotation


def test_zeros():
    model = init(linears(32, 256, n_layers=2), "zeros")
    assert all(torch.all(p == 0) for p in model.parameters())


@pytest.mark.parametrize("std", [None, 0.1, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_scaled_normal(shape, std):
    params = {} if std is None else {"std": std}
    check_normal(pooled(init(linears(*shape), "scaled_normal", "tanh", params)), std or 0.02)


@pytest.mark.parametrize(("sigma_w2", "sigma_b2"), [(2.0, 0.0), (1.5, 0.05)])
@pytest.mark.parametrize("shape", [(64, 64), (128, 32)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_mean_field(shape, sigma_w2, sigma_b2):
    fan_in, fan_out = shape
    model = init(linears(fan_in, fan_out, n_layers=BIAS_DRAWS // fan_out), "mean_field", "tanh",
                 {"sigma_w2": sigma_w2, "sigma_b2": sigma_b2})
    check_normal(pooled(model), math.sqrt(sigma_w2 / fan_in))
    b = pooled(model, "bias")
    if sigma_b2 == 0:
        assert np.all(b == 0)
    else:
        check_normal(b, math.sqrt(sigma_b2))
    # init_bias other than auto overrides sigma_b2
    model = init(linears(fan_in, fan_out, n_layers=2), "mean_field", "tanh", {"sigma_b2": 0.5},
                 init_bias="zeros")
    assert np.all(pooled(model, "bias") == 0)


# --- default: exactly what PyTorch's constructors draw ------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_default_is_bit_identical_to_the_constructor(shape):
    fan_in, fan_out = shape
    torch.manual_seed(7)
    reference = nn.Linear(fan_in, fan_out)
    layer = nn.Linear(fan_in, fan_out)  # drawn from another state of the RNG
    assert not torch.equal(layer.weight, reference.weight)
    init(layer, "default", seed=7)
    assert torch.equal(layer.weight, reference.weight) and torch.equal(layer.bias, reference.bias)


@pytest.mark.parametrize("init_bias", ["auto", "default"])
def test_default_on_a_model_is_bit_identical_to_building_it(init_bias):
    # Both bias modes keep the layer's own draw, the one made together with its weight.
    torch.manual_seed(3)
    reference = models.mlp(16, 4, 4, 32, "relu")
    model = init(models.mlp(16, 4, 4, 32, "relu"), "default", seed=3, init_bias=init_bias)
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_default_distribution(shape):
    fan_in, fan_out = shape
    model = init(linears(fan_in, fan_out, n_layers=BIAS_DRAWS // fan_out), "default")
    check_uniform(pooled(model), 1 / math.sqrt(fan_in))
    check_uniform(pooled(model, "bias"), 1 / math.sqrt(fan_in))


# --- biases ---------------------------------------------------------------------------------------
NAMED = [n for n, s in inits.INITS.items() if s.named and n != "lsuv"]


@pytest.mark.parametrize("name", NAMED)
def test_named_schemes_zero_biases_under_auto(name):
    model = init(linears(32, 64, n_layers=2), name, "relu")
    assert np.all(pooled(model, "bias") == 0)


@pytest.mark.parametrize("name", [*NAMED, "default"])
def test_init_bias_modes(name):
    torch.manual_seed(11)
    model = linears(128, 32, n_layers=BIAS_DRAWS // 32)
    drawn = pooled(model, "bias")
    if name != "default":  # "default" keeps the constructor's bias for named schemes
        assert np.array_equal(pooled(init(model, name, "relu", init_bias="default"), "bias"), drawn)
    check_uniform(pooled(init(model, name, "relu", init_bias="default"), "bias"), 1 / math.sqrt(128))
    assert np.all(pooled(init(model, name, "relu", init_bias=0.25), "bias") == np.float32(0.25))
    assert np.all(pooled(init(model, name, "relu", init_bias=-1), "bias") == -1)
    assert np.all(pooled(init(model, name, "relu", init_bias="zeros"), "bias") == 0)


def test_default_keeps_its_bias_under_auto():
    model = init(linears(128, 32, n_layers=BIAS_DRAWS // 32), "default", init_bias="auto")
    b = pooled(model, "bias")
    assert np.all(b != 0)
    check_uniform(b, 1 / math.sqrt(128))


def test_layers_without_bias():
    for name in ["default", "kaiming_normal", "mean_field"]:
        model = init(linears(16, 16, n_layers=2, bias=False), name, init_bias="auto")
        assert all(m.bias is None for m in model)


# --- through a deep network -------------------------------------------------------------------------
def _second_moments(name: str, depth: int = 20, width: int = 256) -> list[float]:
    model = init(models.mlp(width, width, depth, width, "relu"), name, "relu")
    x = torch.randn(512, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return [z.pow(2).mean().item() for z in models.preactivations(model, x)]


@pytest.mark.parametrize(("name", "ratio"), [("xavier_normal", 0.5), ("xavier_uniform", 0.5),
                                             ("kaiming_normal", 1.0), ("kaiming_uniform", 1.0)])
def test_deep_relu_second_moment_per_layer(name, ratio):
    # He et al.: with gain 1, each ReLU layer halves E[z^2]; with gain sqrt(2) it keeps it.
    moments = _second_moments(name)
    per_layer = (moments[-1] / moments[0]) ** (1 / (len(moments) - 1))  # the geometric mean ratio
    assert per_layer == pytest.approx(ratio, rel=0.10)
    steps = np.array(moments[1:]) / np.array(moments[:-1])
    assert np.all(np.abs(steps / ratio - 1) < 0.35), steps  # no single layer far off either


def test_zeros_gives_zero_activations():
    model = init(models.mlp(32, 8, 6, 64, "tanh"), "zeros", "tanh")
    with torch.no_grad():
        outs = models.preactivations(model, torch.randn(64, 32))
    assert all(torch.all(z == 0) for z in outs)


@pytest.mark.parametrize("tol", [None, 0.01])
def test_lsuv_normalizes_every_layer(tol):
    torch.manual_seed(0)
    model = models.mlp(128, 128, 10, 128, "relu")
    x = torch.randn(512, 128)
    params = schemes.resolve_params("lsuv", {} if tol is None else {"tol": tol})
    ctx = inits.InitContext("relu", params, data=x, forward=models.preactivations)
    inits.apply(model, "lsuv", ctx)
    with torch.no_grad():
        variances = [z.var().item() for z in models.preactivations(model, x)]
    assert all(abs(v - 1) < params["tol"] for v in variances), variances  # with the final (zero) biases
    layers = inits.layers(model)
    assert all(torch.all(layer.bias == 0) for layer in layers)
    he = [layer.weight.shape[1] * layer.weight.var().item() for layer in layers[1:]]
    # Behind a ReLU, unit preactivation variance needs fan_in Var(w) = 2 (He); finite width
    # scatters single layers, their mean is tight.
    assert np.mean(he) == pytest.approx(2.0, rel=0.10), he
    assert all(abs(h / 2 - 1) < 0.3 for h in he), he
    assert layers[0].weight.shape[1] * layers[0].weight.var().item() == pytest.approx(1.0, rel=0.1)


def test_lsuv_needs_data():
    with pytest.raises(UserError, match="lsuv"):
        init(models.mlp(4, 4, 2, 4, "relu"), "lsuv")


# --- engine.build_model is seeded ------------------------------------------------------------
BUILD_SPEC = """
[grid]
init = ["default", "kaiming_normal", "lsuv"]
seed = [0, 1]
[model]
depth = 3
width = 16
[task]
name = "teacher"
n_train = 64
n_val = 16
[train]
batch_size = 32
"""


def test_build_model_is_seeded():
    jobs = spec.parse(BUILD_SPEC, "build.toml").jobs()
    state = torch.get_rng_state()

    def weights(job):
        model = bundle.build_model(job, tasks.load(job.task, job.task_params, job.seed))
        return [p.detach().clone() for p in model.parameters()]

    by_job = {}
    for job in jobs:
        first, again = weights(job), weights(job)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True)), job.init
        by_job[(job.init, job.seed)] = first
    for name in ("default", "kaiming_normal", "lsuv"):
        seed0, seed1 = by_job[(name, 0)], by_job[(name, 1)]
        assert not torch.equal(seed0[0], seed1[0]), name
    assert torch.equal(torch.get_rng_state(), state)  # building never disturbs the caller's RNG
