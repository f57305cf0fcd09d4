"""Diagonal preconditioners: AdaHesScale, AdaHesScaleGN and a damped diagonal-GGN natural gradient.

**AdaHesScale** (Elsayed & Mahmood 2022, "HesScale: Scalable Computation of Hessian Diagonals";
Elsayed, Farrahi, Dangel & Mahmood, ICML 2024) is Adam with the HesScale diagonal ``h_t`` in place
of the squared gradient. We implement the Adam-style rule of the papers (the authors' code calls
it ``AdaHesScaleAdamStyle``)::

    m_t = β₁ m_{t−1} + (1 − β₁) g_t
    v_t = β₂ v_{t−1} + (1 − β₂) h_t²
    θ_t = θ_{t−1} − lr · (m_t / (1 − β₁ᵗ)) / (√(v_t / (1 − β₂ᵗ)) + ε)

with ``g_t`` the gradient plus ``weight_decay · θ`` (L2, as ``torch.optim.Adam``) and ``h_t`` the
HesScale diagonal of the loss as reduced (a ``mean`` loss includes its ``1/N``). HesScale is
computed on every step (the rule needs ``h_t`` each step). ``AdaHesScaleGN`` uses the
Gauss–Newton variant (``HesScaleGN``). Parameters for which HesScale gives no diagonal (modules
without a HesScale rule, skipped modules, layers whose output did not reach the loss) use
``h_t² = g_t²``, i.e. they are updated by Adam. HesScale has no rule for BatchNorm in train mode.

**DiagGGNNaturalGradient** preconditions any base optimizer with the damped GGN diagonal (exact
or Monte-Carlo; every layer type the engine supports), averaged as an exponential moving average
over curvature steps (``0, k, 2k, …`` for ``update_every = k``)::

    d ← ema · d + (1 − ema) · diag(GGN)     (the first update assigns)
    g ← g / (d + damping)                     then base.step()

Example::

    loss_fn = torch.nn.CrossEntropyLoss()
    opt = AdaHesScale(model, loss_fn, lr=3e-4)            # or AdaHesScaleGN
    opt = DiagGGNNaturalGradient(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1),
                                 fisher="mc", damping=1e-3)
    opt.zero_grad(); loss_fn(model(X), y).backward(); opt.step()
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

from curvlib.extensions import DiagGGNExact, DiagGGNMC, HesScale, HesScaleGN

from ..engine.layers import direct_parameters
from ._wrapper import CurvatureOptimizer, _check_number

_HESSCALE_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)


class _DiagonalOptimizer(CurvatureOptimizer):
    """Shared bookkeeping: one parameter-shaped statistic per optimized parameter of the tracked modules."""

    def _track(self) -> None:
        optimized = self._optimized_parameters()
        self._params: Dict[str, Tensor] = {}
        self._engine_skip = set()
        for name, module in self.model.named_modules():
            params = direct_parameters(module)
            if not params:
                continue
            ours = {pname: p for pname, p in params.items() if p in optimized}
            if module in self._skip_requested or not ours or not self._supported(module):
                self._engine_skip.add(module)
                continue
            for pname, p in ours.items():
                self._params[f"{name}/{pname}" if name else pname] = p
        if not self._params:
            raise ValueError(
                f"{type(self).__name__} found no module whose parameters are in the optimizer (and not in skip)"
            )
        self._keys = {p: key for key, p in self._params.items()}

    def _supported(self, module: nn.Module) -> bool:
        return True

    def _templates(self):
        return {key: (p.detach(), False) for key, p in self._params.items()}

    def _flatten(self, module, results):
        name = self._name(module)
        flat = {}
        for pname, value in results.items():
            key = f"{name}/{pname}" if name else pname
            if key in self._params:
                flat[key] = value
        return flat

    def _check_finite(self, statistics, step) -> Dict[str, Tensor]:
        finite = {k: v for k, v in statistics.items() if bool(torch.isfinite(v).all())}
        if len(finite) < len(statistics):
            warnings.warn(
                f"{type(self).__name__}: non-finite curvature for {sorted(set(statistics) - set(finite))} at step {step}; ignored"
            )
        return finite


class DiagGGNNaturalGradient(_DiagonalOptimizer):
    """Damped diagonal-GGN preconditioning of ``base``: ``g ← g / (d + damping)``, ``d`` the EMA of the GGN diagonal.

    Args:
        model, loss_fn, base: as :class:`~curvlib.optim.KFAC`.
        fisher: ``"exact"`` (:class:`~curvlib.extensions.DiagGGNExact`) or ``"mc"``
            (:class:`~curvlib.extensions.DiagGGNMC` with ``mc_samples``).
        damping: ``≥ 0``, added to the diagonal.
        ema: weight of the old diagonal in its moving average, in ``[0, 1)``.
        update_every: the diagonal is computed on steps ``0, k, 2k, …``.
        skip, memory_budget, batch_coupled, distributed, process_group, seed: see
            :class:`~curvlib.optim._wrapper.CurvatureOptimizer`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        base: torch.optim.Optimizer,
        *,
        fisher: str = "exact",
        mc_samples: int = 1,
        damping: float = 1e-3,
        ema: float = 0.95,
        update_every: int = 1,
        skip: Iterable = (),
        memory_budget: Optional[int] = None,
        batch_coupled="auto",
        distributed="auto",
        process_group=None,
        seed: int = 0,
    ):
        if fisher not in ("exact", "mc"):
            raise ValueError(f"fisher must be 'exact' or 'mc', got {fisher!r}")
        self._extension = DiagGGNExact() if fisher == "exact" else DiagGGNMC(mc_samples=mc_samples)
        self.fisher = fisher
        self.damping = _check_number("damping", damping)
        self.ema = _check_number("ema", ema, 0.0, 1.0, open_max=True)
        super().__init__(
            model, loss_fn, base, update_every=update_every, skip=skip, memory_budget=memory_budget,
            batch_coupled=batch_coupled, distributed=distributed, process_group=process_group, seed=seed,
        )
        self._diagonals: Dict[str, Tensor] = {}
        self._track()
        self._arm()

    def _describe(self):
        return f"fisher={self.fisher!r}, damping={self.damping}, ema={self.ema}, update_every={self.update_every}"

    def _extensions(self):
        return [self._extension]

    def _absorb(self, statistics, step):
        for key, value in self._check_finite(statistics, step).items():
            if key in self._diagonals:
                self._diagonals[key].mul_(self.ema).add_(value, alpha=1.0 - self.ema)
            else:
                self._diagonals[key] = value.clone()

    def diagonal(self, key: str) -> Optional[Tensor]:
        """The moving-average GGN diagonal of parameter ``"<module name>/<parameter name>"``."""
        return self._diagonals.get(key)

    def _transform(self, step):
        for key, p in self._params.items():
            d = self._diagonals.get(key)
            if d is not None and p.grad is not None:
                p.grad.div_(d.to(p.grad.dtype) + self.damping)

    def _extra_state(self):
        return {"diagonals": {k: v.clone() for k, v in self._diagonals.items()}}

    def _load_extra_state(self, state):
        if "diagonals" not in state:
            raise ValueError("DiagGGNNaturalGradient.load_state_dict: the curvature state lacks 'diagonals'")
        self._diagonals = {k: v.to(self._params[k].device).clone() for k, v in state["diagonals"].items()}


class AdaHesScale(_DiagonalOptimizer):
    """Adam with the HesScale diagonal in place of squared gradients (rule in the module docstring).

    Args:
        model: the network.
        loss_fn: the loss module the training loop calls.
        lr, betas, eps, weight_decay: as ``torch.optim.Adam`` (``weight_decay`` is L2, added to the gradient).
        params: parameters or param groups to optimize (default: the model's trainable parameters).
        skip, distributed, process_group: see :class:`~curvlib.optim._wrapper.CurvatureOptimizer`.

    The learning rate lives in ``param_groups`` (schedulers work as usual); ``betas``, ``eps`` and
    ``weight_decay`` are the optimizer's.
    """

    hesscale_type = HesScale

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        params=None,
        skip: Iterable = (),
        distributed="auto",
        process_group=None,
    ):
        lr = _check_number("lr", lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        self.betas = (
            _check_number("betas[0]", betas[0], 0.0, 1.0, open_max=True),
            _check_number("betas[1]", betas[1], 0.0, 1.0, open_max=True),
        )
        self.eps = _check_number("eps", eps)
        self.weight_decay = _check_number("weight_decay", weight_decay)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        # the step is lr · direction: plain SGD applies it, so the learning rate stays in param_groups
        base = torch.optim.SGD(params, lr=lr)
        super().__init__(
            model, loss_fn, base, update_every=1, skip=skip, distributed=distributed, process_group=process_group
        )
        self._hessians: Dict[str, Tensor] = {}
        self._moments: Dict[Tensor, Dict[str, Tensor]] = {}
        self._track()
        self._arm()

    def _describe(self):
        return f"betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay}"

    def _supported(self, module):
        return isinstance(module, _HESSCALE_MODULES)

    def _extensions(self):
        return [self.hesscale_type()]

    def _absorb(self, statistics, step):
        self._hessians = self._check_finite(statistics, step)

    def _transform(self, step):
        beta1, beta2 = self.betas
        hessians, self._hessians = self._hessians, {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
                state = self._moments.get(p)
                if state is None:
                    state = self._moments[p] = {
                        "step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_hessian_sq": torch.zeros_like(p)
                    }
                state["step"] += 1
                h = hessians.get(self._keys.get(p)) if p in self._keys else None
                h = grad if h is None else h.to(grad.dtype)  # no HesScale diagonal: Adam's g²
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_hessian_sq"].mul_(beta2).addcmul_(h, h, value=1 - beta2)
                correction1 = 1 - beta1 ** state["step"]
                correction2 = 1 - beta2 ** state["step"]
                denominator = (state["exp_avg_hessian_sq"].sqrt() / math.sqrt(correction2)).add_(self.eps)
                p.grad.copy_(state["exp_avg"] / correction1 / denominator)

    def _ordered_parameters(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _extra_state(self):
        index = {p: i for i, p in enumerate(self._ordered_parameters())}
        return {"moments": {index[p]: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in s.items()}
                            for p, s in self._moments.items() if p in index}}

    def _load_extra_state(self, state):
        if "moments" not in state:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the curvature state lacks 'moments'")
        params = self._ordered_parameters()
        self._moments = {}
        for i, s in state["moments"].items():
            p = params[int(i)]
            self._moments[p] = {k: (v.to(p.device).clone() if isinstance(v, Tensor) else v) for k, v in s.items()}


class AdaHesScaleGN(AdaHesScale):
    """AdaHesScale with the Gauss–Newton HesScale diagonal (``HesScaleGN``: no second-derivative terms of activations)."""

    hesscale_type = HesScaleGN
