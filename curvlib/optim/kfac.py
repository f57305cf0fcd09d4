"""KFAC: Kronecker-factored natural-gradient preconditioning of any ``torch.optim`` optimizer.

For a Linear or (grouped, transposed, N-d) convolution layer the engine's KFAC factors
(:class:`curvlib.extensions.KFACExpand` / :class:`~curvlib.extensions.KFACReduce`) give, per channel
group ``g``, an input factor ``A_g`` ``[D, D]`` and an output factor ``G_g`` ``[E, E]`` with
``G_g ⊗ A_g`` ≈ the GGN/Fisher block of ``W_g`` ``[E, D]`` (a ``mean`` loss includes its ``1/N``).
KFAC replaces the weight gradient by

    Δ_g = (G_g + δ_G I)⁻¹ ∇W_g (A_g + δ_A I)⁻¹

and lets the base optimizer (SGD, Adam, …: momentum, weight decay, learning-rate schedule) take
its step with ``Δ`` in place of the gradient.

**Layout of ``W_g``.** Conv/Linear: the rows of ``weight.flatten(1)`` of group ``g``
(``E = C_out/G``, ``D = C_in/G · ∏K``). ConvTranspose: ``W_g[e, (d, k)] = weight[g·C_in/G + d, e, k]``.

**Bias.** Weight and bias are preconditioned separately (the factors have no weight–bias cross
term): the bias block is ``G_g ⊗ a`` with the scalar input factor ``a`` = number of output
locations (expand) or 1 (reduce), so ``Δb_g = (G_g + δ'_G I)⁻¹ ∇b_g / (a + δ'_A)``.

**Damping** ``λ`` (``damping``, Tikhonov), split between the factors by ``damping_split``:

- ``"pi"`` (default; Martens & Grosse 2015, π-heuristic): ``π = √((tr A/dim A) / (tr G/dim G))``,
  ``δ_A = π√λ``, ``δ_G = √λ/π`` (``π = 1`` if a trace is zero);
- ``"sqrt"``: ``δ_A = δ_G = √λ``;
- ``"exact"`` (needs ``inverse="eigen"``): ``(G ⊗ A + λ I)⁻¹`` exactly, through the
  eigendecompositions ``G = Q_G Λ_G Q_Gᵀ``, ``A = Q_A Λ_A Q_Aᵀ``:
  ``Δ = Q_G [(Q_Gᵀ ∇W Q_A) / (λ_G λ_Aᵀ + λ)] Q_Aᵀ``.

**Schedule.** Factors are computed on steps ``0, f, 2f, …`` (``factor_update_every = f``) and
averaged as an exponential moving average ``F ← ema·F + (1 − ema)·F_new`` (the first update
assigns). Inverses (or eigendecompositions) are recomputed from the current factors on steps
``0, i, 2i, …`` (``inverse_update_every = i``) if the factors or the damping changed since the
last inversion, and on the first step that has factors. Between updates the last inverses are
reused, and on steps that collect no factors no hook runs.

**Inverse** ``"cholesky"`` (default): Cholesky of the damped factor, retried in float64 if it fails
in the factor's dtype; ``"eigen"``: ``torch.linalg.eigh`` (float64 retry on failure), eigenvalues
clamped at 0. ``factor_dtype`` sets the dtype of factors and inverses (default: the parameter's
dtype, float32 for half-precision parameters); the gradient is cast to it and back.

**KL clipping** (``kl_clip = κ``, Ba et al. 2017): all preconditioned updates are scaled by
``ν = min(1, √(κ / Σ_p lr_p² ⟨Δ_p, ∇_p⟩))``, ``lr_p`` the learning rate of ``p``'s param group.

**Parameters without Kronecker form** (BatchNorm, LayerNorm, Embedding …, layers in ``skip``,
layers that have not received factors yet) keep their gradient: the base optimizer takes its plain
step on them. After ``step()``, ``p.grad`` holds the preconditioned direction.

**AMP / GradScaler.** The type-2 and Monte-Carlo factors are computed from the loss module's
inputs, so loss scaling does not touch them; empirical factors come from the scaled backward pass
and are divided by the scale² when the scaler is given as ``grad_scaler``. Under ``autocast`` the
factors are cast to ``factor_dtype``; a step whose factors are not finite (an overflow) keeps the
previous factors. Use it as usual: ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``.

Example::

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                             torch.nn.Linear(4 * 6 * 6, 10))
    >>> loss_fn = torch.nn.CrossEntropyLoss()
    >>> opt = KFAC(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
    ...            approx="reduce", fisher="mc", damping=1e-3, ema=0.95,
    ...            factor_update_every=10, inverse_update_every=50)
    >>> X, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    >>> opt.zero_grad(); loss_fn(model(X), y).backward(); opt.step()
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, Optional

import torch
from torch import Tensor, nn

from curvlib.extensions import KFACExpand, KFACReduce

from ..engine.layers import CONV_TRANSPOSE_TYPES, direct_parameters, layer_kind
from ._linalg import damped_inverse, inverse_from_eigh, symmetric_eigh
from ._wrapper import CurvatureOptimizer, _check_int, _check_number

APPROXIMATIONS = ("expand", "reduce")
DAMPING_SPLITS = ("pi", "sqrt", "exact")
INVERSES = ("cholesky", "eigen")


class _Layer:
    """A layer KFAC preconditions: its weight layout and which of its parameters are optimized."""

    def __init__(self, name: str, module: nn.Module, optimized: set):
        self.name = name
        self.module = module
        params = direct_parameters(module)
        self.weight = params.get("weight") if params.get("weight") in optimized else None
        self.bias = params.get("bias") if params.get("bias") in optimized else None
        self.transposed = isinstance(module, CONV_TRANSPOSE_TYPES)
        weight = module.weight
        self.groups = getattr(module, "groups", 1)
        if layer_kind(module) == "linear":
            self.out_dim, self.in_dim = weight.shape
        elif self.transposed:
            self.out_dim = weight.shape[1]
            self.in_dim = weight.shape[0] // self.groups * math.prod(weight.shape[2:])
        else:
            self.out_dim = weight.shape[0] // self.groups
            self.in_dim = weight.shape[1] * math.prod(weight.shape[2:])

    def to_blocks(self, tensor: Tensor) -> Tensor:
        """Weight-shaped ``tensor`` → ``[G, E, D]`` (``W_g`` per group)."""
        g, e = self.groups, self.out_dim
        if self.transposed:
            c_in_g = tensor.shape[0] // g
            return tensor.reshape(g, c_in_g, e, *tensor.shape[2:]).movedim(2, 1).reshape(g, e, -1)
        return tensor.reshape(g, e, -1)

    def from_blocks(self, blocks: Tensor, like: Tensor) -> Tensor:
        """``[G, E, D]`` → the weight's layout."""
        if self.transposed:
            g, e = self.groups, self.out_dim
            c_in_g = like.shape[0] // g
            return blocks.reshape(g, e, c_in_g, *like.shape[2:]).movedim(1, 2).reshape(like.shape)
        return blocks.reshape(like.shape)


class KFAC(CurvatureOptimizer):
    """KFAC-preconditioned ``base`` optimizer (see the module docstring for the exact rules).

    Args:
        model: the network (Linear and convolution layers are preconditioned; every other
            parameter keeps the base optimizer's plain update).
        loss_fn: the loss module the training loop calls (``CrossEntropyLoss``, ``MSELoss``,
            ``BCEWithLogitsLoss``; ``mean`` or ``sum``).
        base: any ``torch.optim.Optimizer`` over (some of) the model's parameters.
        approx: ``"expand"`` (KFC) or ``"reduce"`` factors.
        fisher: ``"type-2"`` (exact GGN factors), ``"mc"`` (``mc_samples`` sampled targets) or
            ``"empirical"``.
        damping: Tikhonov damping ``λ ≥ 0`` (may be changed between steps: ``opt.damping = …``;
            it takes effect at the next inverse update).
        damping_split: ``"pi"``, ``"sqrt"`` or ``"exact"`` (see the module docstring).
        ema: weight of the old factors in their moving average, in ``[0, 1)``.
        factor_update_every, inverse_update_every: intervals in steps (both count from step 0).
        inverse: ``"cholesky"`` or ``"eigen"``.
        kl_clip: ``None`` or ``κ > 0`` (KL clipping of the update).
        factor_dtype: dtype of factors and inverses (default: see the module docstring).
        skip: modules (or module names) to leave to the base optimizer.
        grad_scaler: the ``torch.amp.GradScaler`` in use (only needed for ``fisher="empirical"``).
        memory_budget: bytes for the engine's backpropagated columns (``curvlib.curvature``).
        batch_coupled: ``False`` (default: factors from per-sample messages, as common KFAC
            implementations do with BatchNorm), ``True`` or ``"auto"`` (``curvlib.curvature``).
        distributed, process_group: average factors over ranks (see :mod:`curvlib.optim.distributed`).
        seed: seed of the Monte-Carlo generator.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        base: torch.optim.Optimizer,
        *,
        approx: str = "expand",
        fisher: str = "mc",
        mc_samples: int = 1,
        damping: float = 1e-3,
        damping_split: str = "pi",
        ema: float = 0.95,
        factor_update_every: int = 1,
        inverse_update_every: int = 10,
        inverse: str = "cholesky",
        kl_clip: Optional[float] = None,
        factor_dtype: Optional[torch.dtype] = None,
        skip: Iterable = (),
        grad_scaler=None,
        memory_budget: Optional[int] = None,
        batch_coupled=False,
        distributed="auto",
        process_group=None,
        seed: int = 0,
    ):
        if approx not in APPROXIMATIONS:
            raise ValueError(f"approx must be one of {APPROXIMATIONS}, got {approx!r}")
        extension_type = KFACExpand if approx == "expand" else KFACReduce
        self._extension = extension_type(fisher=fisher, mc_samples=mc_samples)  # validates fisher, mc_samples
        if inverse not in INVERSES:
            raise ValueError(f"inverse must be one of {INVERSES}, got {inverse!r}")
        if damping_split not in DAMPING_SPLITS:
            raise ValueError(f"damping_split must be one of {DAMPING_SPLITS}, got {damping_split!r}")
        if damping_split == "exact" and inverse != "eigen":
            raise ValueError("damping_split='exact' needs inverse='eigen' (it damps the eigenvalues of G ⊗ A)")
        self.damping = _check_number("damping", damping)
        self.ema = _check_number("ema", ema, 0.0, 1.0, open_max=True)
        self.factor_update_every = _check_int("factor_update_every", factor_update_every)
        self.inverse_update_every = _check_int("inverse_update_every", inverse_update_every)
        if kl_clip is not None:
            kl_clip = _check_number("kl_clip", kl_clip)
            if kl_clip == 0:
                raise ValueError("kl_clip must be None or a positive number, got 0")
        if factor_dtype is not None and (not isinstance(factor_dtype, torch.dtype) or not factor_dtype.is_floating_point):
            raise ValueError(f"factor_dtype must be None or a floating torch.dtype, got {factor_dtype!r}")
        if grad_scaler is not None and not hasattr(grad_scaler, "get_scale"):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        if batch_coupled not in ("auto", True, False):
            raise ValueError(f"batch_coupled must be 'auto', True or False, got {batch_coupled!r}")
        self.approx = approx
        self.fisher = fisher
        self.damping_split = damping_split
        self.inverse = inverse
        self.kl_clip = kl_clip
        self.factor_dtype = factor_dtype
        self.grad_scaler = grad_scaler
        super().__init__(
            model,
            loss_fn,
            base,
            update_every=self.factor_update_every,
            skip=skip,
            memory_budget=memory_budget,
            batch_coupled=batch_coupled,
            distributed=distributed,
            process_group=process_group,
            seed=seed,
        )
        self._factors: Dict[str, Tensor] = {}
        self._inverses: Dict[str, Dict[str, Tensor]] = {}
        # factor updates per layer, and (updates, damping) the layer's inverses were computed from:
        # an inverse update with neither changed is skipped
        self._versions: Dict[str, int] = {}
        self._inverted: Dict[str, tuple] = {}
        self._track()
        self._arm()

    def _describe(self) -> str:
        return (
            f"approx={self.approx!r}, fisher={self.fisher!r}, damping={self.damping}, damping_split={self.damping_split!r}, "
            f"ema={self.ema}, factor_update_every={self.factor_update_every}, "
            f"inverse_update_every={self.inverse_update_every}, inverse={self.inverse!r}, kl_clip={self.kl_clip}"
        )

    # ------------------------------------------------------------------------------------------
    # which layers

    def _track(self) -> None:
        optimized = self._optimized_parameters()
        self._layers: Dict[str, _Layer] = {}
        self._engine_skip = set()
        fallback = []
        for name, module in self.model.named_modules():
            params = direct_parameters(module)
            if not params:
                continue
            kfac_form = layer_kind(module) in ("conv", "linear") and getattr(module, "weight", None) is not None
            if module in self._skip_requested or not kfac_form or not any(p in optimized for p in params.values()):
                self._engine_skip.add(module)
                if any(p in optimized for p in params.values()):
                    fallback.append(name or type(module).__name__)
                continue
            self._layers[name] = _Layer(name, module, optimized)
        if not self._layers:
            kinds = sorted({type(m).__name__ for m in self.model.modules() if direct_parameters(m)})
            raise ValueError(
                "KFAC found no Linear or convolution layer whose parameters are in the base optimizer "
                f"(and not in skip); the model's layers with parameters are: {kinds or 'none'}"
            )
        #: names of modules whose optimized parameters get the base optimizer's plain update
        self.plain_update_modules = fallback

    def _dtype(self, layer: _Layer) -> torch.dtype:
        if self.factor_dtype is not None:
            return self.factor_dtype
        dtype = layer.module.weight.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def _extensions(self):
        return [self._extension]

    # ------------------------------------------------------------------------------------------
    # statistics

    def _templates(self):
        templates = {}
        for name, layer in self._layers.items():
            device, dtype = layer.module.weight.device, self._dtype(layer)
            g = layer.groups
            templates[f"{name}/G"] = (torch.empty(g, layer.out_dim, layer.out_dim, dtype=dtype, device=device), True)
            if layer.weight is not None:
                templates[f"{name}/A"] = (torch.empty(g, layer.in_dim, layer.in_dim, dtype=dtype, device=device), True)
            if layer.bias is not None:
                templates[f"{name}/a"] = (torch.empty(g, 1, 1, dtype=dtype, device=device), False)
        return templates

    def _flatten(self, module: nn.Module, results: Dict) -> Dict[str, Tensor]:
        name = self._name(module)
        layer = self._layers.get(name)
        if layer is None:
            return {}
        dtype = self._dtype(layer)
        flat = {}
        if "weight" in results and layer.weight is not None:
            flat[f"{name}/A"] = results["weight"].input.to(dtype)
            flat[f"{name}/G"] = results["weight"].output.to(dtype)
        if "bias" in results and layer.bias is not None:
            flat[f"{name}/a"] = results["bias"].input.to(dtype)
            flat[f"{name}/G"] = results["bias"].output.to(dtype)
        return flat

    def _prepare(self, statistics):
        if self.fisher == "empirical" and self.grad_scaler is not None and self.grad_scaler.is_enabled():
            # empirical factors come from the scaled backward pass: undo the scale² on the output factor
            scale = float(self.grad_scaler.get_scale())
            statistics = {k: v / scale**2 if k.endswith("/G") else v for k, v in statistics.items()}
        return statistics

    def _absorb(self, statistics, step):
        for name in self._layers:
            keys = [k for k in (f"{name}/A", f"{name}/G", f"{name}/a") if k in statistics]
            if not keys:
                continue
            if not all(bool(torch.isfinite(statistics[k]).all()) for k in keys):
                warnings.warn(f"KFAC: non-finite factors for layer {name!r} at step {step} (overflow?); kept the previous ones")
                continue
            for key in keys:
                value = statistics[key]
                if key in self._factors:
                    self._factors[key].mul_(self.ema).add_(value, alpha=1.0 - self.ema)
                else:
                    self._factors[key] = value.clone().contiguous()
            self._versions[name] = self._versions.get(name, 0) + 1

    def factors(self, module) -> Dict[str, Tensor]:
        """Current (moving-average) factors of a layer (module or name): ``{"A", "G", "a"}`` as available."""
        name = module if isinstance(module, str) else self._name(module)
        return {k.split("/")[-1]: v for k, v in self._factors.items() if k.rsplit("/", 1)[0] == name}

    # ------------------------------------------------------------------------------------------
    # inverses

    def _damping_terms(self, A: Tensor, G: Tensor):
        """``(δ_A, δ_G)`` per group for factors ``A`` ``[G, D, D]``, ``G`` ``[G, E, E]``."""
        root = math.sqrt(self.damping)
        if self.damping_split == "sqrt":
            ones = torch.ones(A.shape[0], dtype=A.dtype, device=A.device)
            return root * ones, root * ones
        mean_a = A.diagonal(dim1=-2, dim2=-1).mean(-1)
        mean_g = G.diagonal(dim1=-2, dim2=-1).mean(-1).to(A.dtype)
        pi = torch.where((mean_a > 0) & (mean_g > 0), (mean_a / mean_g.clamp_min(1e-300)).sqrt(), torch.ones_like(mean_a))
        return root * pi, root / pi

    def _compute_inverses(self, name: str) -> None:
        G = self._factors.get(f"{name}/G")
        if G is None:
            return
        layer = self._layers[name]
        A = self._factors.get(f"{name}/A")
        a = self._factors.get(f"{name}/a")
        result: Dict[str, Tensor] = {}
        if self.damping_split == "exact":
            values_g, vectors_g = symmetric_eigh(G)
            result["QG"], result["lG"] = vectors_g, values_g
            if A is not None and layer.weight is not None:
                result["lA"], result["QA"] = symmetric_eigh(A)
            if a is not None and layer.bias is not None:
                # (a G + λ I)⁻¹ with the scalar input factor a
                scale = 1.0 / (a.reshape(-1, 1) * values_g + self.damping)
                result["Gb"] = (vectors_g * scale[:, None, :]) @ vectors_g.mT
            self._inverses[name] = result
            return
        invert = damped_inverse if self.inverse == "cholesky" else (lambda m, d: inverse_from_eigh(*symmetric_eigh(m), d))
        if A is not None and layer.weight is not None:
            delta_a, delta_g = self._damping_terms(A, G)
            result["A"] = invert(A, delta_a)
            result["G"] = invert(G, delta_g)
        if a is not None and layer.bias is not None:
            delta_a, delta_g = self._damping_terms(a, G)
            if self.damping_split == "sqrt" and "G" in result:
                g_inverse = result["G"]
            else:
                g_inverse = invert(G, delta_g)
            result["Gb"] = g_inverse / (a.reshape(-1) + delta_a).reshape(-1, 1, 1)
        self._inverses[name] = result

    # ------------------------------------------------------------------------------------------
    # preconditioning

    def _transform(self, step):
        due = step % self.inverse_update_every == 0
        for name in self._layers:
            if f"{name}/G" not in self._factors:
                continue
            current = (self._versions.get(name, 0), self.damping)
            if name not in self._inverses or (due and self._inverted.get(name) != current):
                self._compute_inverses(name)
                self._inverted[name] = current
        lrs = self._parameter_lrs() if self.kl_clip is not None else None
        updates = []
        for name, layer in self._layers.items():
            inverses = self._inverses.get(name)
            if inverses is None:
                continue  # no factors yet: plain update
            if layer.weight is not None and layer.weight.grad is not None and ("A" in inverses or "QA" in inverses):
                grad = layer.weight.grad
                dtype = (inverses.get("A") if "A" in inverses else inverses["QA"]).dtype
                blocks = layer.to_blocks(grad).to(dtype)
                if "QA" in inverses:
                    QG, QA = inverses["QG"], inverses["QA"]
                    rotated = QG.mT @ blocks @ QA
                    rotated = rotated / (inverses["lG"][:, :, None] * inverses["lA"][:, None, :] + self.damping)
                    delta = QG @ rotated @ QA.mT
                else:
                    delta = inverses["G"] @ blocks @ inverses["A"]
                updates.append((layer.weight, layer.from_blocks(delta, grad).to(grad.dtype)))
            if layer.bias is not None and layer.bias.grad is not None and "Gb" in inverses:
                grad = layer.bias.grad
                Gb = inverses["Gb"]
                delta = Gb @ grad.reshape(layer.groups, layer.out_dim, 1).to(Gb.dtype)
                updates.append((layer.bias, delta.reshape(grad.shape).to(grad.dtype)))
        scale = 1.0
        if self.kl_clip is not None and updates:
            vg = sum(lrs[p] ** 2 * float((delta.double() * p.grad.double()).sum()) for p, delta in updates)
            if vg > 0:
                scale = min(1.0, math.sqrt(self.kl_clip / vg))
        self.last_kl_scale = scale
        for p, delta in updates:
            p.grad.copy_(delta if scale == 1.0 else delta * scale)

    # ------------------------------------------------------------------------------------------
    # state

    def _extra_state(self):
        return {
            "factors": {k: v.clone() for k, v in self._factors.items()},
            "inverses": {name: {k: v.clone() for k, v in inv.items()} for name, inv in self._inverses.items()},
            "versions": dict(self._versions),
            "inverted": dict(self._inverted),
        }

    def _load_extra_state(self, state):
        missing = [k for k in ("factors", "inverses") if k not in state]
        if missing:
            raise ValueError(f"KFAC.load_state_dict: the curvature state lacks {missing}")
        unknown = sorted({k.rsplit("/", 1)[0] for k in state["factors"]} - set(self._layers))
        if unknown:
            raise ValueError(f"KFAC.load_state_dict: the state has factors of layers this optimizer does not precondition: {unknown}")
        def device_of(name):
            return self._layers[name].module.weight.device
        self._factors = {k: v.to(device_of(k.rsplit("/", 1)[0])).clone() for k, v in state["factors"].items()}
        self._inverses = {
            name: {k: v.to(device_of(name)).clone() for k, v in inv.items()} for name, inv in state["inverses"].items()
        }
        self._versions = dict(state.get("versions", {}))
        self._inverted = {name: tuple(value) for name, value in state.get("inverted", {}).items()}
