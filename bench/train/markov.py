"""``markov``: next-token prediction on sequences from a fixed random Markov chain.

The chain (its transition rows) is the task's identity, drawn from ``chain_seed``; the job
seed draws the sample. Each row is Dirichlet(concentration) over the vocabulary: with
concentration < 1 the rows are peaked, so the loss floor (the chain's entropy rate) sits
well below log(vocab), and a model that learns the chain is told apart from one that
learns only token frequencies.

``bench.train.tasks.TASKS["markov"]`` serves it: x and y (N, T) int64, the vocabulary and
the loss floor (:meth:`Chain.loss_floor`) declared, so ``TaskData.classes`` is ``vocab`` and
``TaskData.loss_floor`` the floor. Its settings, their defaults and their check are declared
without torch in :mod:`bench.train.names` (the spec reads them there); this module knows the
chain, not the registry (which imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bench.train import names
from bench.train.seeds import derive_seed

DEFAULTS = names.TASKS["markov"].params  # declared (with their check) where a spec reads them, without torch


@dataclass(frozen=True)
class Chain:
    """An order-k chain: ``probs[c]`` is the next-token distribution after context c.

    Context c encodes the last k tokens a_1..a_k (oldest first) as sum a_i V^(k-i).
    """

    vocab: int
    order: int
    probs: torch.Tensor  # (V^k, V), float64, rows sum to 1

    def context(self, tokens: torch.Tensor) -> torch.Tensor:
        """Context index of the last ``order`` tokens of each row of ``tokens`` (N, >= order)."""
        c = torch.zeros(len(tokens), dtype=torch.int64)
        for j in range(self.order):
            c = c * self.vocab + tokens[:, -self.order + j]
        return c

    def stationary(self) -> torch.Tensor:
        """The stationary distribution over contexts (V^k,): the chain on k-tuples, solved exactly.

        The k-tuple chain moves (a_1..a_k) -> (a_2..a_k, b) with probability probs[c, b]; its
        stationary pi solves pi T = pi, sum pi = 1 (least squares on the stacked system;
        Dirichlet rows are strictly positive, so the chain is irreducible and pi unique).
        """
        n, v = self.vocab ** self.order, self.vocab
        move = torch.zeros(n, n, dtype=torch.float64)
        nxt = (torch.arange(n)[:, None] * v) % n + torch.arange(v)[None, :]  # (n, V) next contexts
        move.scatter_add_(1, nxt, self.probs)
        system = torch.cat([move.T - torch.eye(n, dtype=move.dtype), move.new_ones(1, n)])
        rhs = torch.cat([move.new_zeros(n), move.new_ones(1)])
        pi = torch.linalg.lstsq(system, rhs[:, None]).solution[:, 0]
        return pi.clamp_min(0) / pi.clamp_min(0).sum()

    def entropy_rate(self) -> float:
        """H = sum_c pi(c) H(probs[c]) in nats/token: the best achievable loss once k tokens are seen."""
        p = self.probs
        row_entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
        return float((self.stationary() * row_entropy).sum())

    def loss_floor(self, seq_len: int) -> float:
        """The exact minimum mean cross-entropy over a sample's ``seq_len`` positions.

        Position t predicts token t+1 from tokens 0..t. Sequences start in the stationary
        distribution, so positions t >= order - 1 cost the entropy rate; for order 2,
        position 0 sees one token only and costs H(s_1 | s_0) under the stationary pair law.
        """
        rate = self.entropy_rate()
        if self.order == 1:
            return rate
        joint = self.stationary().view(self.vocab, self.vocab)  # pi(s_0, s_1)
        first = joint.sum(1, keepdim=True)
        cond = joint / first
        h0 = float(-(joint * torch.where(cond > 0, cond.log(), torch.zeros_like(cond))).sum())
        return (h0 + (seq_len - 1) * rate) / seq_len

    def sample(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` stationary sequences of ``length`` tokens (int64), drawn with ``generator``."""
        start = torch.multinomial(self.stationary().float(), n, replacement=True, generator=generator)
        first = [(start // self.vocab ** (self.order - 1 - j)) % self.vocab for j in range(self.order)]
        tokens = torch.stack(first, dim=1)
        steps = [tokens]
        probs = self.probs.float()
        for _ in range(length - self.order):
            nxt = torch.multinomial(probs[self.context(tokens)], 1, generator=generator)
            tokens = torch.cat([tokens[:, 1:], nxt], dim=1) if self.order > 1 else nxt
            steps.append(nxt)
        return torch.cat(steps, dim=1)[:, :length]


def chain(*, vocab: int, order: int, chain_seed: int, concentration: float) -> Chain:
    """The task's fixed chain: every context's row ~ Dirichlet(concentration * 1_V), from ``chain_seed``.

    The settings are taken as checked (:func:`check`).
    """
    rng = np.random.default_rng(chain_seed)
    rows = rng.dirichlet(np.full(vocab, float(concentration)), size=vocab ** order)
    # Dirichlet draws with small concentration can underflow to exact zeros; a floor keeps
    # every transition possible (irreducible chain, finite log-likelihood) without moving H.
    rows = np.maximum(rows, 1e-12)
    rows /= rows.sum(1, keepdims=True)
    return Chain(vocab, order, torch.from_numpy(rows))


def markov(seed: int, *, vocab: int, order: int, seq_len: int, chain_seed: int, n_train: int, n_val: int,
           concentration: float = 0.3) -> tuple:
    """(x_train, y_train, x_val, y_val): x (N, T) int64 tokens, y (N, T) the next tokens.

    Each sample is a stationary run of T + 1 tokens; x is its first T, y its last T.
    The floor of the mean cross-entropy is ``chain(...).loss_floor(seq_len)``.
    """
    c = check(vocab=vocab, order=order, seq_len=seq_len, chain_seed=chain_seed, concentration=concentration)
    g = torch.Generator().manual_seed(derive_seed(seed, "data"))
    runs = c.sample(n_train + n_val, seq_len + 1, g)
    x, y = runs[:, :-1].contiguous(), runs[:, 1:].contiguous()
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def check(*, vocab: int, order: int, seq_len: int, chain_seed: int, concentration: float,
          **_: object) -> Chain:
    """The settings' chain, or a UserError naming the bad setting (:func:`bench.train.names.check_markov`)."""
    names.check_markov(vocab=vocab, order=order, seq_len=seq_len, concentration=concentration)
    return chain(vocab=vocab, order=order, chain_seed=chain_seed, concentration=concentration)


def null_entropy(c: Chain) -> float:
    """Entropy of the stationary token frequencies (nats): the loss of a model that ignores context."""
    marginal = c.stationary().view(-1, c.vocab).sum(0) if c.order > 1 else c.stationary()
    return float(-(marginal * marginal.log()).sum())

