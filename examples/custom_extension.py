"""Writing your own extension: per-sample gradient norms and the gradient variance.

An extension declares which *message* it consumes at each layer output and turns it into
per-parameter results (see :class:`curvlib.engine.extension.Extension`):

- ``savefield``: the parameter attribute the result is stored under;
- ``message``: here ``"grad_output"`` — the gradient w.r.t. the layer output, delivered during the
  ordinary backward pass (``[1, *y.shape]`` per call of the layer);
- ``accumulate(group, messages, state)``: ``group`` holds the module and its calls; its helpers
  (``batch_grad``, ``column_gradients``, ``ggn_diag`` …) compute per-layer quantities through
  curvlib's tensor networks — here the per-sample gradients, reduced right away.

Run: ``python examples/custom_extension.py``
"""

import torch
from torch import nn

import curvlib
from curvlib.engine.extension import Extension


class BatchL2Norm(Extension):
    """Squared L2 norm of each sample's gradient, per parameter: ``param.batch_l2`` ``[N]``."""

    savefield = "batch_l2"
    message = "grad_output"

    def accumulate(self, group, messages, state):
        per_sample = group.batch_grad([m[0] for m in messages])  # {name: [N, *param]}
        for name, grads in per_sample.items():
            state[name] = (grads**2).flatten(1).sum(1)


class GradientVariance(Extension):
    """Element-wise variance of the per-sample gradients: ``param.grad_variance`` (parameter shape).

    With ``g_n`` the contribution of sample ``n`` to the (mean-reduced) gradient, the per-sample
    gradients are ``N·g_n`` and their variance is ``N Σ g_n² − (Σ g_n)²``.
    """

    savefield = "grad_variance"
    message = "grad_output"

    def accumulate(self, group, messages, state):
        per_sample = group.batch_grad([m[0] for m in messages])
        for name, grads in per_sample.items():
            n = grads.shape[0]
            state[name] = n * (grads**2).sum(0) - grads.sum(0) ** 2


if __name__ == "__main__":
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))

    with curvlib.curvature(model, loss_fn, BatchL2Norm(), GradientVariance()):
        loss_fn(model(X), y).backward()

    # check against a loop over samples
    for name, p in model.named_parameters():
        grads = []
        for n in range(16):
            model.zero_grad()
            loss_fn(model(X[n : n + 1]), y[n : n + 1]).backward()
            grads.append(p.grad.clone())
        grads = torch.stack(grads)  # per-sample gradients ∇ℓ_n
        norms_ok = torch.allclose(p.batch_l2, (grads / 16).flatten(1).pow(2).sum(1), rtol=1e-4, atol=1e-9)
        var_ok = torch.allclose(p.grad_variance, grads.var(0, unbiased=False), rtol=1e-4, atol=1e-8)
        print(f"{name:9s} batch_l2 {tuple(p.batch_l2.shape)} matches loop: {norms_ok}; "
              f"grad_variance {tuple(p.grad_variance.shape)} matches loop: {var_ok}")
