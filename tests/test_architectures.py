"""The built-in architectures: shapes, dotted names and the residual convention, on tiny models."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from bench.errors import UserError
from bench.train import architectures as A

torch.set_num_threads(1)

IMAGE, VECTOR, TOKENS = (1, 8, 8), (16,), (12,)

# (arch, in_shape, out_dim, settings): every norm each architecture offers, with and without scalars.
CASES = [
    ("cnn", IMAGE, 10, {"norm": "none"}),
    ("cnn", IMAGE, 10, {"norm": "batch"}),
    ("cnn", IMAGE, 10, {"norm": "group", "activation": "tanh"}),
    ("resmlp", VECTOR, 3, {"norm": "none"}),
    ("resmlp", VECTOR, 3, {"norm": "layer"}),
    ("resmlp", VECTOR, 3, {"norm": "batch", "gates": True, "scalar_biases": True}),
    ("resnet", IMAGE, 10, {"norm": "batch"}),
    ("resnet", (8, 8), 10, {"norm": "none", "gates": True, "scalar_biases": True}),
    ("transformer", TOKENS, 20, {}),
    ("transformer", TOKENS, 20, {"pre_norm": False, "tied": True, "gates": True, "activation": "relu"}),
]
IDS = [f"{arch}-{'-'.join(f'{k}={v}' for k, v in s.items())}" for arch, _, _, s in CASES]


def build(arch: str, in_shape: tuple, out_dim: int, settings: dict, depth: int = 3, width: int = 16):
    torch.manual_seed(0)
    return A.get(arch)(in_shape, out_dim, depth=depth, width=width, **settings)


def batch(arch: str, in_shape: tuple, out_dim: int, n: int = 5) -> torch.Tensor:
    if arch == "transformer":
        return torch.randint(0, out_dim, (n, *in_shape))
    return torch.randn(n, *in_shape)


@pytest.mark.parametrize(("arch", "in_shape", "out_dim", "settings"), CASES, ids=IDS)
def test_output_shape_and_head(arch, in_shape, out_dim, settings):
    model = build(arch, in_shape, out_dim, settings)
    out = model(batch(arch, in_shape, out_dim))
    want = (5, in_shape[0], out_dim) if arch == "transformer" else (5, out_dim)
    assert out.shape == want
    assert isinstance(model.head, nn.Linear) and model.head.out_features == out_dim
    assert float(model.get_buffer("head_mult")) == 1.0


def test_image_models_take_flattened_rows():
    # The tasks give (N, features) rows: an image model reshapes them to (N, *in_shape).
    for arch in ("cnn", "resnet"):
        model = build(arch, IMAGE, 10, {}).eval()
        x = torch.randn(4, *IMAGE)
        torch.testing.assert_close(model(x.flatten(1)), model(x))


@pytest.mark.parametrize(("arch", "in_shape", "out_dim", "settings"),
                         [c for c in CASES if c[0] != "cnn"], ids=[i for i in IDS if not i.startswith("cnn")])
def test_residual_convention_resolves(arch, in_shape, out_dim, settings):
    model = build(arch, in_shape, out_dim, settings, depth=3)
    names = dict(model.named_modules())
    assert isinstance(model.blocks, nn.ModuleList)
    assert [f"blocks.{i}" in names for i in range(3)] == [True] * 3 and "blocks.3" not in names
    params = dict(model.named_parameters())
    for i, block in enumerate(model.blocks):
        ends = block.branch_ends
        assert len(ends) == (2 if arch == "transformer" else 1)
        for rel in ends:
            assert f"blocks.{i}.{rel}" in params and params[f"blocks.{i}.{rel}"].dim() >= 2
        for chain, end in zip(getattr(block, "branch_layers", ()), ends):
            assert chain[-1] == end and all(f"blocks.{i}.{rel}" in params for rel in chain)
        for norm in getattr(block, "branch_norms", ()):
            assert norm is None or f"blocks.{i}.{norm}" in params
        gates = getattr(block, "branch_gates", ())
        assert len(gates) == (len(ends) if settings.get("gates") else 0)
        scalars = getattr(block, "scalar_biases", ())
        assert len(scalars) == (4 if settings.get("scalar_biases") else 0)
        for rel in (*gates, *scalars):
            assert params[f"blocks.{i}.{rel}"].shape == (1,)
    for name in getattr(model, "scalar_biases", ()):
        assert params[name].shape == (1,)


def test_hook_on_a_block_sees_the_residual_stream():
    # The stream after block i is what the next block receives: a hook's output is its input.
    model = build("resmlp", VECTOR, 3, {}, depth=4)
    seen: dict[str, torch.Tensor] = {}
    for i in (1, 2):
        model.blocks[i].register_forward_hook(lambda m, inp, out, i=i: seen.update({f"out{i}": out,
                                                                                     f"in{i}": inp[0]}))
    model(torch.randn(6, 16))
    assert seen["out1"].shape == (6, 16)
    assert seen["out1"] is seen["in2"]


def test_transformer_names_tied_head_and_causality():
    model = build("transformer", TOKENS, 20, {"tied": True}, depth=2)
    names = set(dict(model.named_parameters()))
    for want in ("tok.weight", "pos.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                 "blocks.1.mlp.fc.weight", "blocks.1.mlp.proj.weight", "blocks.0.ln1.weight",
                 "blocks.0.ln2.weight", "ln_f.weight"):
        assert want in names
    assert model.head.weight is model.tok.weight and "head.weight" not in names
    assert model.blocks[0].attn.qkv.weight.shape == (48, 16)
    assert model.blocks[0].mlp.fc.weight.shape == (64, 16)
    # Causal: changing the last token changes no earlier position's logits.
    x = torch.randint(0, 20, (2, 12))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 20
    torch.testing.assert_close(model(x)[:, :-1], model(y)[:, :-1])
    assert not torch.allclose(model(x)[:, -1], model(y)[:, -1])


@pytest.mark.parametrize(("arch", "in_shape", "out_dim", "settings"), CASES, ids=IDS)
def test_every_parameter_gets_a_gradient(arch, in_shape, out_dim, settings):
    model = build(arch, in_shape, out_dim, settings, depth=2)
    out = model(batch(arch, in_shape, out_dim, n=8))
    (out ** 2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_gates_start_at_one_so_the_architecture_is_unchanged():
    plain = build("resmlp", VECTOR, 3, {})
    gated = build("resmlp", VECTOR, 3, {"gates": True, "scalar_biases": True})
    gated.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(4, 16)
    torch.testing.assert_close(gated(x), plain(x))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: A.get("vgg"), "unknown arch 'vgg'; choose from"),
    (lambda: A.cnn(IMAGE, 10, depth=2, width=8, norm="layer"), "norm = 'layer' for arch 'cnn'"),
    (lambda: A.resmlp(VECTOR, 3, depth=2, width=8, norm="group"), "choose from ['none', 'layer', 'batch']"),
    (lambda: A.resnet(IMAGE, 10, depth=0, width=8), "depth = 0 for arch 'resnet'"),
    (lambda: A.resnet(VECTOR, 10, depth=2, width=8), "needs image samples"),
    (lambda: A.transformer(IMAGE, 10, depth=2, width=8), "needs token sequences"),
    (lambda: A.transformer(TOKENS, 10, depth=2, width=10, heads=4), "divisible by heads = 4"),
    (lambda: A.cnn(IMAGE, 10, depth=2, width=8, activation="swish"), "unknown activation 'swish'"),
])
def test_bad_settings_are_user_errors(call, message):
    with pytest.raises(UserError, match=re.escape(message)):
        call()


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # SDPA has no CPU batching rule
@pytest.mark.parametrize(("arch", "in_shape", "out_dim", "settings"), CASES, ids=IDS)
def test_vmap_functional_call_matches_each_model(arch, in_shape, out_dim, settings):
    # What the any-module engine does: K jobs' parameters stacked, one forward over a base copy.
    # The base must be a real copy: ``.to("meta")`` unties a tied head from ``tok`` (torch 2.13),
    # and functional_call then reads garbage for ``head.weight``.
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    models = [build(arch, in_shape, out_dim, settings, depth=2) for _ in range(3)]
    for k, model in enumerate(models):
        torch.manual_seed(k)
        for p in model.parameters():
            p.data.normal_(0, 0.1)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0])
    x = batch(arch, in_shape, out_dim, n=4)
    out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(out, torch.stack([m(x) for m in models]))
