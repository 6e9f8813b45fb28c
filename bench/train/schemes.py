"""The init schemes a spec may name, declared without torch: parameters, defaults, checks, rule syntax.

:data:`SCHEMES` is what a user sees of each scheme: its parameters and their defaults, whether it
zeroes biases, whether it has a per-tensor form (so a rule may name it). The spec validates
against it, so reading and checking a spec (and ``--dry-run``) does not import torch.
:data:`bench.train.inits.INITS` pairs every declared name with its implementation; a test
(tests/test_layers.py) asserts the two registries hold the same names.

Adding a scheme: declare it here (its parameters, and in :func:`check_param` a check for any
parameter kind not seen before), then implement it in ``inits`` (``PER_TENSOR`` or ``WHOLE_MODEL``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.errors import UserError, is_number, shown
from bench.job import Rule

BIAS_MODES = ("auto", "zeros", "default")


@dataclass(frozen=True)
class Declared:
    """A scheme as a spec sees it: its parameters' defaults and how it treats biases and rules."""

    params: dict[str, Any]
    named: bool = True  # named schemes zero biases under init_bias = "auto"
    data_dependent: bool = False  # reads a data batch: biases are set before it runs, not after
    per_tensor: bool = True  # has a per-tensor form (a rule may name it); else it initializes a whole model
    fans: bool = True  # the per-tensor form reads the fans: it needs a tensor of >= 2 dims
    doc: str = ""
    needs: str = ""  # the structure the model must have (the built-in mlp has none of them)


_RESIDUAL = "residual_inits: residual branches by the block convention; sets biases and norms"
_BLOCKS = "residual blocks (resmlp, resnet, transformer, or a factory following the block convention)"
SCHEMES: dict[str, Declared] = {
    "default": Declared({}, named=False, per_tensor=False, doc="each module's own reset_parameters()"),
    "kaiming_uniform": Declared({"gain": "activation", "mode": "fan_in"}, doc="U(+-gain sqrt(3 / fan))"),
    "kaiming_normal": Declared({"gain": "activation", "mode": "fan_in"}, doc="N(0, gain^2 / fan): He et al."),
    "xavier_uniform": Declared({"gain": 1.0}, doc="Glorot & Bengio: U(+-gain sqrt(6 / (fan_in + fan_out)))"),
    "xavier_normal": Declared({"gain": 1.0}, doc="N(0, gain^2 2 / (fan_in + fan_out))"),
    "orthogonal": Declared({"gain": 1.0}, doc="a (semi-)orthogonal matrix times gain (Saxe et al.)"),
    "zeros": Declared({}, fans=False, doc="all zeros: symmetry is never broken"),
    "scaled_normal": Declared({"std": 0.02}, fans=False, doc="N(0, std^2), independent of fan-in"),
    "trunc_normal": Declared({"std": 0.02, "a": -2.0, "b": 2.0}, fans=False,
                             doc="N(0, std^2) cut at [a std, b std]"),
    "mean_field": Declared({"sigma_w2": 2.0, "sigma_b2": 0.0}, doc="N(0, sigma_w2 / fan_in) (Poole et al.)"),
    "lsuv": Declared({"tol": 0.1, "max_iter": 10}, data_dependent=True, per_tensor=False,
                     doc="orthonormal, then each layer scaled to unit output variance (Mishkin & Matas)"),
    # Residual-aware schemes (bench.train.residual_inits): they set every bias and norm themselves,
    # so init_bias does not apply to them. Their parameters are residual_inits.RESIDUAL_INITS's.
    "zero_residual": Declared({"gain": "activation"}, named=False, per_tensor=False, needs=_BLOCKS,
                              doc=f"Goyal et al. 2017 ({_RESIDUAL})"),
    "fixup": Declared({"gain": "activation"}, named=False, per_tensor=False, needs=_BLOCKS,
                      doc=f"Zhang, Dauphin & Ma 2019 ({_RESIDUAL})"),
    "skipinit": Declared({"alpha": 0.0, "gain": "activation"}, named=False, per_tensor=False, needs=_BLOCKS,
                         doc=f"De & Smith 2020 ({_RESIDUAL})"),
    "rezero": Declared({"gain": "activation"}, named=False, per_tensor=False, needs=_BLOCKS,
                       doc=f"Bachlechner et al. 2020 ({_RESIDUAL})"),
    "gpt2": Declared({"std": 0.02}, named=False, per_tensor=False,
                     doc=f"GPT-2 as nanoGPT writes it ({_RESIDUAL})", needs=_BLOCKS),
    "small_init": Declared({"d": "width", "wang_outputs": False}, named=False, per_tensor=False,
                           doc="every Linear/Conv/Embedding weight N(0, 2 / (5 d)), d = the model width "
                               "(Nguyen & Salazar 2019)"),
    "mup": Declared({"base_width": 32, "output_mult": 1.0, "readout_zero_init": True,
                     "query_zero_init": True}, named=False, per_tensor=False,
                    doc="maximal-update parametrization (with its per-parameter learning rates)",
                    needs="an architecture that can be rebuilt at another width (resmlp, transformer, "
                          "or a factory taking 'width')"),
}


def declared(name: str) -> Declared:
    """Look up a scheme by name; unknown names fail loudly with the choices."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise UserError(f"unknown init {name!r}; choose from {sorted(SCHEMES)}") from None


def needs(name: str, params: dict[str, Any]) -> str:
    """The structure scheme ``name`` with ``params`` needs from the model ("" for none)."""
    if name == "small_init" and params.get("wang_outputs"):
        return _BLOCKS  # NeoX's wang_init scales the residual branches' last layers
    return declared(name).needs


def check_param(name: str, key: str, value: Any, where: str) -> Any:
    """Validate one scheme parameter from a spec."""
    defaults = declared(name).params
    if key not in defaults:
        raise UserError(f"{where}: unknown key {key!r} for init {name!r}; choose from {sorted(defaults)}")
    if key == "gain" and value == "activation":
        return value
    if isinstance(defaults[key], bool):  # a switch (muP's readout_zero_init): a number would be a typo
        if not isinstance(value, bool):
            raise UserError(f"{where} = {shown(value)}: expected true or false")
        return value
    if (name, key) == ("small_init", "d"):  # the model width: "width" (the job's) or a positive integer
        if value == "width":
            return value
        if not is_number(value) or value != int(value) or value < 1:
            raise UserError(f"{where} = {shown(value)}: expected an integer >= 1 or 'width' (the model's)")
        return int(value)
    if key == "mode":
        if value not in ("fan_in", "fan_out"):
            raise UserError(f"{where} = {shown(value)}: choose from ['fan_in', 'fan_out']")
        return value
    if not is_number(value):
        extra = " or 'activation'" if key == "gain" else ""
        raise UserError(f"{where} = {shown(value)}: expected a number{extra}")
    if key in ("a", "b"):  # truncation bounds, in units of std: any sign
        return float(value)
    if key == "max_iter" and value != int(value):  # int() would silently truncate 2.5 to 2
        raise UserError(f"{where} = {shown(value)}: expected an integer >= 1")
    positive = key in ("std", "tol", "max_iter")
    if value < 0 or (value == 0 and positive):
        raise UserError(f"{where} = {shown(value)}: must be {'>' if positive else '>='} 0")
    return int(value) if key == "max_iter" else float(value)


def resolve_params(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """A scheme's full parameter set: its defaults overlaid with what the spec gives."""
    params = {**declared(name).params, **given}
    if name == "trunc_normal" and not params["a"] < params["b"]:
        raise UserError(f"init 'trunc_normal': a = {params['a']!r} must be below b = {params['b']!r} "
                        "(bounds in units of std, e.g. a = -2, b = 2)")
    return params


# --- init rules by parameter name ---------------------------------------------------------------
RULE_KEYS = ("match", "init", "scale", "value")


def rule_schemes() -> list[str]:
    """The schemes a rule may name: those that initialize one tensor at a time."""
    return sorted(n for n, s in SCHEMES.items() if s.per_tensor)


def parse_rule(raw: Any, where: str) -> Rule:
    """Validate one rule table from a spec; every problem is a UserError naming ``where``."""
    if not isinstance(raw, dict):
        raise UserError(f"{where} = {raw!r}: expected a table like {{match = \"head.weight\", value = 0.0}}")
    name = raw.get("init")
    if "init" in raw and name not in rule_schemes():
        raise UserError(f"{where}: init = {name!r}: unknown or not per-parameter; "
                        f"choose from {rule_schemes()}")
    own = SCHEMES[name].params if "init" in raw else {}
    for key in raw:
        if key not in RULE_KEYS and key not in own:
            extra = f" or {name!r}'s parameters {sorted(own)}" if own else ""
            raise UserError(f"{where}: unknown key {key!r}; choose from {list(RULE_KEYS)}{extra}")
    match = raw.get("match")
    if not isinstance(match, str) or not match:
        raise UserError(f"{where}: match = {match!r}: expected a glob over parameter names, "
                        "e.g. \"head.weight\" or \"blocks.*.fc2.weight\"")
    actions = [k for k in ("init", "scale", "value") if k in raw]
    if len(actions) != 1:
        raise UserError(f"{where}: give exactly one of 'init', 'scale' or 'value', got {actions or 'none'}")
    if "init" in raw:
        given = {k: check_param(name, k, v, f"{where} {k}") for k, v in raw.items() if k in own}
        try:
            params = resolve_params(name, given)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        return Rule(match, init=name, params=tuple(sorted(params.items())))
    action = actions[0]
    if not is_number(raw[action]):
        raise UserError(f"{where}: {action} = {raw[action]!r}: expected a finite number")
    return Rule(match, **{action: float(raw[action])})
