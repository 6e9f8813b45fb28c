"""The engine for any module against the oracle: the plain nn.Module + torch.optim loop, one job at a time.

The micrograd pattern, for architectures the MLP engine cannot stack: a CNN with BatchNorm, a
residual MLP, a transformer with tied embedding and head weights, and a user factory from this
file. Every job's loss curve must match the oracle's (relative 1e-4) for K = 1 and for bundles
mixing schemes and learning rates; final parameters must match under SGD; a job's numbers must
not depend on its bundle; modules vmap cannot batch exactly fall back to the per-job loop.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from bench import spec
from bench.errors import UserError
from bench.schema import STATS
from bench.train import functional, tasks
from bench.train.bundle import build_model
from bench.train.reference import train_plain

USER_NETS = '''
import torch
from torch import nn


class Block(nn.Module):
    branch_ends = ("conv2.weight",)

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


class Net(nn.Module):
    def __init__(self, channels, depth, out_dim):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.ModuleList(Block(channels) for _ in range(depth))
        self.head = nn.Linear(channels, out_dim)

    def forward(self, x):
        h = torch.relu(self.stem(x.view(x.shape[0], 1, 8, 8)))
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=(2, 3)))


def build(in_shape, out_dim, *, channels=4, depth=2):
    return Net(channels, depth, out_dim)


class Noisy(nn.Module):
    def __init__(self, out_dim):
        super().__init__()
        self.fc = nn.Linear(64, 16)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, out_dim)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.fc(x))))


def noisy(in_shape, out_dim):
    return Noisy(out_dim)


class Branchy(nn.Module):
    def __init__(self, out_dim):
        super().__init__()
        self.fc = nn.Linear(64, out_dim)

    def forward(self, x):
        if x.mean().item() > 1e9:  # data-dependent control flow: vmap cannot batch it
            return self.fc(x) * 0
        return self.fc(x)


def branchy(in_shape, out_dim):
    return Branchy(out_dim)


class TinyGPT(nn.Module):
    """Token and position embeddings, one nn.MultiheadAttention block, a head tied to the embedding."""

    def __init__(self, vocab, seq_len, width):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(seq_len, width))
        self.ln = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        self.register_buffer("mask", torch.triu(torch.full((seq_len, seq_len), float("-inf")), 1))

    def forward(self, x):
        h = self.tok(x) + self.pos
        a = self.ln(h)
        h = h + self.attn(a, a, a, attn_mask=self.mask, need_weights=False)[0]
        return self.head(h)


def gpt(in_shape, out_dim, *, width=16):
    return TinyGPT(out_dim, in_shape[0], width)


class BoolMaskGPT(TinyGPT):
    """A causal mask built in the forward as booleans: in eval mode (validation), MHA's fused
    inference path would run, which vmap cannot batch."""

    def forward(self, x):
        h = self.tok(x) + self.pos
        a = self.ln(h)
        mask = torch.triu(torch.ones(x.shape[-1], x.shape[-1], dtype=torch.bool), 1)
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        return self.head(h)


def gpt_boolmask(in_shape, out_dim, *, width=16):
    return BoolMaskGPT(out_dim, in_shape[0], width)


class MaxNorm(nn.Module):
    """A max-norm constraint in the forward (torch.renorm: vmap has no batching rule for it)."""

    def __init__(self, out_dim):
        super().__init__()
        self.fc = nn.Linear(64, out_dim)

    def forward(self, x):
        return nn.functional.linear(x, self.fc.weight.renorm(2, 0, 1.0), self.fc.bias)


def maxnorm(in_shape, out_dim):
    return MaxNorm(out_dim)


def not_a_module(in_shape, out_dim):
    return "a string"
'''


@pytest.fixture(scope="module", autouse=True)
def user_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("usernets")
    (folder / "usernets.py").write_text(textwrap.dedent(USER_NETS))
    sys.path.insert(0, str(folder))
    yield
    sys.path.remove(str(folder))
    sys.modules.pop("usernets", None)


def jobs_of(text: str) -> list[spec.Job]:
    return spec.parse(textwrap.dedent(text)).jobs()


CNN = """
[grid]
init = ["default", "kaiming_normal"]
lr = [0.05, 0.02]
seed = [0]
[model]
arch = "cnn"
depth = 2
width = 4
norm = "batch"
[task]
name = "digits"
images = true
[train]
steps = 6
batch_size = 16
log_every = 3
"""
RESMLP = """
[grid]
init = ["default", "xavier_normal"]
lr = [0.01, 0.003]
seed = [1]
[model]
arch = "resmlp"
depth = 3
width = 16
[task]
name = "teacher"
n_train = 128
[train]
steps = 6
batch_size = 16
log_every = 3
optimizer = "sgd"
momentum = 0.9
"""
GPT = """
[grid]
init = ["default", "xavier_uniform"]
lr = [0.1, 0.03]
seed = [0]
[model]
arch = "{arch}"
width = 16
[task]
name = "markov"
vocab = 11
seq_len = 8
n_train = 64
n_val = 32
[train]
steps = 5
batch_size = 8
log_every = 5
"""
USER = """
[grid]
init = ["default", "orthogonal"]
seed = [0, 1]
[model]
arch = "usernets:build"
channels = 4
[task]
name = "digits"
[train]
steps = 5
batch_size = 16
log_every = 5
lr = 0.05
"""


def assert_matches_oracle(jobs, *, rtol: float = 1e-4, params: bool = True) -> None:
    outs = functional.train(jobs, keep_params=True, vectorize=True)
    assert len(outs) == 1
    out = outs[0]
    for k, job in enumerate(jobs):
        losses, model, _ = train_plain(job, record=False)
        np.testing.assert_allclose(out.losses[:job.steps, k], losses, rtol=rtol, atol=1e-7,
                                   err_msg=f"job {k} ({job.init}, lr {job.lr})")
        if params:
            for got, (name, want) in zip(out.final_params[k], model.named_parameters()):
                torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-6, msg=name)


TRANSFORMER = GPT.format(arch="transformer").replace("width = 16",
                                                     "width = 16\ndepth = 2\nheads = 2\ntied = true")


@pytest.mark.parametrize("text", [CNN, RESMLP, USER, GPT.format(arch="usernets:gpt"), TRANSFORMER],
                         ids=["cnn-batchnorm", "resmlp-momentum", "user", "mha-tied", "transformer-tied"])
def test_bundles_match_the_plain_loop(text):
    assert_matches_oracle(jobs_of(text))


@pytest.mark.parametrize("text", [CNN, USER], ids=["cnn-batchnorm", "user"])
def test_a_single_job_matches_the_plain_loop(text):
    assert_matches_oracle(jobs_of(text)[:1])


def test_adam_matches_in_losses():
    # Adam turns float rounding in near-zero gradients into lr-sized steps: compare losses only.
    jobs = [dataclasses.replace(j, optimizer="adam", lr=0.003) for j in jobs_of(RESMLP)]
    assert_matches_oracle(jobs, params=False)


def test_tied_weights_stay_one_tensor():
    jobs = jobs_of(GPT.format(arch="usernets:gpt"))
    out = functional.train(jobs, keep_params=True, vectorize=True)[0]
    names = [(r.module, r.param) for r in out.rows if r.param == "weight"]
    assert ("tok", "weight") in names and ("head", "weight") not in names  # trained once, as the embedding
    losses, model, _ = train_plain(jobs[0], record=False)
    assert model.head.weight is model.tok.weight


def test_numbers_do_not_depend_on_the_bundle():
    jobs = jobs_of(CNN)
    together = functional.train(jobs, vectorize=True)[0]
    for k, job in enumerate(jobs):
        alone = functional.train([job], vectorize=True)[0]
        np.testing.assert_allclose(together.losses[:, k], alone.losses[:, 0], rtol=1e-5)
        a, b = together.row_stats[:, k].copy(), alone.row_stats[:, 0].copy()
        # A conv bias before BatchNorm has a gradient that is zero but for float noise (~1e-8): its
        # update ratio is noise over noise, different in every batching. Compare it where it is real.
        noise = (a[..., STATS.index("grad_norm")] < 1e-6)[..., None] & \
            (np.arange(len(STATS)) == STATS.index("update_ratio"))
        a[noise], b[noise] = 0, 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_preflight_keeps_vmap_and_falls_back_with_a_reason():
    jobs = jobs_of(USER)[:2]
    data = [tasks.load(j.task, j.task_params, j.seed) for j in jobs]
    built = [build_model(j, d) for j, d in zip(jobs, data)]
    assert functional.preflight(jobs, data, built, timed=False) is None  # exact: vmap may stay
    used = {}
    functional.train(jobs, on_engine=lambda e, why: used.update(engine=e, why=why))
    # Whether it stays is the timing's call: two jobs of a tiny CNN are close.
    assert used["engine"] == "vmap" and used["why"] == "" or "was faster" in used["why"], used
    for factory, words in (("usernets:noisy", "vmap raised"), ("usernets:branchy", "vmap raised")):
        jobs = jobs_of(USER.replace('"usernets:build"', f'"{factory}"').replace("channels = 4", ""))
        outs = functional.train(jobs[:2], on_engine=lambda e, why: used.update(engine=e, why=why))
        assert used["engine"] == "loop" and words in used["why"], used
        assert len(outs) == 2 and all(np.isfinite(o.losses[0]).all() for o in outs)


def test_an_operator_vmap_cannot_batch_falls_back_to_the_loop():
    """vmap would run an operator without a batching rule job by job: the preflight says which."""
    used = {}
    jobs = jobs_of(USER.replace('"usernets:build"', '"usernets:maxnorm"').replace("channels = 4", ""))
    outs = functional.train(jobs[:2], on_engine=lambda e, why: used.update(engine=e, why=why))
    assert used["engine"] == "loop" and "no batching rule for aten::renorm" in used["why"], used
    assert len(outs) == 2


def test_attention_is_batched_under_vmap():
    """CPU flash attention has no batching rule; the vmapped forward uses the math kernel instead,
    so the preflight no longer finds an operator vmap loops over (it may still keep the loop if the
    loop is faster: then it says so)."""
    used = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        functional.train(jobs_of(TRANSFORMER)[:2], vectorize=True)
    assert not [w for w in caught if "batching rule" in str(w.message)]
    functional.train(jobs_of(TRANSFORMER)[:2], on_engine=lambda e, why: used.update(engine=e, why=why))
    assert used["engine"] == "vmap" or "was faster" in used["why"], used


def test_multihead_attention_with_a_boolean_mask_is_vectorized():
    jobs = jobs_of(GPT.format(arch="usernets:gpt_boolmask"))[:2]
    data = [tasks.load(j.task, j.task_params, j.seed) for j in jobs]
    built = [build_model(j, d) for j, d in zip(jobs, data)]
    assert functional.preflight(jobs, data, built, timed=False) is None


def test_the_loop_is_reproducible_with_dropout():
    job = jobs_of(USER.replace('"usernets:build"', '"usernets:noisy"').replace("channels = 4", ""))[0]
    a = functional.train([job], vectorize=False)[0]
    b = functional.train([job], vectorize=False)[0]
    np.testing.assert_array_equal(a.losses, b.losses)


def test_factory_settings_are_checked_before_training(tmp_path):
    bad = USER.replace("channels = 4", "chanels = 4")
    with pytest.raises(UserError, match=r"\[model\] chanels: usernets:build does not take .*accepts"):
        spec.parse(textwrap.dedent(bad))
    with pytest.raises(UserError, match="unknown key \\[model\\] 'norm'"):
        spec.parse(textwrap.dedent(CNN.replace('arch = "cnn"', 'arch = "mlp"')))
    kaiming = USER.replace('"orthogonal"', '"kaiming_normal"')
    with pytest.raises(UserError, match=r"\[init_params.kaiming_normal\] gain: usernets:build takes no "
                                        r"activation setting.*gain = <number>"):
        spec.parse(textwrap.dedent(kaiming))
    given = kaiming + '[init_params.kaiming_normal]\ngain = 1.414\n'
    assert len(jobs_of(given)) == 4
    axis = USER.replace("channels = 4", "").replace("seed = [0, 1]", 'seed = [0]\n"model.channels" = [2, 4]')
    jobs = jobs_of(axis)
    assert sorted(j.settings()["model.channels"] for j in jobs) == [2, 2, 4, 4]


def test_a_factory_that_fails_is_a_failed_job_and_the_sweep_goes_on(tmp_path):
    import bench
    from bench import sweep

    text = USER.replace('init = ["default", "orthogonal"]', 'init = ["default"]').replace(
        '"usernets:build"', '"usernets:not_a_module"').replace("channels = 4", "")
    path = tmp_path / "spec.toml"
    path.write_text(textwrap.dedent(text))
    assert sweep.main([str(path), "--out", str(tmp_path / "out"), "--quiet", "--no-report",
                       "--jobs", "1"]) == 1
    runs = bench.load(tmp_path / "out").runs
    assert (runs["status"] == "failed").all() and runs["error"].str.contains("not a torch.nn.Module").all()


def test_probes_name_every_module_and_parameter():
    out = functional.train(jobs_of(USER)[:1], vectorize=True)[0]
    names = {row["name"] for row in out.modules}
    assert {"stem", "blocks.0", "blocks.0.conv1", "blocks.0.bn", "blocks.1.conv2", "head"} <= names
    rows = {(r.module, r.param) for r in out.rows}
    assert ("blocks.0.bn", "weight") in rows and ("blocks.1", "output") in rows and ("head", "bias") in rows
    assert all(r.module in names for r in out.rows)
    step0 = out.row_stats[0, 0]
    grads = [step0[i, 4] for i, r in enumerate(out.rows) if r.param in ("weight", "bias")]
    assert np.isfinite(grads).all() and (np.asarray(grads) > 0).all()  # every parameter gets a gradient


# --- muP's per-parameter learning rates and weight decay against torch.optim param groups --------
MUP_WD = """
[grid]
init = ["mup"]
lr = [0.05, 0.02]
seed = [0]
[model]
arch = "resmlp"
depth = 2
width = 64
[init_params.mup]
base_width = 16
[task]
name = "teacher"
n_train = 128
[train]
steps = 6
batch_size = 16
log_every = 3
optimizer = "sgd"
momentum = 0.9
weight_decay = 0.3
"""


def built_models(jobs):
    from bench.train import tasks
    from bench.train.bundle import build_model

    return [build_model(j, tasks.load(j.task, j.task_params, j.seed)) for j in jobs]


def test_mup_weight_decay_matches_torch_optim_param_groups():
    # The oracle trains with one param group per parameter: lr * lr_mult, weight_decay / lr_mult, as
    # mup's MuSGD builds them; at width_mult 4 the decay multipliers 1/4 and 1 both occur.
    jobs = jobs_of(MUP_WD)
    built = built_models(jobs)
    wd = functional._wd_scale(jobs, built, functional._Bundle(built, torch.device("cpu")))
    assert set(wd.unique().tolist()) == {0.25, 1.0}
    assert_matches_oracle(jobs)


def test_mup_weight_decay_matches_with_adam():
    jobs = [dataclasses.replace(j, optimizer="adam", lr=j.lr / 10) for j in jobs_of(MUP_WD)]
    assert_matches_oracle(jobs, params=False)


def test_mup_sgd_decay_step_is_width_independent():
    # Coupled L2 under MuSGD: the decay part of one plain-SGD step is lr * lr_mult * wd / lr_mult * p
    # = lr * wd * p for every parameter, whatever its learning-rate multiplier (mup/optim.py).
    base = dataclasses.replace(jobs_of(MUP_WD)[0], momentum=0.0, steps=1, log_every=1)
    bare = dataclasses.replace(base, weight_decay=0.0)
    start = [p.detach().clone() for p in built_models([base])[0].parameters()]
    with_wd = functional.train([base], keep_params=True, vectorize=True)[0].final_params[0]
    without = functional.train([bare], keep_params=True, vectorize=True)[0].final_params[0]
    for p0, a, b in zip(start, with_wd, without, strict=True):
        torch.testing.assert_close(a - b, -base.lr * base.weight_decay * p0, rtol=1e-4, atol=1e-6)


def test_a_rule_or_scheme_a_user_factory_cannot_take_is_exit_2_before_training(tmp_path, capsys):
    """Built on the meta device at plan time: a rule glob that matches nothing and Fixup on a
    factory without residual blocks are one line and exit 2, --dry-run included."""
    from bench import sweep

    rules = USER + '[init_rules.zero_head]\nrules = [{match = "haed.weight", value = 0.0}]\n'
    rules = rules.replace('seed = [0, 1]', 'seed = [0, 1]\nrules = ["zero_head"]')
    noisy = USER.replace('"usernets:build"', '"usernets:noisy"').replace("channels = 4", "").replace(
        'init = ["default", "orthogonal"]', 'init = ["fixup"]') + "[init_params.fixup]\ngain = 1.0\n"
    for text, words in ((rules, "[init_rules.zero_head] rule 1"), (noisy, "needs residual blocks")):
        path = tmp_path / "spec.toml"
        path.write_text(textwrap.dedent(text))
        assert sweep.main([str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and words in err[0], err


def test_he_drawing_residual_schemes_ask_for_a_gain_on_a_factory_without_activation():
    """zero_residual and Fixup draw He weights: a factory with no activation setting has no gain to
    use, so the spec asks for one instead of assuming ReLU's; given, it is used."""
    text = USER.replace('init = ["default", "orthogonal"]', 'init = ["zero_residual"]')
    with pytest.raises(UserError, match=r"\[init_params.zero_residual\] gain: usernets:build takes no "
                                        r"activation setting.*gain = <number>"):
        spec.parse(textwrap.dedent(text))
    (job,) = jobs_of(text + "[init_params.zero_residual]\ngain = 1.0\n")[:1]
    model = build_model(job, tasks.load(job.task, job.task_params, job.seed))
    w = model.blocks[0].conv1.weight  # a branch's first layer: He with gain 1, fan_in = 4 x 3 x 3
    assert abs(float(w.std()) - 1.0 / 6.0) < 0.05
    assert float(model.blocks[0].conv2.weight.abs().max()) == 0.0  # the branch's end starts at zero


def test_a_model_with_functional_activations_still_gets_an_activation_ratio():
    """The user net applies torch.relu in its forward (no activation module): the ratio is taken
    over its hidden modules' outputs, and an init that blows the signal up shows it."""
    from bench import dispatch
    from bench.settings import MetricsConfig

    text = USER.replace('init = ["default", "orthogonal"]', 'init = ["default", "scaled_normal"]') + \
        "[init_params.scaled_normal]\nstd = 1.0\n"
    jobs = {j.init: j for j in jobs_of(text) if j.seed == 0}
    ratio = {name: dispatch.run_bundle((job,), MetricsConfig(), "cpu", 0)[0].metrics["act_ratio_init"]
             for name, job in jobs.items()}
    assert all(np.isfinite(r) for r in ratio.values()), ratio
    assert ratio["scaled_normal"] > 3 * ratio["default"], ratio  # BatchNorm in the blocks tames it


def test_a_bundle_on_another_device_leaves_the_built_models_where_they_were():
    """Module.to moves in place: a bundle for another device (meta here, CUDA in use) works on a copy,
    since the preflight's fits and then training read the built models again."""
    jobs = jobs_of(CNN)[:2]
    built = [build_model(j, tasks.load(j.task, j.task_params, j.seed)) for j in jobs]
    bundle = functional._Bundle(built, torch.device("meta"))
    assert bundle.base is not built[0] and next(bundle.base.parameters()).is_meta
    assert all(p.device.type == "cpu" for m in built for p in m.parameters())
    assert functional._Bundle(built, torch.device("cpu")).base is built[0]  # the CPU: no copy
