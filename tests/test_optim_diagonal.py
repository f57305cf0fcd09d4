"""Diagonal preconditioners (AdaHesScale, AdaHesScaleGN, DiagGGNNaturalGradient) against their update rules.

Curvature references are independent where that is possible: for a single Linear layer the
HesScale diagonal is the exact Hessian diagonal (``torch.func.hessian``), and the GGN diagonal of a
small MLP is ``diag(Jᵀ H J)`` from ``torch.func`` Jacobians. The update rules are re-implemented
as plain loops (the published AdaHesScale rule; ``g / (d + λ)`` then SGD).
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvlib
from conftest import assert_close
from curvlib.extensions import HesScale, HesScaleGN
from curvlib.optim import AdaHesScale, AdaHesScaleGN, DiagGGNNaturalGradient

DTYPE = torch.float64


def adahesscale_reference(params, grads, hessians, states, lr, betas, eps, weight_decay):
    """The published AdaHesScale rule (Adam with h² in place of g²), one step, in place on ``params``."""
    beta1, beta2 = betas
    for p, g, h, state in zip(params, grads, hessians, states):
        g = g + weight_decay * p
        state["t"] = state.get("t", 0) + 1
        state["m"] = beta1 * state.get("m", torch.zeros_like(p)) + (1 - beta1) * g
        state["v"] = beta2 * state.get("v", torch.zeros_like(p)) + (1 - beta2) * h**2
        m_hat = state["m"] / (1 - beta1 ** state["t"])
        v_hat = state["v"] / (1 - beta2 ** state["t"])
        p -= lr * m_hat / (v_hat.sqrt() + eps)


def exact_hessian_diagonal(model, loss_fn, X, y):
    """Diagonal of the loss Hessian w.r.t. each parameter (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return loss_fn(functional_call(model, p, (X,)), y)

    full = hessian(loss)(params)
    return [full[k][k].reshape(v.numel(), v.numel()).diagonal().reshape(v.shape) for k, v in params.items()]


def test_adahesscale_single_layer_matches_published_rule_with_exact_hessian(seed):
    model = nn.Linear(5, 3).to(DTYPE)
    reference = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    lr, betas, eps, wd = 0.05, (0.8, 0.9), 1e-6, 0.01
    opt = AdaHesScale(model, loss_fn, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    states = [{} for _ in reference.parameters()]
    for _ in range(4):
        X, y = torch.randn(6, 5, dtype=DTYPE), torch.randint(0, 3, (6,))
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        params = list(reference.parameters())
        grads = torch.autograd.grad(loss_fn(reference(X), y), params)
        hessians = exact_hessian_diagonal(reference, loss_fn, X, y)
        with torch.no_grad():
            adahesscale_reference(params, grads, hessians, states, lr, betas, eps, wd)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_close(p.detach(), q.detach(), rtol=1e-10, name="AdaHesScale parameters")


@pytest.mark.parametrize("cls,extension", [(AdaHesScale, HesScale), (AdaHesScaleGN, HesScaleGN)])
def test_adahesscale_deep_network_uses_hesscale_of_every_layer(seed, cls, extension):
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 8), nn.Sigmoid(), nn.Linear(8, 3)).to(DTYPE)
    reference = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    lr, betas, eps = 0.01, (0.9, 0.999), 1e-8
    opt = cls(model, loss_fn, lr=lr, betas=betas, eps=eps)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    states = [{} for _ in reference.parameters()]
    for step in range(3):
        X, y = torch.randn(5, 1, 4, 4, dtype=DTYPE), torch.randint(0, 3, (5,))
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        scheduler.step()
        with curvlib.curvature(reference, loss_fn, extension()):
            reference.zero_grad()
            loss_fn(reference(X), y).backward()
        params = list(reference.parameters())
        hessians = [getattr(p, extension.savefield) for p in params]
        with torch.no_grad():
            adahesscale_reference(params, [p.grad for p in params], hessians, states, lr * 0.5**step, betas, eps, 0.0)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_close(p.detach(), q.detach(), rtol=1e-10, name=f"{cls.__name__} parameters")


def test_adahesscale_skipped_layer_falls_back_to_adam(seed):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    loss_fn = nn.CrossEntropyLoss()
    adam_layer = copy.deepcopy(model[0])
    opt = AdaHesScale(model, loss_fn, lr=0.01, skip=[model[0]])
    adam = torch.optim.Adam(adam_layer.parameters(), lr=0.01)
    for _ in range(3):
        X, y = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,))
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        grads = [p.grad.clone() for p in model[0].parameters()]
        opt.step()
        for p, g in zip(adam_layer.parameters(), grads):
            p.grad = g
        adam.step()
    for p, q in zip(model[0].parameters(), adam_layer.parameters()):
        assert_close(p.detach(), q.detach(), rtol=1e-10, name="skipped layer = Adam")


def test_adahesscale_resume_is_bit_identical(seed):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).to(DTYPE)
    loss_fn = nn.CrossEntropyLoss()
    batches = [(torch.randn(4, 1, 4, 4, dtype=DTYPE), torch.randint(0, 3, (4,))) for _ in range(5)]
    opt = AdaHesScale(model, loss_fn, lr=0.01, weight_decay=1e-3)
    for X, y in batches[:2]:
        opt.zero_grad(); loss_fn(model(X), y).backward(); opt.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for X, y in batches[2:]:
        opt.zero_grad(); loss_fn(model(X), y).backward(); opt.step()
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = AdaHesScale(resumed, loss_fn, lr=0.01, weight_decay=1e-3)
    opt2.load_state_dict(checkpoint["opt"])
    for X, y in batches[2:]:
        opt2.zero_grad(); loss_fn(resumed(X), y).backward(); opt2.step()
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------------------------
# damped diagonal-GGN natural gradient


def ggn_diagonal_reference(model, loss_fn, X, y):
    """``diag(Jᵀ H J)`` per parameter, with ``J`` the Jacobian of the logits w.r.t. the parameters."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    logits = model(X).detach()
    J = jacrev(lambda p: functional_call(model, p, (X,)))(params)
    H = hessian(lambda f: loss_fn(f, y))(logits).reshape(logits.numel(), logits.numel())
    result = []
    for k, v in params.items():
        Jk = J[k].reshape(logits.numel(), v.numel())
        result.append(torch.einsum("ip,ij,jp->p", Jk, H, Jk).reshape(v.shape))
    return result


def test_diag_ggn_natural_gradient_step_and_ema(seed):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    reference = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    lr, damping, ema = 0.2, 0.01, 0.6
    opt = DiagGGNNaturalGradient(model, loss_fn, torch.optim.SGD(model.parameters(), lr=lr), fisher="exact",
                                 damping=damping, ema=ema)
    averages = None
    for _ in range(3):
        X, y = torch.randn(6, 4, dtype=DTYPE), torch.randint(0, 3, (6,))
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        diagonals = ggn_diagonal_reference(reference, loss_fn, X, y)
        averages = diagonals if averages is None else [ema * a + (1 - ema) * d for a, d in zip(averages, diagonals)]
        grads = torch.autograd.grad(loss_fn(reference(X), y), list(reference.parameters()))
        with torch.no_grad():
            for p, g, d in zip(reference.parameters(), grads, averages):
                p -= lr * g / (d + damping)
    assert_close(opt.diagonal("0/weight"), averages[0], rtol=1e-10, name="EMA of the GGN diagonal")
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_close(p.detach(), q.detach(), rtol=1e-10, name="parameters")


def test_diag_ggn_mc_with_batchnorm_and_intervals(seed):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).to(DTYPE)
    loss_fn = nn.CrossEntropyLoss()
    opt = DiagGGNNaturalGradient(model, loss_fn, torch.optim.Adam(model.parameters(), lr=1e-2), fisher="mc",
                                 mc_samples=2, damping=0.1, update_every=3)
    X, y = torch.randn(6, 1, 4, 4, dtype=DTYPE), torch.randint(0, 3, (6,))
    losses = []
    for step in range(6):
        assert opt.hooks_active == (step % 3 == 0)
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.diagonal("1/weight") is not None  # BatchNorm gets a diagonal too (autograd pathway)
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
        (dict(betas=0.9), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=float("nan")), "weight_decay"),
    ],
)
def test_adahesscale_bad_configuration(kwargs, match):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=match):
        AdaHesScale(model, nn.CrossEntropyLoss(), **kwargs)


def test_diag_ggn_bad_configuration():
    model = nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fisher"):
        DiagGGNNaturalGradient(model, nn.CrossEntropyLoss(), sgd, fisher="type-2")
    with pytest.raises(ValueError, match="damping"):
        DiagGGNNaturalGradient(model, nn.CrossEntropyLoss(), sgd, damping=-1.0)
    with pytest.raises(ValueError, match="update_every"):
        DiagGGNNaturalGradient(model, nn.CrossEntropyLoss(), sgd, update_every=0)
    with pytest.raises(ValueError, match="found no module"):
        DiagGGNNaturalGradient(model, nn.CrossEntropyLoss(), sgd, skip=[model])
