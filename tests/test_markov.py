"""The markov task: shapes, what the seeds fix, and the entropy rate against a long sample."""

from __future__ import annotations

import math
import re

import pytest
import torch

from bench.errors import UserError
from bench.train import markov as M

torch.set_num_threads(1)


def load(seed: int = 0, **kw):
    return M.markov(seed, **{**M.DEFAULTS, "n_train": 64, "n_val": 16, **kw})


@pytest.mark.parametrize("order", [1, 2])
def test_shapes_and_targets_are_the_next_tokens(order):
    x, y, xv, yv = load(order=order, seq_len=20, vocab=8)
    assert x.shape == y.shape == (64, 20) and xv.shape == yv.shape == (16, 20)
    assert x.dtype == y.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < 8
    torch.testing.assert_close(x[:, 1:], y[:, :-1])


def test_the_chain_is_fixed_by_chain_seed_and_the_sample_by_the_job_seed():
    a = M.chain(vocab=8, order=2, chain_seed=3, concentration=0.3)
    b = M.chain(vocab=8, order=2, chain_seed=3, concentration=0.3)
    c = M.chain(vocab=8, order=2, chain_seed=4, concentration=0.3)
    torch.testing.assert_close(a.probs, b.probs)
    assert not torch.allclose(a.probs, c.probs)
    torch.testing.assert_close(a.probs.sum(1), torch.ones(64, dtype=torch.float64))
    x0, x0_again, x1 = load(0)[0], load(0)[0], load(1)[0]
    assert torch.equal(x0, x0_again) and not torch.equal(x0, x1)


@pytest.mark.parametrize("order", [1, 2])
def test_stationary_distribution_is_stationary(order):
    c = M.chain(vocab=6, order=order, chain_seed=0, concentration=0.5)
    pi = c.stationary()
    v, n = c.vocab, c.vocab ** order
    # Mass flowing into context (a_2..a_k, b): sum over a_1 of pi(a_1..a_k) p(b | a_1..a_k).
    flow = torch.zeros(n, dtype=torch.float64)
    for ctx in range(n):
        for b in range(v):
            flow[(ctx * v) % n + b] += pi[ctx] * c.probs[ctx, b]
    torch.testing.assert_close(flow, pi)


@pytest.mark.parametrize("order", [1, 2])
def test_entropy_rate_matches_the_true_models_cross_entropy_on_a_long_sample(order):
    c = M.chain(vocab=16, order=order, chain_seed=0, concentration=0.3)
    runs = c.sample(100, 1000, torch.Generator().manual_seed(7))
    # The true model's loss at each position that sees a full context: -log p(next | last k).
    ctx = torch.stack([c.context(runs[:, : t + 1]) for t in range(order - 1, runs.shape[1] - 1)], dim=1)
    cross_entropy = float(-c.probs[ctx, runs[:, order:]].log().mean())
    rate = c.entropy_rate()
    assert abs(cross_entropy - rate) < 0.01 * rate  # measured: 1.9704 vs 1.9693 (order 1)
    # The floor is clearly below log(vocab) and below the context-free model's loss.
    assert rate < 0.8 * math.log(16) and rate < 0.8 * M.null_entropy(c)


def test_loss_floor_counts_the_short_first_context():
    one = M.chain(vocab=16, order=1, chain_seed=0, concentration=0.3)
    two = M.chain(vocab=16, order=2, chain_seed=0, concentration=0.3)
    assert one.loss_floor(32) == pytest.approx(one.entropy_rate())
    rate = two.entropy_rate()
    assert rate < two.loss_floor(32) < rate + (math.log(16) - rate) / 32


@pytest.mark.parametrize(("kw", "message"), [
    ({"order": 3}, "[task] order = 3 for task 'markov': choose from [1, 2]"),
    ({"vocab": 1}, "[task] vocab = 1 for task 'markov'"),
    ({"concentration": 0.0}, "[task] concentration = 0.0 for task 'markov': must be > 0"),
    ({"seq_len": 1, "order": 2}, "[task] seq_len = 1 for task 'markov' must be >= order = 2"),
])
def test_bad_settings_are_user_errors(kw, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load(**kw)


def test_a_tiny_gpt_learns_the_chain_down_to_near_its_floor():
    # End to end with the built-in transformer: 150 Adam steps on one CPU thread (~1 s).
    from torch.nn import functional as F

    from bench.train import architectures, residual_inits

    settings = {"vocab": 8, "order": 1, "seq_len": 16, "chain_seed": 0, "concentration": 0.3}
    x, y, xv, yv = M.markov(0, n_train=512, n_val=128, **settings)
    c = M.chain(vocab=8, order=1, chain_seed=0, concentration=0.3)
    torch.manual_seed(0)
    model = architectures.transformer((16,), 8, depth=1, width=32)
    residual_inits.gpt2_(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        i = torch.randint(0, 512, (64,), generator=g)
        loss = F.cross_entropy(model(x[i]).flatten(0, 1), y[i].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        val = float(F.cross_entropy(model(xv).flatten(0, 1), yv.flatten()))
    floor, null = c.loss_floor(16), M.null_entropy(c)
    assert floor - 0.05 < val < floor + 0.25 * (null - floor)  # measured 1.485; floor 1.424, null 2.015


def test_markov_is_a_task_with_its_vocabulary_and_floor():
    from bench.train import tasks

    params = tuple(sorted({**M.DEFAULTS, "n_train": 64, "n_val": 16, "seq_len": 8}.items()))
    data = tasks.load("markov", params, 0)
    x, y, _, _ = load(seq_len=8)
    assert torch.equal(data.x_train, x) and torch.equal(data.y_train, y)
    assert data.x_train.dtype == torch.int64 and data.y_train.shape == (64, 8) and data.per_token
    c = M.chain(vocab=16, order=1, chain_seed=0, concentration=0.3)
    assert data.classes == 16 and data.loss_floor == pytest.approx(c.loss_floor(8), rel=1e-12)
