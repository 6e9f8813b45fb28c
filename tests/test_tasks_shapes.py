"""Data of any shape: what tasks.load keeps, what it refuses (with what message), and the losses on it."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from bench import spec
from bench.errors import UserError
from bench.train import bundle, markov, names, tasks
from bench.train import stacked as engine

torch.set_num_threads(1)

FACTORY = '''
import torch

def images(seed, n_train=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + 16, 3, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean(dim=(1, 2)) > 0).long()
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]
'''


def params(name: str, **given) -> tuple:
    return tuple(sorted(names.resolve_task_params(name, given).items()))


def split(x: torch.Tensor, y: torch.Tensor, n_val: int = 4) -> tuple:
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


def test_a_user_factory_of_images_loads_with_its_shape(tmp_path, monkeypatch):
    (tmp_path / "shapes_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tasks.load("shapes_factory:images", (), 0)
    assert data.x_train.shape == (48, 3, 8, 8) and data.x_val.shape == (16, 3, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.in_shape == (3, 8, 8) and data.d_in == 192
    assert data.classes == data.out_dim == data.d_out == 4 and not data.per_token
    assert data.loss_floor is None


def test_the_mlp_engine_trains_on_images_as_it_does_on_their_rows():
    # The engine flattens each sample itself: digits as (1, 8, 8) images train to the same numbers.
    text = ('name = "t"\n[grid]\nseed = [0, 1]\n[model]\nwidth = 8\ndepth = 2\n[task]\nname = "digits"\n{}'
            '[train]\nsteps = 5\nbatch_size = 32\nlog_every = 5\n')
    rows = engine.train(spec.parse(text.format(""), "<rows>").jobs())
    images = engine.train(spec.parse(text.format("images = true\n"), "<images>").jobs())
    np.testing.assert_array_equal(rows.losses, images.losses)
    np.testing.assert_array_equal(rows.val_loss, images.val_loss)
    assert rows.dims == images.dims == [64, 8, 10]


@pytest.mark.parametrize(("x_dtype", "kept"), [(torch.int32, torch.int64), (torch.int64, torch.int64),
                                                (torch.uint8, torch.int64), (torch.float64, torch.float32),
                                                (torch.bool, torch.float32)])
def test_integer_inputs_stay_integer_and_the_rest_become_float32(x_dtype, kept):
    x = torch.arange(20 * 5).view(20, 5) % 2
    data = tasks._check("t", split(x.to(x_dtype), torch.arange(20) % 3))
    assert data.x_train.dtype == data.x_val.dtype == kept
    assert torch.equal(data.x_train, x[4:].to(kept))


def test_float_targets_are_regression_and_a_vector_is_one_output():
    x = torch.randn(20, 3)
    one = tasks._check("t", split(x, torch.randn(20, dtype=torch.float64)))
    assert one.y_train.shape == (16, 1) and one.y_train.dtype == torch.float32
    assert one.classes is None and one.out_dim == one.d_out == 1 and one.in_shape == (3,)
    wide = tasks._check("t", split(x, torch.randn(20, 5)))
    assert wide.y_train.shape == (16, 5) and wide.out_dim == 5


def test_per_token_targets_count_classes_over_both_splits():
    x = torch.randint(0, 7, (20, 6))
    y = x.roll(-1, dims=1)
    y[0, 0] = 9  # a token only the validation split holds still is a class
    data = tasks._check("t", split(x, y))
    assert data.y_train.shape == (16, 6) and data.y_train.dtype == torch.int64
    assert data.classes == data.out_dim == 10 and data.per_token and data.in_shape == (6,)
    declared = tasks._check("t", (*split(x, y), {"classes": 32, "loss_floor": 0.5}))
    assert declared.classes == 32 and declared.loss_floor == 0.5


def test_null_loss_of_token_targets_is_the_entropy_of_their_frequencies():
    # Train tokens 0, 0, 0, 1 / 1, 2, 2, 2 -> frequencies (3, 2, 3) / 8; validation's 5s are not counted.
    y = torch.tensor([[5, 5, 5, 5], [0, 0, 0, 1], [1, 2, 2, 2]])
    data = tasks._check("t", split(torch.zeros(3, 4, dtype=torch.int64), y, n_val=1))
    p = torch.tensor([3, 2, 3], dtype=torch.float64) / 8
    assert data.classes == 6 and data.null_loss == pytest.approx(float(-(p * p.log()).sum()), rel=1e-12)
    # It is the cross-entropy of predicting those frequencies at every position.
    logits = torch.log(torch.cat([p, torch.full((3,), 1e-300, dtype=torch.float64)]))
    ce = F.cross_entropy(logits.expand(8, 6), data.y_train.flatten())
    assert data.null_loss == pytest.approx(float(ce), rel=1e-9)


def test_markov_loads_through_tasks_with_its_vocabulary_and_loss_floor():
    assert names.resolve_task_params("markov", {}) == markov.DEFAULTS
    data = tasks.load("markov", params("markov", seq_len=12, n_train=32, n_val=8), 3)
    assert data.x_train.shape == data.y_train.shape == (32, 12) and data.x_val.shape == (8, 12)
    assert data.x_train.dtype == data.y_train.dtype == torch.int64
    assert torch.equal(data.x_train[:, 1:], data.y_train[:, :-1])
    chain = markov.chain(vocab=16, order=1, chain_seed=0, concentration=0.3)
    assert data.classes == 16 and data.per_token and data.in_shape == (12,)
    # The stationary law is a least-squares solve: equal to the last bits only up to rounding.
    assert data.loss_floor == pytest.approx(chain.loss_floor(12), rel=1e-12)
    assert chain.loss_floor(12) == pytest.approx(chain.entropy_rate(), rel=1e-12)
    two = tasks.load("markov", params("markov", order=2, seq_len=12, n_train=32, n_val=8), 3)
    chain2 = markov.chain(vocab=16, order=2, chain_seed=0, concentration=0.3)
    assert two.loss_floor == pytest.approx(chain2.loss_floor(12), rel=1e-12)
    assert two.loss_floor > chain2.entropy_rate()  # position 0 sees one token of the two
    assert tasks.load("teacher", params("teacher"), 0).loss_floor is None


@pytest.mark.parametrize(("given", "message"), [
    ({"order": 3}, "[task] order = 3 for task 'markov': choose from [1, 2]"),
    ({"seq_len": 1, "order": 2}, "[task] seq_len = 1 for task 'markov' must be >= order = 2"),
])
def test_markov_settings_are_checked_when_the_spec_is_read(given, message):
    with pytest.raises(UserError, match=re.escape(message)):
        names.resolve_task_params("markov", given)
    text = 'name = "t"\n[task]\nname = "markov"\n' + "".join(f"{k} = {v}\n" for k, v in given.items())
    with pytest.raises(UserError, match=re.escape(message)):
        spec.parse(text, "<t>")


def test_the_mlp_refuses_per_token_targets_with_a_clear_error():
    jobs = spec.parse('name = "t"\n[model]\nwidth = 8\ndepth = 2\n[task]\nname = "markov"\nn_train = 32\n'
                      'n_val = 8\n[train]\nsteps = 2\nbatch_size = 8\n', "<t>").jobs()
    with pytest.raises(tasks.TaskError, match=re.escape("task 'markov' has per-token targets (32,): "
                                                        "arch 'mlp' predicts one output per sample")):
        engine.train(jobs)


def _old_digits(n_val: int = 297, split_seed: int = 0) -> tuple:
    """tasks.digits before images existed, verbatim: today's default output must not move a bit."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32)
    y = torch.as_tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    val, train = order[:n_val], order[n_val:]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return x[train], y[train], x[val], y[val]


def test_digits_as_images_are_the_flat_digits_reshaped():
    flat = tasks.load("digits", params("digits"), 0)
    for mine, old in zip((flat.x_train, flat.y_train, flat.x_val, flat.y_val), _old_digits()):
        assert torch.equal(mine, old)
    assert flat.in_shape == (64,)
    images = tasks.load("digits", params("digits", images=True), 0)
    assert images.x_train.shape == (1500, 1, 8, 8) and images.in_shape == (1, 8, 8) and images.d_in == 64
    assert torch.equal(images.x_train.flatten(1), flat.x_train)
    assert torch.equal(images.x_val.flatten(1), flat.x_val)
    assert torch.equal(images.y_train, flat.y_train) and images.classes == flat.classes == 10


def test_the_images_setting_keeps_todays_job_ids():
    # images = false is the default: left out of the settings, so digits' job ids are unchanged.
    assert params("digits", images=False) == params("digits") == (("n_val", 297), ("split_seed", 0))
    assert ("images", True) in params("digits", images=True)
    with pytest.raises(UserError, match=re.escape("[task] images = 1: expected true or false")):
        names.resolve_task_params("digits", {"images": 1})


X, Y = torch.randn(20, 3), torch.arange(20) % 3
TOKENS = torch.randint(0, 5, (20, 6))


@pytest.mark.parametrize(("out", "message"), [
    ((X, Y[:10], X[:4], Y[:4]), "task 't': x and y lengths differ or a split is empty (20/10 train, 4/4"),
    ((X, Y, X[:0], Y[:0]), "task 't': x and y lengths differ or a split is empty (20/20 train, 0/0 val)"),
    ((X, Y, X[:4].long(), Y[:4]), "task 't': x_train is torch.float32 but x_val is torch.int64: both"),
    ((X.to(torch.complex64), Y, X[:4], Y[:4]), "task 't': inputs must be real numbers or integers, not "),
    ((X, Y.float(), X[:4], Y[:4]), "task 't': y_train is torch.float32 but y_val is torch.int64: both"),
    ((X.index_fill(0, torch.tensor([3]), float("nan")), Y, X[:4], Y[:4]),
     "task 't': inputs contain NaN or inf"),
    ((X, Y.float().index_fill(0, torch.tensor([2]), float("inf")), X[:4], Y[:4].float()),
     "task 't': targets contain NaN or inf"),
    ((X, Y - 1, X[:4], Y[:4]), "task 't': class labels must be >= 0 (found -1)"),
    ((X, Y, X[:4, :2], Y[:4]), "task 't': x_val samples have shape (2,) but x_train samples (3,)"),
    ((TOKENS, TOKENS, TOKENS[:4, :5], TOKENS[:4, :5]), "task 't': x_val samples have shape (5,) but x_train"),
    ((X, TOKENS, X[:4], TOKENS[:4, :5]), "task 't': y_val samples have shape (5,) but y_train samples (6,)"),
    ((X, Y.view(20, 1, 1), X[:4], Y[:4].view(4, 1, 1)),
     "task 't': class targets must be (N,) indices or per-token (N, T), got y_train of shape (20, 1, 1)"),
    ((X, torch.randn(20, 2, 2), X[:4], torch.randn(4, 2, 2)),
     "task 't': float (regression) targets must be (N,) or (N, d), got y_train of shape (20, 2, 2)"),
    ((X, Y, X[:4], Y[:4], {"classes": 2}), "task 't' declares classes = 2: expected an integer >= 3"),
    ((X, Y, X[:4], Y[:4], {"vocab": 2}), "task 't' declares unknown keys ['vocab']"),
    ((X, Y.float(), X[:4], Y[:4].float(), {"classes": 3}), "task 't' declares classes = 3 but its targets"),
    ((X, Y, X[:4], Y[:4], {"loss_floor": -1.0}), "task 't' declares loss_floor = -1.0: expected a finite"),
    ((X, Y, X[:4]), "task 't' must return 4 tensors (x_train, y_train, x_val, y_val)"),
])
def test_unusable_data_is_a_task_error_that_says_what_is_wrong(out, message):
    with pytest.raises(tasks.TaskError, match=re.escape(message)):
        tasks._check("t", out)


def _old_loss_per_job(out, y, classes):
    """bundle.loss_per_job before per-token targets, verbatim."""
    if classes is None:
        return ((out - y) ** 2).mean(dim=(1, 2))
    k, b, c = out.shape
    return F.cross_entropy(out.reshape(k * b, c), y.reshape(k * b), reduction="none").view(k, b).mean(1)


def test_loss_per_job_keeps_todays_numbers_for_one_label_and_regression():
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(3, 8, 5, generator=g), torch.randint(0, 5, (3, 8), generator=g)
    assert torch.equal(bundle.loss_per_job(out, y, 5), _old_loss_per_job(out, y, 5))
    target = torch.randn(3, 8, 5, generator=g)
    assert torch.equal(bundle.loss_per_job(out, target, None), _old_loss_per_job(out, target, None))


def test_loss_per_job_averages_cross_entropy_over_tokens_per_job():
    g = torch.Generator().manual_seed(1)
    out, y = torch.randn(3, 4, 7, 5, generator=g), torch.randint(0, 5, (3, 4, 7), generator=g)
    got = bundle.loss_per_job(out, y, 5)
    want = torch.stack([F.cross_entropy(out[k].reshape(-1, 5), y[k].reshape(-1)) for k in range(3)])
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_loss_per_job_regression_means_over_all_trailing_dims():
    g = torch.Generator().manual_seed(2)
    out, y = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    want = torch.stack([F.mse_loss(out[k], y[k]) for k in range(2)])
    torch.testing.assert_close(bundle.loss_per_job(out, y, None), want, rtol=1e-6, atol=0)


def test_markov_floor_is_below_its_null_loss():
    data = tasks.load("markov", params("markov", n_train=256, n_val=16), 0)
    assert data.loss_floor < 0.8 * data.null_loss < 0.8 * math.log(16)


def test_a_task_error_reaches_a_users_factory_by_name(tmp_path, monkeypatch):
    (tmp_path / "bad_shapes_factory.py").write_text(
        "import torch\n\ndef load(seed):\n    x = torch.randn(8, 3, 8, 8)\n"
        "    return x, torch.zeros(8, dtype=torch.long), x[:2, :, :4], torch.zeros(2, dtype=torch.long)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(tasks.TaskError, match=re.escape("task 'bad_shapes_factory:load': x_val samples have "
                                                        "shape (3, 4, 8) but x_train samples (3, 8, 8)")):
        tasks.load("bad_shapes_factory:load", (), 0)

