"""Loss functions: symmetric factorisations of the loss Hessian w.r.t. the model output.

For a loss ``L = scale · Σ_n ℓ(f_n, y_n)`` (``scale = 1/N`` or ``1/numel`` for ``reduction='mean'``,
1 for ``'sum'``) the Hessian w.r.t. the output ``f`` is block-diagonal, ``∇²_f L = S Sᵀ``. The
columns of ``S`` are returned as a tensor ``[C, *f.shape]`` (``C`` columns first), each column
non-zero only on its own sample:

- :meth:`LossCall.sqrt_hessian` — exact (``C`` = number of classes / output dimensions).
- :meth:`LossCall.sqrt_hessian_mc` — Monte-Carlo: ``C`` = ``mc_samples`` columns ``√(scale/M)·∇ℓ(f, ŷ_m)``
  with ``ŷ_m`` drawn from the model's predictive distribution, so that ``E[S Sᵀ] = ∇²_f L``.
- :meth:`LossCall.empirical` — one column ``√scale · ∇ℓ(f_n, y_n)`` (the empirical Fisher).
- :meth:`LossCall.hessian_diagonal` — ``diag(∇²_f L)`` shaped like ``f``.

"Column ``c``" means ``C`` columns per sample packed into one tensor: ``Σ_c S[c, n] S[c, n]ᵀ`` is the
Hessian block of sample ``n`` (``S[c]`` itself spans all samples; there are no cross-sample terms).

Supported: ``CrossEntropyLoss`` (class-index or probability targets, ``[N, K]`` logits; probability
targets need not sum to one — the Hessian scales with their sum ``Σ_k t_nk`` per sample),
``MSELoss`` and ``BCEWithLogitsLoss`` (any output shape ``[N, *D]``), reductions ``mean``/``sum``.
The Gaussian/Bernoulli/categorical likelihoods behind the MC samples are those for which each loss
is the negative log-likelihood (MSE: Gaussian with variance 1/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as tf
from torch import Tensor, nn

SUPPORTED_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


def check_loss_module(loss_fn: nn.Module) -> None:
    """Raise a clear error for losses (or loss options) whose Hessian factorisation we do not provide."""
    if not isinstance(loss_fn, SUPPORTED_LOSSES):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_LOSSES)
        raise ValueError(f"loss_fn must be one of {names}, got {type(loss_fn).__name__}")
    if loss_fn.reduction not in ("mean", "sum"):
        raise ValueError(f"loss_fn.reduction must be 'mean' or 'sum', got {loss_fn.reduction!r}")
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            raise ValueError("CrossEntropyLoss with class weights or label_smoothing is not supported")
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise ValueError("BCEWithLogitsLoss with weight or pos_weight is not supported")


@dataclass
class LossCall:
    """One evaluation ``loss_fn(output, target)`` recorded during the forward pass.

    The loss value itself is not kept (the engine hooks it; keeping it here would make a reference
    cycle through that hook): :meth:`gradient` re-evaluates the loss on a detached output.
    """

    loss_fn: nn.Module
    output: Tensor
    target: Tensor

    def __post_init__(self):
        check_loss_module(self.loss_fn)
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            if self.output.dim() != 2:
                raise ValueError(
                    f"CrossEntropyLoss is supported for logits [N, K]; got output shape {tuple(self.output.shape)}"
                )
            if not self.target.is_floating_point() and (self.target == self.loss_fn.ignore_index).any():
                raise ValueError("targets equal to CrossEntropyLoss.ignore_index are not supported")
            if self.target.is_floating_point() and (self.target < 0).any():
                raise ValueError("CrossEntropyLoss probability targets must be non-negative")

    def _target_mass(self) -> Tensor:
        """``[N, 1]``: ``Σ_k t_nk`` for cross-entropy probability targets (the Hessian's factor), else 1."""
        flat = self._flat()
        if isinstance(self.loss_fn, nn.CrossEntropyLoss) and self.target.is_floating_point():
            return self.target.detach().to(flat.dtype).reshape(flat.shape[0], -1).sum(1, keepdim=True)
        return torch.ones(flat.shape[0], 1, dtype=flat.dtype, device=flat.device)

    @property
    def batch_size(self) -> int:
        return self.output.shape[0]

    @property
    def scale(self) -> float:
        """Factor of the reduction: the loss is ``scale · Σ_n ℓ_n``."""
        if self.loss_fn.reduction == "sum":
            return 1.0
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            return 1.0 / self.batch_size
        return 1.0 / self.output.numel()

    def _flat(self) -> Tensor:
        return self.output.detach().reshape(self.batch_size, -1)

    def _probabilities(self) -> Tensor:
        logits = self._flat()
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            return logits.softmax(1)
        return logits.sigmoid()

    def _columns(self, columns: Tensor) -> Tensor:
        """``[C, N, D]`` → ``[C, *output.shape]``."""
        return columns.reshape(columns.shape[0], *self.output.shape)

    def sqrt_hessian(self) -> Tensor:
        """Exact factor ``S`` with ``S Sᵀ = ∇²_f L``: ``[D, *f.shape]``, ``D`` = classes / output dims."""
        flat = self._flat()
        n, dim = flat.shape
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            return self._columns(self._softmax_sqrt_hessian())
        eye = torch.eye(dim, dtype=flat.dtype, device=flat.device)
        if isinstance(self.loss_fn, nn.MSELoss):
            columns = math.sqrt(2.0) * eye[:, None, :].expand(dim, n, dim)
        else:
            p = self._probabilities()
            columns = (p * (1 - p)).sqrt().T[:, :, None] * eye[:, None, :]
        return self._columns(columns * math.sqrt(self.scale))

    def _softmax_sqrt_hessian(self) -> Tensor:
        """``[K, N, K]`` columns of cross-entropy's factor: ``diag(p) − p pᵀ = Σ_c √p_c (e_c − p) (√p_c (e_c − p))ᵀ``
        per sample, times the target mass and the reduction's scale. Five small kernels for class-index
        targets (softmax, root, scaled negation, outer product, diagonal): they run while the device
        waits for the first column pass, where each launch is idle device time."""
        p = self._probabilities()
        root = p.sqrt()
        factor = math.sqrt(self.scale)
        negative = p * -factor
        if self.target.is_floating_point():  # probability targets: their mass per sample
            root.mul_(self._target_mass().sqrt_())  # in both terms through the root
        columns = root.T[:, :, None] * negative[None]          # −√(scale·m_n)·√p_c·p_k
        columns.diagonal(dim1=0, dim2=2).add_(root, alpha=factor)  # + √(scale·m_n)·√p_c where k = c
        return columns

    def sqrt_hessian_mc(self, mc_samples: int = 1, generator: torch.Generator = None) -> Tensor:
        """Monte-Carlo factor ``[M, *f.shape]`` with ``E[S Sᵀ] = ∇²_f L`` (gradients at sampled targets)."""
        flat = self._flat()
        n, dim = flat.shape
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            p = self._probabilities()
            labels = torch.multinomial(p, mc_samples, replacement=True, generator=generator).T  # [M, N]
            columns = (p[None] - nn.functional.one_hot(labels, dim).to(p.dtype)) * self._target_mass().sqrt()
        elif isinstance(self.loss_fn, nn.MSELoss):
            noise = torch.randn(mc_samples, n, dim, dtype=flat.dtype, device=flat.device, generator=generator)
            columns = math.sqrt(2.0) * noise
        else:
            p = self._probabilities()
            samples = torch.bernoulli(p.expand(mc_samples, n, dim), generator=generator)
            columns = p[None] - samples
        return self._columns(columns * math.sqrt(self.scale / mc_samples))

    def gradient(self) -> Tensor:
        """``∂L/∂f`` (shaped like ``f``), by differentiating the loss re-evaluated on a detached output."""
        output = self.output.detach().requires_grad_(True)
        loss_fn, reduction = self.loss_fn, self.loss_fn.reduction
        with torch.enable_grad():
            if isinstance(loss_fn, nn.CrossEntropyLoss):
                loss = tf.cross_entropy(output, self.target, reduction=reduction, ignore_index=loss_fn.ignore_index)
            elif isinstance(loss_fn, nn.MSELoss):
                loss = tf.mse_loss(output, self.target, reduction=reduction)
            else:
                loss = tf.binary_cross_entropy_with_logits(output, self.target, reduction=reduction)
            return torch.autograd.grad(loss, output)[0]

    def empirical(self) -> Tensor:
        """Empirical-Fisher factor ``[1, *f.shape]``: per-sample gradients ``√scale · ∇ℓ_n``."""
        return (self.gradient() / math.sqrt(self.scale))[None]

    def hessian_diagonal(self) -> Tensor:
        """``diag(∇²_f L)`` shaped like ``f``."""
        flat = self._flat()
        if isinstance(self.loss_fn, nn.MSELoss):
            diagonal = torch.full_like(flat, 2.0)
        else:
            p = self._probabilities()
            diagonal = p * (1 - p) * self._target_mass()
        return (diagonal * self.scale).reshape(self.output.shape)
