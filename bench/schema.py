"""The columns of the results tables, in one torch-free place.

The engine fills arrays along these axes, the store writes and reads tables with
these columns, and readers (``bench.load``, the report) can import them without
paying for a PyTorch import.
"""

KINDS = ("weight", "bias", "act", "preact")  # what each layer's probe describes
# distinct_frac: share of a hidden layer's units that are not copies of another (weight rows; step 0, last)
STATS = ("mean", "std", "absmax", "norm", "grad_norm", "update_ratio", "dead_frac", "distinct_frac")
STATUSES = ("ok", "diverged", "failed")
CURVE_COLUMNS = ("step", "train_loss", "val_loss", "val_acc", "grad_norm")
# q: second moment (mean^2 + std^2) of activations; q_pred: mean-field theory's prediction (step 0)
# layer: the module's dotted name (``named_modules()``); index: its position in the forward pass
LAYER_COLUMNS = ("step", "layer", "index", "param", *STATS, "q", "q_pred")
# The module catalog (``bench.load(DIR).modules``): every parameter-holding or probed module of a job.
# shapes: "weight=64x16;bias=64" (each own parameter's shape); fans: PyTorch's (NaN without a >= 2-D weight)
MODULE_COLUMNS = ("name", "type", "index", "shapes", "fan_in", "fan_out")
SIGNALS = ("act", "preact", "output")  # params that describe a module's output, not a parameter


def axis_column(axis: str) -> str:
    """The runs-table column of a grid axis: the one name every reader of results uses.

    A scheme parameter's axis ``init_params.<scheme>.<param>`` is the column ``init.<param>`` (a job
    has one scheme, so its parameters need no scheme in their name); every other axis (``depth``,
    ``lr``, ``task.<param>``) is its own column.
    """
    parts = axis.split(".")
    if parts[0] == "init_params" and len(parts) == 3:
        return f"init.{parts[2]}"
    return axis


# Settings added after job ids were first published: at these defaults they are left out of job
# ids and baseline cell keys (bench.spec.Job.job_id, bench.baseline.cell_key), so every id and
# baseline made before them stays valid.
UNHASHED_DEFAULTS = {"rules": "none"}
# The same for a scheme's parameter added after that scheme's sweeps were stored, keyed by (scheme,
# setting): the He-drawing residual schemes' gain ("activation": the model's) came after them.
UNHASHED_SCHEME_DEFAULTS = {(scheme, "init.gain"): "activation"
                            for scheme in ("zero_residual", "fixup", "skipinit", "rezero")}


def hashed(settings: dict) -> dict:
    """``settings`` without the ones at an :data:`UNHASHED_DEFAULTS` (or, for its scheme,
    :data:`UNHASHED_SCHEME_DEFAULTS`) value: what ids are made of."""
    scheme = settings.get("init")

    def kept(key: str, value) -> bool:
        default = UNHASHED_SCHEME_DEFAULTS.get((scheme, key), UNHASHED_DEFAULTS.get(key, _NONE))
        return default is _NONE or value != default

    return {k: v for k, v in settings.items() if kept(k, v)}


_NONE = object()  # no unhashed default for a setting


# The residual convention (bench.train.architectures): a residual block is a module named
# ``blocks.<i>``, at the top level or nested (``encoder.blocks.3``); its output is the residual
# stream after block i. Engines probe it, the report groups modules by it: one pattern for both.
BLOCK = r"(?:.*\.)?blocks\.(\d+)"
