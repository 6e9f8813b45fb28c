"""The columns of the results tables, in one torch-free place.

The engine fills arrays along these axes, the store writes and reads tables with
these columns, and readers (``bench.load``, the report) can import them without
paying for a PyTorch import.
"""

KINDS = ("weight", "bias", "act", "preact")  # what each layer's probe describes
STATS = ("mean", "std", "absmax", "norm", "grad_norm", "update_ratio", "dead_frac")
STATUSES = ("ok", "diverged", "failed")
CURVE_COLUMNS = ("step", "train_loss", "val_loss", "val_acc", "grad_norm")
# q: second moment (mean^2 + std^2) of activations; q_pred: mean-field theory's prediction (step 0)
LAYER_COLUMNS = ("step", "layer", "param", *STATS, "q", "q_pred")
