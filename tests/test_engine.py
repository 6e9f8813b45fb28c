"""The stacked engine against a plain nn.Sequential + torch.optim loop, number for number."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import spec
from bench.schema import KINDS, STATS
from bench.train import activations, bundle
from bench.train import stacked as engine
from bench.train.reference import train_plain


def jobs_from(text: str) -> list[spec.Job]:
    return spec.parse(text, "<test>").jobs()


DEFAULT_MODEL = "width = 16\ndepth = 3"


def make_spec(grid: str, train: str = "", model: str = DEFAULT_MODEL,
              task: str = 'name = "teacher"\nn_train = 256') -> str:
    return f"""
name = "t"
[grid]
{grid}
[model]
{model}
[task]
{task}
[train]
steps = 40
batch_size = 32
log_every = 10
{train}
"""


def assert_matches_plain(jobs: list[spec.Job], rtol: float = 1e-4) -> bundle.BundleOutput:
    out = engine.train(jobs, keep_params=True, divergence_ratio=1e9)
    for k, job in enumerate(jobs):
        losses, model, _ = train_plain(job, record=False)
        np.testing.assert_allclose(out.losses[: job.steps, k], losses, rtol=rtol, atol=1e-6,
                                   err_msg=f"loss curve of {job.init} lr={job.lr}")
        for mine, theirs in zip(out.final_params[k], model.parameters()):
            torch.testing.assert_close(mine, theirs.detach(), rtol=rtol, atol=1e-5)
    return out


def test_single_job_matches_plain_loop_sgd_momentum():
    jobs = jobs_from(make_spec('init = ["kaiming_normal"]', "momentum = 0.9\nlr = 0.02"))
    assert_matches_plain(jobs)


def test_bundle_mixing_schemes_and_lrs_matches_plain_loop():
    jobs = jobs_from(make_spec('init = ["default", "xavier_uniform", "orthogonal"]\nlr = [0.01, 0.05]\n'
                               'seed = [0, 1]', "momentum = 0.5\nweight_decay = 0.001"))
    assert len(jobs) == 12
    assert_matches_plain(jobs)


def test_adam_bundle_with_per_job_betas_matches_torch_adam():
    jobs = jobs_from(make_spec('init = ["kaiming_uniform", "xavier_normal"]\nlr = [0.001, 0.003]\n'
                               'betas = [[0.9, 0.999], [0.8, 0.99]]',
                               'optimizer = "adam"\nweight_decay = 0.01'))
    assert_matches_plain(jobs)


def test_classification_cross_entropy_matches_plain_loop():
    jobs = jobs_from(make_spec('init = ["kaiming_normal", "default"]\nlr = [0.05]', "",
                               'width = 16\ndepth = 3\nactivation = "tanh"',
                               'name = "spirals"\nn_train = 256'))
    out = assert_matches_plain(jobs)
    assert np.isfinite(out.val_acc).all() and (out.val_acc <= 1).all()


@pytest.mark.parametrize("activation", sorted(activations.ACTIVATIONS))
def test_every_activation_matches_plain_loop(activation):
    # Steps without probes apply the in-place form of the activation (the registry's inplace form), probe
    # steps the plain one: both must train exactly as nn.Sequential does.
    jobs = jobs_from(make_spec('init = ["xavier_normal"]\nlr = [0.03]\nseed = [0, 1]', "momentum = 0.9",
                               f'width = 12\ndepth = 3\nactivation = "{activation}"'))
    assert_matches_plain(jobs)


def test_job_numbers_do_not_depend_on_the_bundle():
    jobs = jobs_from(make_spec('init = ["default", "kaiming_normal", "scaled_normal"]\nseed = [0, 1, 2]'))
    together = engine.train(jobs)
    for k in (0, 4, 8):
        alone = engine.train([jobs[k]])
        np.testing.assert_allclose(together.losses[:, k], alone.losses[:, 0], rtol=1e-5)
        np.testing.assert_allclose(engine.layer_array(together)[:, k], engine.layer_array(alone)[:, 0],
                                   rtol=1e-4, atol=1e-7)


def test_diverged_job_stops_and_its_bundle_mates_go_on():
    jobs = jobs_from(make_spec('lr = [0.01, 50.0]\ninit = ["kaiming_normal"]'))
    out = engine.train(jobs, divergence_ratio=10)
    assert out.diverged_at[1] >= 0 and out.diverged_at[0] == -1
    assert np.isnan(out.losses[out.diverged_at[1] + 1:, 1]).all()
    alone = engine.train([jobs[0]], divergence_ratio=10)
    np.testing.assert_allclose(out.losses[:, 0], alone.losses[:, 0], rtol=1e-5)


def test_every_parameter_receives_a_gradient():
    jobs = jobs_from(make_spec('init = ["kaiming_normal"]', "", "width = 16\ndepth = 5"))
    out = engine.train(jobs)
    kinds = [KINDS.index("weight"), KINDS.index("bias")]
    grads = engine.layer_array(out)[0, 0, :, kinds, STATS.index("grad_norm")]
    assert (grads > 0).all()


@pytest.mark.filterwarnings("ignore:std\\(\\):UserWarning")
def test_probes_match_the_classic_per_parameter_records():
    job = jobs_from(make_spec('init = ["xavier_uniform"]', "lr = 0.05"))[0]
    out = engine.train([job])
    _, _, records = train_plain(job)
    for rec in records:
        li = list(out.log_steps).index(rec["step"])
        layer, kind = int(rec["name"].split(".")[0]) // 2, rec["name"].split(".")[1]
        row = engine.layer_array(out)[li, 0, layer, KINDS.index(kind)]
        for stat in ("mean", "std", "norm", "grad_norm"):
            if np.isnan(rec[stat]):  # the std of a one-element bias
                assert np.isnan(row[STATS.index(stat)])
                continue
            assert row[STATS.index(stat)] == pytest.approx(rec[stat], rel=1e-4, abs=1e-7), (rec, stat)


def test_update_ratio_is_the_relative_size_of_the_step():
    # Plain SGD, no momentum: ||dW|| = lr * ||grad||.
    job = jobs_from(make_spec('init = ["kaiming_normal"]', "lr = 0.1"))[0]
    out = engine.train([job])
    w = KINDS.index("weight")
    row = engine.layer_array(out)[0, 0, :, w]
    expected = 0.1 * row[:, STATS.index("grad_norm")] / row[:, STATS.index("norm")]
    np.testing.assert_allclose(row[:, STATS.index("update_ratio")], expected, rtol=1e-3)


def test_zero_init_is_dead_and_gradient_free_in_hidden_layers():
    job = jobs_from(make_spec('init = ["zeros"]', "", "width = 16\ndepth = 4"))[0]
    out = engine.train([job])
    s0 = engine.layer_array(out)[0, 0]
    assert (s0[:3, KINDS.index("act"), STATS.index("dead_frac")] == 1).all()
    assert (s0[:3, KINDS.index("weight"), STATS.index("grad_norm")] == 0).all()
    # Only the output bias learns: the loss can fall to the targets' variance, no further.
    assert s0[3, KINDS.index("bias"), STATS.index("grad_norm")] > 0


@pytest.mark.parametrize("init, factor", [("kaiming_normal", 1.0), ("xavier_normal", 0.5)])
def test_signal_propagation_through_20_relu_layers(init, factor):
    # Mean-field theory: with zero biases each ReLU layer multiplies the preactivation second
    # moment by sigma_w2 / 2: 1 for Kaiming (sigma_w2 = 2), 1/2 for Xavier on square layers.
    jobs = jobs_from(f"""
[grid]
init = ["{init}"]
seed = [0, 1, 2, 3]
[model]
depth = 20
width = 256
[task]
name = "teacher"
n_train = 256
[train]
steps = 1
batch_size = 256
""")
    out = engine.train(jobs)
    pre = KINDS.index("preact")
    array = engine.layer_array(out)
    q = array[0, :, :, pre, STATS.index("std")] ** 2 + array[0, :, :, pre, 0] ** 2
    ratios = q[:, 2:19] / q[:, 1:18]  # hidden-to-hidden layers (same fan-in)
    assert np.exp(np.log(ratios).mean()) == pytest.approx(factor, rel=0.1)
