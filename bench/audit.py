"""Fingerprint PyTorch's default parameter initializations and catch when they move.

``python -m bench.audit`` constructs each registered module type (and, with
``--factory pkg.module:fn``, a user's model) many times under a seeded RNG, pools
the draws of every named parameter, and records summary statistics plus the
candidate scheme the values fit best (Kolmogorov-Smirnov). ``--save FILE`` stores
the fingerprints; ``--against FILE`` recomputes them and exits 1 when any moved
beyond sampling error. See docs/audit.md.
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from bench import cli, factories
from bench.environment import environment
from bench.errors import EXIT_FAILED, EXIT_OK, UserError
from bench.files import write_atomic

FORMAT = "initbench-audit"
VERSION = 1
TARGET_VALUES = 20_000  # values per parameter the automatic draw count aims for
MAX_DRAWS = 1250  # cap on constructions per entry, for tiny parameters (a bias of 16 still gets 20k)
MAX_VALUES = 12_000_000  # cap on values held per entry, so a large user model stays tractable
KS_SAMPLE = 2000  # KS on millions of values rejects any real-world rounding; 2000 keeps p meaningful
UNKNOWN_P = 1e-6  # below this no candidate "fits"; tiny so ~100 parameters never false-alarm
SIGMAS = 5.0  # a fingerprint moved if it differs by more than this many standard errors...
REL_FLOOR = 0.01  # ...plus this fraction of the std (float noise, SE-estimate noise)
KURT_FLOOR = 0.05  # absolute floor for excess kurtosis
KURT_BATCHES = 20  # batch-means standard error: no closed form holds for every distribution...
KURT_MIN_BATCH = 50  # ...and a kurtosis of a few values is meaningless; smaller n: not compared
FACTORY = "factory"  # module column for --factory entries: the key must not depend on the spec

Builder = Callable[[], nn.Module]

# name -> [(shape label, constructor)]; shapes chosen so fan_in, fan_out and hidden differ,
# which keeps the candidate schemes distinguishable.
MODULES: dict[str, list[tuple[str, Builder]]] = {
    "Linear": [("64->32", lambda: nn.Linear(64, 32)), ("512->32", lambda: nn.Linear(512, 32)),
               ("16->256", lambda: nn.Linear(16, 256))],
    "Conv1d": [("16->32 k5", lambda: nn.Conv1d(16, 32, 5)),
               ("32->32 k3 g4", lambda: nn.Conv1d(32, 32, 3, groups=4))],
    "Conv2d": [("3->64 k7", lambda: nn.Conv2d(3, 64, 7)), ("16->32 k3", lambda: nn.Conv2d(16, 32, 3)),
               ("32->32 k3 g4", lambda: nn.Conv2d(32, 32, 3, groups=4))],
    "Conv3d": [("4->16 k3", lambda: nn.Conv3d(4, 16, 3)),
               ("8->16 k1x3x3", lambda: nn.Conv3d(8, 16, (1, 3, 3)))],
    "ConvTranspose2d": [("32->16 k4", lambda: nn.ConvTranspose2d(32, 16, 4, stride=2)),
                        ("16->24 k3", lambda: nn.ConvTranspose2d(16, 24, 3))],
    "Embedding": [("1000x32", lambda: nn.Embedding(1000, 32)), ("50x128", lambda: nn.Embedding(50, 128))],
    "LSTM": [("in32 h64", lambda: nn.LSTM(32, 64)), ("in16 h32 x2", lambda: nn.LSTM(16, 32, num_layers=2))],
    "GRU": [("in32 h64", lambda: nn.GRU(32, 64)), ("in64 h16", lambda: nn.GRU(64, 16))],
    "MultiheadAttention": [("E64 h4", lambda: nn.MultiheadAttention(64, 4)),
                           ("E32 h2 kdim16", lambda: nn.MultiheadAttention(32, 2, kdim=16, vdim=16))],
    "LayerNorm": [("64", lambda: nn.LayerNorm(64)), ("512", lambda: nn.LayerNorm(512))],
    "BatchNorm2d": [("16", lambda: nn.BatchNorm2d(16)), ("64", lambda: nn.BatchNorm2d(64))],
}


@dataclass(frozen=True)
class Scheme:
    """A candidate distribution: U(-scale, scale), N(0, scale^2) or N(0, scale^2) cut at +-2 scale."""

    name: str
    family: str  # a key of FAMILIES
    scale: Callable[[int | None, int | None, int | None], float | None]  # (fan_in, fan_out, hidden)


# family -> (scipy distribution and args for values divided by the scale, its excess kurtosis).
# A truncated normal is told from a normal by its kurtosis, not by KS: a +-2 std cut moves the CDF
# by at most 0.023, within the noise of a 2000-value KS test, but its excess kurtosis is -0.634.
TRUNC = 2.0  # the cut, in units of the untruncated std: TensorFlow's and timm's ViT init
FAMILIES: dict[str, tuple[str, tuple[float, ...], float]] = {
    "uniform": ("uniform", (-1.0, 2.0), -1.2),
    "normal": ("norm", (), 0.0),
    "trunc_normal": ("truncnorm", (-TRUNC, TRUNC), float(stats.truncnorm.stats(-TRUNC, TRUNC, moments="k"))),
}
KAIMING_A5 = "U(+-1/sqrt(fan_in)) = kaiming_uniform(a=sqrt(5))"
# Order breaks exact ties: an RNN's weight_hh has fan_in == hidden, and "hidden" is what torch does.
SCHEMES = (
    Scheme("U(+-1/sqrt(hidden))", "uniform", lambda fi, fo, h: h**-0.5 if h else None),
    Scheme(KAIMING_A5, "uniform", lambda fi, fo, h: fi**-0.5 if fi else None),
    Scheme("xavier_uniform", "uniform", lambda fi, fo, h: math.sqrt(6 / (fi + fo)) if fi and fo else None),
    Scheme("xavier_normal", "normal", lambda fi, fo, h: math.sqrt(2 / (fi + fo)) if fi and fo else None),
    Scheme("kaiming_uniform(relu)", "uniform", lambda fi, fo, h: math.sqrt(6 / fi) if fi else None),
    Scheme("kaiming_normal(relu)", "normal", lambda fi, fo, h: math.sqrt(2 / fi) if fi else None),
    Scheme("N(0,1)", "normal", lambda fi, fo, h: 1.0),
    Scheme("N(0,0.02)", "normal", lambda fi, fo, h: 0.02),
    Scheme("trunc_normal(0.02,+-2std)", "trunc_normal", lambda fi, fo, h: 0.02),
)


@dataclass(frozen=True)
class Fingerprint:
    """Statistics of one parameter pooled over many default initializations."""

    module: str
    shape: str
    parameter: str
    tensor: tuple[int, ...]
    fan_in: int | None  # for a 1-D bias: the fan_in of its layer's weight, which sets its bound
    fan_out: int | None
    n: int  # pooled values
    mean: float
    std: float
    std_fan: float | None  # std * sqrt(fan_in)
    min: float
    max: float
    absmax_fan: float | None  # max|x| * sqrt(fan_in)
    kurtosis: float | None  # excess; None for a constant
    kurtosis_se: float | None
    zeros: float  # fraction of exact zeros
    ones: float
    scheme: str
    ks: float  # KS statistic of the best candidate (the closest one when "unknown")
    ks_p: float
    fits: dict[str, float]  # candidate -> KS p-value, so a comparison can ask "does the old one still fit?"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.module, self.shape, self.parameter)


@dataclass(frozen=True)
class Change:
    """One fingerprint field that moved beyond its threshold."""

    module: str
    shape: str
    parameter: str
    field: str
    old: str
    new: str
    threshold: str


@dataclass(frozen=True)
class Baseline:
    """A loaded --save file."""

    environment: dict
    settings: dict
    fingerprints: list[Fingerprint]


def load_factory(spec: str) -> Builder:
    """Resolve 'pkg.module:fn' to a zero-argument callable returning an nn.Module."""
    fn = factories.load(spec, "--factory")
    fn_name = spec.partition(":")[2]

    def build() -> nn.Module:
        try:
            model = fn()
        except Exception as err:
            why = f"{type(err).__name__}: {err}"
            raise UserError(f"--factory {spec!r}: calling {fn_name}() failed: {why}") from err
        if not isinstance(model, nn.Module):
            raise UserError(f"--factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    return build


def select_modules(names: str | None) -> list[str]:
    """Parse a comma-separated --modules value; unknown names fail loudly."""
    if names is None:
        return list(MODULES)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    if not chosen:
        raise UserError(f"--modules is empty; choose from [{', '.join(MODULES)}]")
    for name in chosen:
        if name not in MODULES:
            raise UserError(f"unknown module {name!r}; choose from [{', '.join(MODULES)}]")
    return list(dict.fromkeys(chosen))


def _fans(model: nn.Module, name: str, param: torch.Tensor) -> tuple[int | None, int | None]:
    if param.dim() >= 2:
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(param)
        return int(fan_in), int(fan_out)
    # torch bounds a bias by its weight's fan_in (Linear, Conv): find the sibling weight.
    prefix, _, leaf = name.rpartition(".")
    sibling = ".".join(p for p in (prefix, leaf.replace("bias", "weight")) if p)
    try:
        weight = model.get_parameter(sibling)
    except AttributeError:
        return None, None
    if sibling == name or weight.dim() < 2:
        return None, None
    return int(nn.init._calculate_fan_in_and_fan_out(weight)[0]), None


def _kurtosis(x: np.ndarray) -> float | None:
    d2 = np.square(x - x.mean())  # squaring twice: float ** 4 is several times slower
    m2 = float(d2.mean())
    return float(np.mean(d2 * d2) / m2**2 - 3.0) if m2 > 0 else None


def _match(x: np.ndarray, fan_in: int | None, fan_out: int | None, hidden: int | None,
           rng: np.random.Generator, kurtosis: float | None = None,
           kurtosis_se: float | None = None) -> tuple[str, float, float, dict[str, float]]:
    """The best candidate by KS statistic among those whose family's kurtosis fits, and every p-value.

    A candidate whose family kurtosis is more than SIGMAS standard errors (plus KURT_FLOOR) from
    the measured one gets p = 0: that is what tells N(0, s^2) and its +-2 s truncation apart.
    """
    if x.min() == x.max() and x[0] in (0.0, 1.0):
        name = "zeros" if x[0] == 0.0 else "ones"
        return name, 0.0, 1.0, {name: 1.0}
    sample = x if x.size <= KS_SAMPLE else rng.choice(x, KS_SAMPLE, replace=False)
    results: dict[str, tuple[float, float]] = {}
    for scheme in SCHEMES:
        scale = scheme.scale(fan_in, fan_out, hidden)
        if scale:
            dist, args, kurt = FAMILIES[scheme.family]
            res = stats.kstest(sample / scale, dist, args=args)
            p = float(res.pvalue)
            known = kurtosis is not None and kurtosis_se is not None
            if known and abs(kurtosis - kurt) > SIGMAS * kurtosis_se + KURT_FLOOR:
                p = 0.0
            results[scheme.name] = (float(res.statistic), p)
    fitting = [k for k in results if results[k][1] >= UNKNOWN_P] or list(results)
    best = min(fitting, key=lambda k: results[k][0])  # first minimum: SCHEMES order breaks ties
    ks, p = results[best]
    return (best if p >= UNKNOWN_P else "unknown"), ks, p, {k: v[1] for k, v in results.items()}


def _summarise(module: str, shape: str, name: str, model: nn.Module, x: np.ndarray, seed: int) -> Fingerprint:
    param = model.get_parameter(name)
    if not np.isfinite(x).all():
        raise UserError(f"{module} {shape}: parameter {name!r} initializes to non-finite values")
    fan_in, fan_out = _fans(model, name, param)
    owner = model.get_submodule(name.rpartition(".")[0])
    hidden = owner.hidden_size if isinstance(owner, nn.RNNBase) else None
    enough = x.size >= KURT_BATCHES * KURT_MIN_BATCH
    batch_k = [_kurtosis(b) for b in np.array_split(x, KURT_BATCHES)] if enough else [None]
    kurt_se = None if None in batch_k else float(np.std(batch_k, ddof=1) / math.sqrt(len(batch_k)))
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    absmax = float(np.abs(x).max())
    rng = np.random.default_rng(zlib.crc32(f"{seed}:{module}:{shape}:{name}".encode()))
    kurt = _kurtosis(x)
    scheme, ks, p, fits = _match(x, fan_in, fan_out, hidden, rng, kurt, kurt_se)
    return Fingerprint(
        module=module, shape=shape, parameter=name, tensor=tuple(param.shape), fan_in=fan_in, fan_out=fan_out,
        n=int(x.size), mean=float(x.mean()), std=std, std_fan=std * math.sqrt(fan_in) if fan_in else None,
        min=float(x.min()), max=float(x.max()), absmax_fan=absmax * math.sqrt(fan_in) if fan_in else None,
        kurtosis=kurt, kurtosis_se=kurt_se, zeros=float(np.mean(x == 0.0)),
        ones=float(np.mean(x == 1.0)), scheme=scheme, ks=ks, ks_p=p, fits=fits,
    )


def fingerprint(module: str, shape: str, build: Builder, draws: int | None = None,
                seed: int = 0) -> list[Fingerprint]:
    """Construct ``build()`` ``draws`` times (automatic when None) and fingerprint every parameter.

    The seed is mixed with the module and shape so an entry's fingerprints do not depend on which
    other entries ran; the caller's global torch RNG state is left untouched.
    """
    pooled: dict[str, list[torch.Tensor]] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}:{module}:{shape}".encode()))
        model = build()
        params = [(n, p) for n, p in model.named_parameters() if p.numel() > 0]
        if not params:
            return []
        if draws is None:
            smallest, total = min(p.numel() for _, p in params), sum(p.numel() for _, p in params)
            draws = max(1, min(math.ceil(TARGET_VALUES / smallest), MAX_DRAWS, MAX_VALUES // total))
        for i in range(draws):
            current = model if i == 0 else build()
            for name, p in current.named_parameters():
                pooled.setdefault(name, []).append(p.detach().flatten().cpu())
    return [
        _summarise(module, shape, name, model, torch.cat(pooled[name]).double().numpy(), seed)
        for name, _ in params
    ]


def audit(modules: Sequence[str], factory: str | None = None, draws: int | None = None,
          seed: int = 0) -> list[Fingerprint]:
    """Fingerprint every shape of the named built-in modules, then the --factory model if given."""
    out = [fp for name in modules for shape, build in MODULES[name]
           for fp in fingerprint(name, shape, build, draws, seed)]
    if factory is not None:
        build = load_factory(factory)
        with torch.random.fork_rng(devices=[]):  # this probe build must not shift the caller's RNG
            label = type(build()).__name__
        out += fingerprint(FACTORY, label, build, draws, seed)
    return out


def compare(old: Sequence[Fingerprint], new: Sequence[Fingerprint]) -> list[Change]:
    """Every field of every entry that moved beyond sampling error; missing/extra entries too."""
    before, after = {fp.key: fp for fp in old}, {fp.key: fp for fp in new}
    changes = [Change(*k, "entry", "present", "missing", "-") for k in before if k not in after]
    changes += [Change(*k, "entry", "missing", "present", "-") for k in after if k not in before]
    for key in (k for k in before if k in after):
        a, b = before[key], after[key]
        for field in ("tensor", "fan_in", "fan_out"):
            if getattr(a, field) != getattr(b, field):
                changes.append(Change(*key, field, str(getattr(a, field)), str(getattr(b, field)), "exact"))
        # A near-tie between two candidates may flip the winner; only a rejected old scheme is a change.
        if a.scheme != b.scheme and (a.scheme == "unknown" or b.fits.get(a.scheme, 0.0) < UNKNOWN_P):
            changes.append(Change(*key, "scheme", a.scheme, b.scheme, f"p(old)<{UNKNOWN_P:g}"))
        floor = REL_FLOOR * max(a.std, b.std) + 1e-12
        se_mean = math.sqrt(a.std**2 / a.n + b.std**2 / b.n)
        # SE of a sample std: sigma * sqrt((excess kurtosis + 2) / 4n), for iid values.
        se_std = math.hypot(*(fp.std * math.sqrt(((fp.kurtosis or 0.0) + 2) / (4 * fp.n)) for fp in (a, b)))
        for field, se in (("mean", se_mean), ("std", se_std)):
            limit, was, now = SIGMAS * se + floor, getattr(a, field), getattr(b, field)
            if abs(was - now) > limit:
                changes.append(Change(*key, field, f"{was:.6g}", f"{now:.6g}", f"{limit:.3g}"))
        # A constant (kurtosis None) turning random is already a std change.
        if None not in (a.kurtosis, b.kurtosis, a.kurtosis_se, b.kurtosis_se):
            limit = SIGMAS * math.hypot(a.kurtosis_se, b.kurtosis_se) + KURT_FLOOR
            if abs(a.kurtosis - b.kurtosis) > limit:
                changes.append(Change(*key, "kurtosis", f"{a.kurtosis:.4g}", f"{b.kurtosis:.4g}",
                                      f"{limit:.3g}"))
    return changes


def save(path: Path, fps: Sequence[Fingerprint], settings: dict) -> None:
    """Write fingerprints atomically (bench.files.write_atomic), with the environment that drew them."""
    doc = {"format": FORMAT, "version": VERSION, "environment": environment(), "settings": settings,
           "fingerprints": [asdict(fp) for fp in fps]}
    write_atomic(path, json.dumps(doc, indent=1, allow_nan=False))


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Fingerprint field -> validity check for a loaded value, so a hand-edited file fails here, not mid-compare.
_KINDS: dict[str, Callable[[object], bool]] = {
    **{f.name: _num for f in fields(Fingerprint)},
    **{k: (lambda v: v is None or _num(v)) for k in ("fan_in", "fan_out", "std_fan", "absmax_fan",
                                                      "kurtosis", "kurtosis_se")},
    **{k: (lambda v: isinstance(v, str)) for k in ("module", "shape", "parameter", "scheme")},
    "tensor": lambda v: isinstance(v, list) and all(isinstance(d, int) for d in v),
    "fits": lambda v: isinstance(v, dict) and all(_num(p) for p in v.values()),
}


def load(path: Path) -> Baseline:
    """Read a --save file; anything unreadable, corrupt or foreign is a UserError naming the file."""
    try:
        doc = json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path} is not an initbench audit file (expected format {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise UserError(f"{path} has audit format version {doc.get('version')!r}; "
                        f"this initbench reads version {VERSION}")
    entries = doc.get("fingerprints")
    if not isinstance(entries, list):
        raise UserError(f"{path}: 'fingerprints' must be a list")
    fps = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != set(_KINDS):
            raise UserError(f"{path}: fingerprint #{i} is malformed (expected keys {sorted(_KINDS)})")
        bad = [k for k, ok in _KINDS.items() if not ok(entry[k])]
        if bad:
            raise UserError(f"{path}: fingerprint #{i} has bad values for {', '.join(bad)}")
        fps.append(Fingerprint(**{**entry, "tensor": tuple(entry["tensor"])}))
    return Baseline(dict(doc.get("environment") or {}), dict(doc.get("settings") or {}), fps)


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(fps: Sequence[Fingerprint]) -> str:
    """An aligned text table of fingerprints, one row per parameter."""
    cols = ["module", "shape", "parameter", "tensor", "fan_in", "fan_out", "n", "mean", "std", "std_fan",
            "min", "max", "absmax_fan", "kurtosis", "zeros", "ones", "scheme", "ks", "ks_p"]
    rows = [[_cell(getattr(fp, c)) for c in cols] for fp in fps]
    out = pd.DataFrame(rows, columns=cols).to_string(index=False)
    if any(fp.module.startswith("ConvTranspose") for fp in fps):
        out += ("\nnote: fan_in and fan_out are PyTorch's (nn.init._calculate_fan_in_and_fan_out). For a "
                "ConvTranspose weight (in_channels, out_channels, *kernel) that convention's fan_in is "
                "out_channels x kernel size and its fan_out in_channels x kernel size: the reverse of the "
                "inputs each output of the layer reads. Kaiming and the default init scale by this fan_in.")
    return out


def _main(argv: Sequence[str] | None) -> int:
    parser = cli.Parser(prog=cli.prog("python -m bench.audit"), description=__doc__.splitlines()[0])
    parser.add_argument("--modules", help=f"comma-separated subset of: {', '.join(MODULES)} (default: all)")
    parser.add_argument("--factory", help="pkg.module:fn returning an nn.Module; audits its parameters")
    parser.add_argument("--draws", type=int, help="constructions per entry (default: ~20k values/parameter)")
    parser.add_argument("--seed", type=int, default=0)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--save", type=Path, metavar="FILE.json", help="write fingerprints to this file")
    group.add_argument("--against", type=Path, metavar="FILE.json", help="exit 1 if fingerprints moved")
    args = parser.parse_args(argv)
    if args.draws is not None and args.draws < 1:
        raise UserError(f"--draws must be at least 1, got {args.draws}")
    baseline = load(args.against) if args.against else None  # fail fast, before the slow part
    modules = select_modules(args.modules) if args.modules or not args.factory else []
    fps = audit(modules, args.factory, args.draws, args.seed)
    if args.save:
        settings = {"modules": modules, "factory": args.factory, "draws": args.draws, "seed": args.seed}
        save(args.save, fps, settings)
        print(f"audit: saved {len(fps)} fingerprints to {args.save}")
        return EXIT_OK
    if baseline is None:
        print(table(fps))
        return EXIT_OK
    # Compare only what this run selected, so `--modules Linear --against full.json` works.
    selected = set(modules) | ({FACTORY} if args.factory else set())
    changes = compare([fp for fp in baseline.fingerprints if fp.module in selected], fps)
    env, settings = baseline.environment, baseline.settings
    torch_before = env.get("torch_version") or env.get("torch")  # files before bench.environment: "torch"
    print(f"audit: baseline torch {torch_before}, seed {settings.get('seed')}; "
          f"this run torch {torch.__version__}, seed {args.seed}")
    if not changes:
        print(f"audit: {len(fps)} fingerprints match {args.against}")
        return EXIT_OK
    print(pd.DataFrame([asdict(c) for c in changes]).to_string(index=False))
    moved = len({(c.module, c.shape, c.parameter) for c in changes})
    print(f"audit: {len(changes)} changes in {moved} parameters against {args.against}")
    return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m bench.audit``."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
