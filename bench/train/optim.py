"""SGD and Adam on one flat (K, P) parameter buffer, with per-job hyperparameters.

Every engine trains a bundle's K jobs as rows of one buffer; this optimizer updates the
whole buffer in a few operations and follows torch.optim's single-tensor implementations
step for step (the tests compare every engine with torch.optim).
"""

from __future__ import annotations

import torch

from bench.job import Job

ADAM_EPS = 1e-8  # torch.optim.Adam's default


class FlatOptimizer:
    """SGD (momentum, weight decay) and Adam on one flat (K, P) parameter buffer, per-job hyperparameters.

    Every job's parameters live side by side in ``flat`` (row k is job k's model), so a step is a
    handful of whole-buffer operations instead of a few per layer: on a CPU, each operator
    costs a wake-up of the thread pool, and per-layer updates made the optimizer as many
    operators as the rest of the step. The arithmetic follows torch.optim's single-tensor
    implementations step for step.
    """

    def __init__(self, jobs: list[Job], flat: torch.Tensor, lr_scale: torch.Tensor | None = None,
                 wd_scale: torch.Tensor | None = None):
        """``lr_scale``, ``wd_scale`` (K, P): per-parameter learning-rate and weight-decay multipliers
        (muP's), 1 where None."""
        dev = flat.device

        def column(values: list[float]) -> torch.Tensor:  # (K, 1): broadcasts over a job's row
            return torch.tensor(values, device=dev, dtype=flat.dtype).unsqueeze(1)

        self.kind = jobs[0].optimizer
        self.flat = flat
        self.lr = column([j.lr for j in jobs])
        if lr_scale is not None:  # a learning rate per job and parameter: (K, P), not (K, 1)
            self.lr = self.lr * lr_scale.to(device=dev, dtype=flat.dtype)
        self.wd = column([j.weight_decay for j in jobs])
        if wd_scale is not None:  # coupled L2 per parameter, as torch.optim param groups give it
            self.wd = self.wd * wd_scale.to(device=dev, dtype=flat.dtype)
        self.momentum = column([j.momentum for j in jobs])
        self.b1 = column([j.betas[0] for j in jobs])
        self.b2 = column([j.betas[1] for j in jobs])
        self.use_wd = any(j.weight_decay for j in jobs)
        self.state: list[torch.Tensor] = []
        self.t = 0
        # Adam without per-parameter multipliers: PyTorch's fused kernel (torch.optim.Adam's
        # ``fused=True``), one call per group of jobs sharing their hyperparameters, on rows of the
        # flat buffers. The whole-buffer arithmetic below makes about ten passes over (K, P); the
        # kernel one (K = 32 jobs of 70k parameters: 0.5 ms against 4 to 14 ms a step, CPU).
        self.groups: dict[tuple[float, float, float, float], list[int]] = {}
        if self.kind == "adam" and lr_scale is None and wd_scale is None and hasattr(torch, "_fused_adam_"):
            for k, j in enumerate(jobs):
                self.groups.setdefault((j.lr, j.betas[0], j.betas[1], j.weight_decay), []).append(k)
        self.retired: set[int] = set()

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        """One update of every job from the flat gradient ``grad`` (K, P)."""
        self.t += 1
        p = self.flat
        if self.groups:
            self._fused_adam(grad)
            return
        g = grad + self.wd * p if self.use_wd else grad
        if self.kind == "sgd":
            if not self.state:
                self.state.append(g.clone())  # torch: the first momentum buffer is the gradient itself
            else:
                self.state[0].mul_(self.momentum).add_(g)
            p.addcmul_(self.state[0], -self.lr)
        else:
            if not self.state:
                self.state.extend([torch.zeros_like(p), torch.zeros_like(p)])
            m, v = self.state
            m.lerp_(g, 1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g * (1 - self.b2))
            bc1, bc2 = 1 - self.b1**self.t, 1 - self.b2**self.t
            denom = (v.sqrt() / bc2.sqrt()).add_(ADAM_EPS)
            p.sub_((self.lr / bc1) * m / denom)

    def _fused_adam(self, grad: torch.Tensor) -> None:
        """Adam through ``torch._fused_adam_`` (coupled weight decay, as torch.optim.Adam), per group."""
        if not self.state:
            self.state.extend([torch.zeros_like(self.flat), torch.zeros_like(self.flat)])
            self.rows = [t.unbind(0) for t in (self.flat, *self.state)]  # views: fixed storage
            self.count = torch.zeros((), device=self.flat.device, dtype=torch.float32)
        self.count.fill_(self.t)  # the kernel reads the step for the bias corrections
        params, m, v = self.rows
        grads = grad.contiguous().unbind(0)
        for (lr, b1, b2, wd), members in self.groups.items():
            live = [k for k in members if k not in self.retired]
            if live:
                torch._fused_adam_([params[k] for k in live], [grads[k] for k in live], [m[k] for k in live],
                                   [v[k] for k in live], [], [self.count] * len(live), lr=lr, beta1=b1,
                                   beta2=b2, weight_decay=wd, eps=ADAM_EPS, amsgrad=False, maximize=False)

    @torch.no_grad()
    def retire(self, k: int) -> None:
        """Stop job k for good (it diverged): zero its parameters and state, and its learning rate."""
        self.flat[k] = 0
        for s in self.state:
            s[k] = 0
        self.lr[k] = 0
        self.retired.add(k)
