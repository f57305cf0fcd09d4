"""HesScale / HesScaleGN through the engine against a layer-by-layer BL89 recursion.

Reference (tests/test_engine_references.py): starting from the exact diagonal of the loss Hessian
and the loss gradient at the output (torch.func), each layer of a sequential model maps
``(d, g) ↦ (diag(Jᵀ diag(d) J) + diag(∇²⟨g, f(x)⟩), Jᵀ g)`` with dense jacrev/hessian (the second
term dropped for the GN variant); a layer's parameter diagonal is ``diag(J_wᵀ diag(d) J_w)``, summed
over the calls of a layer used more than once.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import assert_close
from curvlib.extensions import DiagGGNExact, HesScale, HesScaleGN
from test_engine_references import DT, GGNReference, hesscale_reference, make_loss, randomize_batchnorm, run_engine

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


@pytest.fixture(autouse=True)
def _seeded(seed):
    return seed


def _cnn():
    return randomize_batchnorm(
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.ZeroPad2d((1, 0, 0, 1)),  # the engine's padding with a view backward
            nn.Conv2d(4, 4, 3, stride=2, groups=2),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, 3),
        )
    ).eval()


def _shared():
    shared = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Sigmoid(), nn.Linear(4, 3))


def _conv1d():
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2, padding=1),
        nn.Sigmoid(),
        nn.ConvTranspose1d(3, 2, 3, stride=2, output_padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 10, 3),
    )


def _conv3d_avgpool():
    return nn.Sequential(
        nn.Conv3d(1, 2, 2, padding=(1, 0, 0)),
        nn.ELU(),
        nn.AvgPool3d(2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 1 * 1, 3),
    )


def _depthwise_transpose2d():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.Sigmoid(),
        nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 8 * 8, 3),
    )


MODELS = {
    "depthwise_transpose2d": (_depthwise_transpose2d, (2, 2, 4, 4)),
    "cnn_bn_eval": (_cnn, (3, 2, 8, 8)),
    "shared_linear": (_shared, (4, 5)),
    "conv1d_transpose": (_conv1d, (3, 2, 8)),
    "conv3d": (_conv3d_avgpool, (2, 1, 3, 4, 3)),
}


@pytest.mark.parametrize("loss_kind", ["ce", "mse", "bce_sum"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_hesscale_matches_bl89_recursion(model_name, loss_kind):
    factory, shape = MODELS[model_name]
    model = factory().to(DT)
    X = torch.randn(*shape, dtype=DT)
    loss_fn, y = make_loss(loss_kind, (shape[0], 3))
    reference_model = copy.deepcopy(model)
    run_engine(model, loss_fn, X, y, HesScale(), HesScaleGN())
    layers = list(reference_model)
    exact = hesscale_reference(layers, X, loss_fn, y, gauss_newton=False)
    gn = hesscale_reference(layers, X, loss_fn, y, gauss_newton=True)
    scale = max(v.abs().max().item() for entry in exact.values() for v in entry.values())
    differs = False
    modules = [m for m in model if list(m.parameters(recurse=False))]
    reference_modules = [m for m in layers if list(m.parameters(recurse=False))]
    assert len({id(m) for m in modules}) == len(exact)
    for module, ref_module in zip(modules, reference_modules):
        for name, p in module.named_parameters():
            expected, expected_gn = exact[id(ref_module)][name], gn[id(ref_module)][name]
            label = f"{type(module).__name__}.{name}"
            assert_close(p.diag_hesscale, expected, rtol=1e-9, atol=1e-10 * scale, name=f"{label}.diag_hesscale")
            assert_close(p.diag_hesscale_gn, expected_gn, rtol=1e-9, atol=1e-10 * scale, name=f"{label}.diag_hesscale_gn")
            differs |= bool((expected - expected_gn).abs().max() > 1e-6 * scale)
    assert differs, "second-order terms of the activations vanish: HesScale and HesScaleGN are not told apart"


def test_hesscale_gn_of_the_last_layer_is_the_ggn_diagonal():
    """For the parameters of the last layer (linear in them, nothing after it) HesScaleGN is the exact GGN diagonal."""
    model = nn.Sequential(nn.Tanh(), nn.Linear(4, 3)).to(DT)
    X = torch.randn(3, 4, dtype=DT)
    loss_fn, y = make_loss("ce", (3, 3))
    reference_model = copy.deepcopy(model)
    run_engine(model, loss_fn, X, y, HesScaleGN(), DiagGGNExact())
    ref = GGNReference(reference_model, loss_fn, X, y)
    for name, p in model.named_parameters():
        assert_close(p.diag_hesscale_gn, ref.diag(name), name=name)


def test_hesscale_refuses_batchnorm_in_train_mode():
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).to(DT).train()
    X = torch.randn(2, 2, 8, 8, dtype=DT)
    loss_fn, y = make_loss("ce", (2, 3))
    with pytest.raises(ValueError, match="BatchNorm in train mode.*eval"):
        run_engine(model, loss_fn, X, y, HesScale())
    # eval mode works
    model.eval()
    run_engine(model, loss_fn, X, y, HesScale())
    assert model[1].weight.diag_hesscale.shape == model[1].weight.shape
