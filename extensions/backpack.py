"""BackPACK plug-in: curvlib's tensor-network convolution kernels as BackPACK module extensions.

`BackPACK <https://backpack.pt>`_ (``backpack-for-pytorch``) computes the weight quantities of
``Conv{1,2,3}d`` and ``ConvTranspose{1,2,3}d`` layers by unfolding the layer input (im2col). This
module registers replacements that compute them through :mod:`curvlib.functional` instead, on the
quantities BackPACK backpropagates (the loss-Hessian square root ``backproped`` ``[C, N, C_out, *O]``
and the stored layer input ``module.input0``). Everything else (losses, activations, Linear,
backpropagation to the layer input, biases) stays BackPACK's own code, so results are BackPACK's
to round-off.

Install BackPACK without a second torch
---------------------------------------
``backpack-for-pytorch`` declares ``torchvision`` as a dependency but imports it only in
``backpack.utils.examples`` (MNIST loaders). An unconstrained ``pip install backpack-for-pytorch``
resolves the newest torchvision, which pins a newer torch, and pip then replaces the installed
torch by a CUDA build (a 540 MB wheel plus the NVIDIA CUDA wheels). Install BackPACK and its two
pure-Python dependencies without dependency resolution (≈ 0.3 MB, about a second; torch stays
the one already installed; ``pip check`` then reports the missing torchvision, which is harmless)::

    pip install --no-deps "backpack-for-pytorch>=1.6" "einops>=0.3,<1" "unfoldNd>=0.2,<1"

Alternatively ``bash scripts/setup.sh backpack`` installs the ``backpack`` extra with the installed
torch pinned (``pip install -c <(echo torch==2.13.0) -e ".[backpack]"``): no second torch either,
but ≈ 15 MB of torchvision 0.28 and pillow, and that PyPI torchvision is a CUDA build whose
``import torchvision`` fails next to a ``+cpu`` torch (BackPACK never imports it).

Usage
-----
>>> import torch
>>> from backpack import backpack, extend
>>> from backpack.extensions import DiagGGNExact, KFLR
>>> from curvlib.extensions.backpack import use_curvlib
>>> _ = torch.manual_seed(0)
>>> model = extend(torch.nn.Sequential(
...     torch.nn.Conv2d(3, 4, 3, groups=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)))
>>> lossfunc = extend(torch.nn.CrossEntropyLoss())
>>> X, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
>>> with backpack(use_curvlib(DiagGGNExact()), use_curvlib(KFLR())):
...     lossfunc(model(X), y).backward()
>>> model[0].weight.diag_ggn_exact.shape
torch.Size([4, 3, 3, 3])
>>> [tuple(f.shape) for f in model[0].weight.kflr]     # [Γ, Ω]: Γ ⊗ Ω ≈ GGN of weight.flatten()
[(4, 4), (27, 27)]

``curvlib_extensions("DiagGGNExact", "KFAC", ...)`` builds fresh BackPACK extensions with the
plug-in registered; without names it builds :data:`COMMON`.

What is registered (``overwrite=True``, for Conv1d/2d/3d and ConvTranspose1d/2d/3d)
-----------------------------------------------------------------------------------
=================================  ===========================================================
BackPACK extension                 weight quantity computed by
=================================  ===========================================================
``DiagGGNExact``, ``DiagGGNMC``    :func:`curvlib.functional.ggn_diag` of ``backproped``
``BatchDiagGGNExact``, ``…MC``     ``ggn_diag(..., per_sample=True)``
``DiagHessian``                    ``Σ_sign sign · ggn_diag`` of BackPACK's signed square roots
``BatchDiagHessian``               the same, ``per_sample=True``
``KFAC``, ``KFLR``, ``KFRA``       Ω = :func:`curvlib.functional.kfc` (Γ from BackPACK's code)
``SqrtGGNExact``, ``SqrtGGNMC``    :func:`curvlib.functional.weight_vjp` ``(per_sample, columns)``
``BatchGrad``                      ``weight_vjp(..., per_sample=True)`` of the output gradient
=================================  ===========================================================

Biases keep BackPACK's implementation (subclasses of BackPACK's own module extensions override
only ``weight``). ``subsampling`` (SqrtGGN, BatchGrad) is honoured: the layer input is subsampled
like BackPACK's ``backproped``.

Normalisation. BackPACK's KFAC/KFLR/KFRA factors for a convolution are ``[Γ, Ω]`` with
``Γ = Σ_{c,n} (Σ_o S_{c,n,:,o})(Σ_o S_{c,n,:,o})ᵀ`` (the bias GGN, ``|O|`` times the KFC paper's Γ)
and ``Ω = 1/N Σ_n Σ_o u_{n,o} u_{n,o}ᵀ`` (``u`` the unfolded input, i.e. ``einsum("bik,bjk->ij", X, X)
/ N``). That is exactly what :func:`curvlib.functional.kfc` returns (``1/N Σ_n Σ_o``), so no rescaling
is needed; the tests compare both to round-off.

What BackPACK refuses and the plug-in handles
---------------------------------------------
* **Grouped convolutions with KFAC/KFLR/KFRA** (BackPACK raises ``NotImplementedError: groups ≠ 1
  is not supported by KFLR (got G)``, for Conv and ConvTranspose). The exact Kronecker
  approximation of a grouped layer is block-diagonal over groups: group ``g``'s weight
  ``W_g`` ``[E, D]`` (``E = C_out // G`` output channels, ``D = C_in // G · ∏K``; rows of
  ``weight.flatten(1)`` of that group, for ConvTranspose ``W_g[e, (d, k)] = weight[g·C_in/G + d, e, k]``)
  gets ``Γ_g ⊗ Ω_g`` with ``Γ_g`` the ``g``-th diagonal ``[E, E]`` block of Γ and ``Ω_g`` group ``g``'s
  input factor. The stored list depends on ``group_layout`` (an argument of :func:`use_curvlib`):

  - ``"block_diag"`` (default): ``[torch.block_diag(Γ_1, …, Γ_G), torch.block_diag(Ω_1, …, Ω_G)]``,
    ``[C_out, C_out]`` and ``[C_in·∏K, C_in·∏K]``, BackPACK's two-matrix format. Their Kronecker
    product is the approximation for the *dense equivalent* weight ``[C_out, C_in·∏K]`` (zero
    outside the diagonal group blocks): restricted to the entries a grouped weight has, it is
    exactly ``⊕_g Γ_g ⊗ Ω_g`` (the cross-group products vanish because both factors are
    block-diagonal), so ``(Γ ⊗ Ω) vec(W_dense)`` is the matrix-vector product with a grouped
    weight embedded in the dense layout.
  - ``"stacked"``: ``[Γ_g stacked [G, E, E], Ω_g stacked [G, D, D]]``, curvlib's own layout.

  :func:`kron_to_dense` turns either layout (and the ungrouped one) into the dense
  ``[|w|, |w|]`` matrix in ``module.weight.flatten()`` order.
* ``ConvTranspose`` layers with ``output_padding > 0`` (or an ``output_size`` in the forward call):
  BackPACK unfolds their input with ``output_padding=0``; DiagGGN, DiagHessian, SqrtGGN and
  BatchGrad fail on the shape mismatch, and KFAC/KFLR/KFRA silently return a wrong Ω. curvlib reads
  the layer's actual output size.
* ``padding_mode`` other than ``"zeros"`` (``reflect``, ``replicate``, ``circular``): BackPACK ignores
  it (wrong weight quantities); the plug-in pads the input explicitly, so the layer's own weight
  quantity is correct. BackPACK's backpropagation *through* such a layer (to earlier layers) still
  ignores the padding mode, so a warning is emitted when the layer input requires grad.
* ``padding="same"`` (also with even kernels, i.e. asymmetric padding): BackPACK's unfold receives
  the string and fails for DiagGGN, DiagHessian and KFAC/KFLR/KFRA.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from curvlib import functional as F

try:
    import backpack  # noqa: F401
    from backpack.extensions import (
        HBP,
        KFAC,
        KFLR,
        KFRA,
        BatchDiagGGNExact,
        BatchDiagGGNMC,
        BatchDiagHessian,
        BatchGrad,
        DiagGGNExact,
        DiagGGNMC,
        DiagHessian,
        SqrtGGNExact,
        SqrtGGNMC,
    )
    from backpack.extensions.backprop_extension import BackpropExtension
    from backpack.extensions.firstorder.batch_grad import conv1d as _bg1, conv2d as _bg2, conv3d as _bg3
    from backpack.extensions.firstorder.batch_grad import (
        conv_transpose1d as _bgt1,
        conv_transpose2d as _bgt2,
        conv_transpose3d as _bgt3,
    )
    from backpack.extensions.secondorder.diag_ggn import BatchDiagGGN, DiagGGN
    from backpack.extensions.secondorder.diag_ggn import conv1d as _dg1, conv2d as _dg2, conv3d as _dg3
    from backpack.extensions.secondorder.diag_ggn import (
        convtranspose1d as _dgt1,
        convtranspose2d as _dgt2,
        convtranspose3d as _dgt3,
    )
    from backpack.extensions.secondorder.diag_hessian import conv1d as _dh1, conv2d as _dh2, conv3d as _dh3
    from backpack.extensions.secondorder.diag_hessian import (
        convtranspose1d as _dht1,
        convtranspose2d as _dht2,
        convtranspose3d as _dht3,
    )
    from backpack.extensions.secondorder.hbp import conv1d as _hb1, conv2d as _hb2, conv3d as _hb3
    from backpack.extensions.secondorder.hbp import (
        conv_transpose1d as _hbt1,
        conv_transpose2d as _hbt2,
        conv_transpose3d as _hbt3,
    )
    from backpack.extensions.secondorder.hbp.hbp_options import BackpropStrategy, ExpectationApproximation
    from backpack.extensions.secondorder.sqrt_ggn import SqrtGGN
    from backpack.extensions.secondorder.sqrt_ggn import convnd as _sq, convtransposend as _sqt
except ImportError as error:  # pragma: no cover - exercised only without BackPACK
    raise ImportError(
        "curvlib.extensions.backpack needs BackPACK; install it without a second torch with\n"
        '    pip install --no-deps "backpack-for-pytorch>=1.6" "einops>=0.3,<1" "unfoldNd>=0.2,<1"'
    ) from error

__all__ = [
    "COMMON",
    "GROUP_LAYOUTS",
    "SUPPORTED",
    "use_curvlib",
    "curvlib_extensions",
    "kron_to_dense",
]

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
GROUP_LAYOUTS = ("block_diag", "stacked")

#: names accepted by :func:`curvlib_extensions`, mapped to the BackPACK extension classes
SUPPORTED = {
    "DiagGGNExact": DiagGGNExact,
    "DiagGGNMC": DiagGGNMC,
    "BatchDiagGGNExact": BatchDiagGGNExact,
    "BatchDiagGGNMC": BatchDiagGGNMC,
    "DiagHessian": DiagHessian,
    "BatchDiagHessian": BatchDiagHessian,
    "KFAC": KFAC,
    "KFLR": KFLR,
    "KFRA": KFRA,
    "SqrtGGNExact": SqrtGGNExact,
    "SqrtGGNMC": SqrtGGNMC,
    "BatchGrad": BatchGrad,
}
#: what :func:`curvlib_extensions` builds when no names are given
COMMON = ("DiagGGNExact", "DiagGGNMC", "DiagHessian", "KFAC", "KFLR")
_TAKES_MC_SAMPLES = ("DiagGGNMC", "BatchDiagGGNMC", "KFAC", "SqrtGGNMC")


# ----------------------------------------------------------------------------------------------
# the layer as curvlib.functional sees it


def _weight_kwargs(ext: BackpropExtension, module: nn.Module) -> Tuple[Tensor, dict]:
    """``(x, kwargs)`` for the weight-side functions of :mod:`curvlib.functional`.

    ``x`` is ``module.input0`` (subsampled like BackPACK's backpropagated quantities when the
    extension has ``subsampling``), explicitly padded for a ``padding_mode`` other than zeros.
    """
    x = module.input0
    subsampling = ext.get_subsampling()
    if subsampling is not None:
        x = x[subsampling]
    transposed = isinstance(module, CONV_TRANSPOSE)
    padding = module.padding
    if not transposed and module.padding_mode != "zeros":
        x = torch.nn.functional.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
        if module.input0.requires_grad:
            warnings.warn(
                f"{type(module).__name__} with padding_mode={module.padding_mode!r}: curvlib computes this layer's "
                "weight quantity with the padding mode, but BackPACK's backpropagation to the layer input ignores "
                "it, so quantities of earlier layers are not exact",
                stacklevel=2,
            )
    kwargs = dict(
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=padding,
        dilation=module.dilation,
        groups=module.groups,
    )
    if transposed:
        kwargs.update(transposed=True, output_padding=_output_padding(module))
    return x, kwargs


def _output_padding(module: nn.Module) -> Tuple[int, ...]:
    """A ConvTranspose layer's effective ``output_padding`` (it may have been called with ``output_size``)."""
    in_size, out_size = module.input0.shape[2:], module.output.shape[2:]
    return tuple(
        o - ((i - 1) * s - 2 * p + d * (k - 1) + 1)
        for i, o, s, p, d, k in zip(
            in_size, out_size, module.stride, module.padding, module.dilation, module.kernel_size
        )
    )


def _group_blocks(matrix: Tensor, groups: int) -> Tensor:
    """The diagonal ``[G, E, E]`` blocks of a ``[G·E, G·E]`` matrix."""
    size = matrix.shape[0] // groups
    return torch.stack([matrix[g * size:(g + 1) * size, g * size:(g + 1) * size] for g in range(groups)])


# ----------------------------------------------------------------------------------------------
# weight methods (mixins placed before BackPACK's module extension classes)


class _DiagGGNWeight:
    """``weight``: diagonal GGN from the backpropagated square root (summed or per sample)."""

    per_sample = False

    def weight(self, ext, module, g_inp, g_out, backproped):
        x, kwargs = _weight_kwargs(ext, module)
        kernel_size = kwargs.pop("kernel_size")
        return F.ggn_diag(x, backproped, kernel_size, per_sample=self.per_sample, **kwargs)


class _BatchDiagGGNWeight(_DiagGGNWeight):
    per_sample = True


class _DiagHessianWeight:
    """``weight``: ``Σ sign · diag(Jᵀ S Sᵀ J)`` over BackPACK's signed Hessian square roots."""

    per_sample = False

    def weight(self, ext, module, g_inp, g_out, backproped):
        x, kwargs = _weight_kwargs(ext, module)
        kernel_size = kwargs.pop("kernel_size")
        shape = ((x.shape[0],) if self.per_sample else ()) + tuple(module.weight.shape)
        result = torch.zeros(shape, device=module.weight.device, dtype=module.weight.dtype)
        by_sign: Dict[float, List[Tensor]] = {}
        for matrix, sign in zip(backproped["matrices"], backproped["signs"]):
            by_sign.setdefault(sign, []).append(matrix)
        for sign, matrices in by_sign.items():
            columns = torch.cat(matrices) if len(matrices) > 1 else matrices[0]
            result.add_(F.ggn_diag(x, columns, kernel_size, per_sample=self.per_sample, **kwargs), alpha=sign)
        return result


class _BatchDiagHessianWeight(_DiagHessianWeight):
    per_sample = True


class _SqrtGGNWeight:
    """``weight``: per-sample, per-column weight VJPs ``[C, N, *weight.shape]``."""

    def weight(self, ext, module, g_inp, g_out, backproped):
        x, kwargs = _weight_kwargs(ext, module)
        kernel_size = kwargs.pop("kernel_size")
        return F.weight_vjp(x, backproped, kernel_size, per_sample=True, columns=True, **kwargs)


class _BatchGradWeight:
    """``weight``: per-sample gradients ``[N, *weight.shape]`` from the output gradient."""

    def weight(self, ext, module, g_inp, g_out, bpQuantities):
        x, kwargs = _weight_kwargs(ext, module)
        kernel_size = kwargs.pop("kernel_size")
        grad_output = g_out[0]
        subsampling = ext.get_subsampling()
        if subsampling is not None:
            grad_output = grad_output[subsampling]
        return F.weight_vjp(x, grad_output, kernel_size, per_sample=True, **kwargs)


class _HBPWeight:
    """``weight``: ``[Γ, Ω]`` with Ω from :func:`curvlib.functional.kfc`; grouped layers supported."""

    group_layout = "block_diag"

    def _maybe_raise_groups_not_implemented_error(self, ext, module):  # BackPACK's refusal, lifted
        return None

    def _input_factors(self, ext, module) -> Tensor:
        """Ω per group, ``[G, D, D]`` = ``1/N Σ_n Σ_o u uᵀ`` (BackPACK's normalisation exactly)."""
        if ExpectationApproximation.should_average_param_jac(ext.get_ea_strategy()):
            raise NotImplementedError("Undefined")  # as BackPACK
        x, kwargs = _weight_kwargs(ext, module)
        kernel_size = kwargs.pop("kernel_size")
        return F.kfc(x, kernel_size, **kwargs)

    def weight(self, ext, module, g_inp, g_out, backproped):
        bp_strategy = ext.get_backprop_strategy()
        if BackpropStrategy.is_batch_average(bp_strategy):  # KFRA
            gamma = self._factor_from_batch_average(module, backproped)
        elif BackpropStrategy.is_sqrt(bp_strategy):  # KFAC, KFLR
            gamma = self._factor_from_sqrt(module, backproped)
        else:  # pragma: no cover - BackPACK has no other strategy
            raise NotImplementedError(f"unknown backpropagation strategy {bp_strategy!r}")
        omega = self._input_factors(ext, module)
        if isinstance(module, CONV_TRANSPOSE):
            self._warn_approximation_transpose_weight()
        groups = module.groups
        if groups == 1:
            return [gamma, omega[0]]
        gamma_blocks = _group_blocks(gamma, groups)
        if self.group_layout == "stacked":
            return [gamma_blocks, omega]
        return [torch.block_diag(*gamma_blocks.unbind(0)), torch.block_diag(*omega.unbind(0))]


# ----------------------------------------------------------------------------------------------
# registration


def _subclass(mixin: type, base: type) -> type:
    return type(f"Curvlib{base.__name__}", (mixin, base), {"__module__": __name__, "__doc__": mixin.__doc__})


_CONV_CLASSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _table(mixin: type, bases: Sequence[type]) -> Dict[Type[nn.Module], type]:
    return {module: _subclass(mixin, base) for module, base in zip(_CONV_CLASSES, bases)}


_DIAG_GGN = _table(_DiagGGNWeight, [
    _dg1.DiagGGNConv1d, _dg2.DiagGGNConv2d, _dg3.DiagGGNConv3d,
    _dgt1.DiagGGNConvTranspose1d, _dgt2.DiagGGNConvTranspose2d, _dgt3.DiagGGNConvTranspose3d,
])
_BATCH_DIAG_GGN = _table(_BatchDiagGGNWeight, [
    _dg1.BatchDiagGGNConv1d, _dg2.BatchDiagGGNConv2d, _dg3.BatchDiagGGNConv3d,
    _dgt1.BatchDiagGGNConvTranspose1d, _dgt2.BatchDiagGGNConvTranspose2d, _dgt3.BatchDiagGGNConvTranspose3d,
])
_DIAG_H = _table(_DiagHessianWeight, [
    _dh1.DiagHConv1d, _dh2.DiagHConv2d, _dh3.DiagHConv3d,
    _dht1.DiagHConvTranspose1d, _dht2.DiagHConvTranspose2d, _dht3.DiagHConvTranspose3d,
])
_BATCH_DIAG_H = _table(_BatchDiagHessianWeight, [
    _dh1.BatchDiagHConv1d, _dh2.BatchDiagHConv2d, _dh3.BatchDiagHConv3d,
    _dht1.BatchDiagHConvTranspose1d, _dht2.BatchDiagHConvTranspose2d, _dht3.BatchDiagHConvTranspose3d,
])
_HBP = _table(_HBPWeight, [
    _hb1.HBPConv1d, _hb2.HBPConv2d, _hb3.HBPConv3d,
    _hbt1.HBPConvTranspose1d, _hbt2.HBPConvTranspose2d, _hbt3.HBPConvTranspose3d,
])
_SQRT_GGN = _table(_SqrtGGNWeight, [
    _sq.SqrtGGNConv1d, _sq.SqrtGGNConv2d, _sq.SqrtGGNConv3d,
    _sqt.SqrtGGNConvTranspose1d, _sqt.SqrtGGNConvTranspose2d, _sqt.SqrtGGNConvTranspose3d,
])
_BATCH_GRAD = _table(_BatchGradWeight, [
    _bg1.BatchGradConv1d, _bg2.BatchGradConv2d, _bg3.BatchGradConv3d,
    _bgt1.BatchGradConvTranspose1d, _bgt2.BatchGradConvTranspose2d, _bgt3.BatchGradConvTranspose3d,
])

# BackPACK extension base class → curvlib module extensions (checked in this order)
_REGISTRY = (
    (DiagGGN, _DIAG_GGN),
    (BatchDiagGGN, _BATCH_DIAG_GGN),
    (DiagHessian, _DIAG_H),
    (BatchDiagHessian, _BATCH_DIAG_H),
    (HBP, _HBP),
    (SqrtGGN, _SQRT_GGN),
    (BatchGrad, _BATCH_GRAD),
)


def use_curvlib(
    extension: BackpropExtension,
    *,
    modules: Optional[Sequence[Type[nn.Module]]] = None,
    group_layout: str = "block_diag",
) -> BackpropExtension:
    """Register curvlib-backed convolution module extensions on a BackPACK extension; return it.

    Args:
        extension: a BackPACK extension instance, one of :data:`SUPPORTED` (or a subclass).
        modules: which layer classes to switch to curvlib; default all six
            (``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``).
        group_layout: for KFAC/KFLR/KFRA on grouped layers, ``"block_diag"`` (default) or
            ``"stacked"``; see the module docstring.

    Returns:
        ``extension`` itself, so that ``with backpack(use_curvlib(DiagGGNExact())):`` works.
        The replaced module extensions are registered with ``set_module_extension(..., overwrite=True)``.

    Raises:
        TypeError: for an extension the plug-in has no kernels for.
        ValueError: for an unknown ``group_layout`` or a module class that is not a convolution.
    """
    if group_layout not in GROUP_LAYOUTS:
        raise ValueError(f"group_layout must be one of {GROUP_LAYOUTS}, got {group_layout!r}")
    for base, table in _REGISTRY:
        if isinstance(extension, base):
            break
    else:
        raise TypeError(
            f"curvlib has no BackPACK module extensions for {type(extension).__name__}; supported: "
            + ", ".join(SUPPORTED)
        )
    selected = _CONV_CLASSES if modules is None else tuple(modules)
    for module_class in selected:
        if module_class not in table:
            raise ValueError(f"{module_class!r} is not one of the convolution layers {_CONV_CLASSES}")
        module_extension = table[module_class]()
        if base is HBP:
            module_extension.group_layout = group_layout
        extension.set_module_extension(module_class, module_extension, overwrite=True)
    return extension


def curvlib_extensions(
    *names: str, mc_samples: int = 1, group_layout: str = "block_diag"
) -> List[BackpropExtension]:
    """Fresh BackPACK extensions with the curvlib plug-in registered.

    Args:
        names: keys of :data:`SUPPORTED` (``"DiagGGNExact"``, ``"KFAC"``, …); none: :data:`COMMON`.
        mc_samples: passed to the Monte-Carlo extensions (``DiagGGNMC``, ``BatchDiagGGNMC``, ``KFAC``,
            ``SqrtGGNMC``).
        group_layout: see :func:`use_curvlib`.

    Returns:
        A list, for ``with backpack(*curvlib_extensions(...)):``.
    """
    names = names or COMMON
    unknown = [name for name in names if name not in SUPPORTED]
    if unknown:
        raise ValueError(f"unknown extension name(s) {unknown}; supported: {', '.join(SUPPORTED)}")
    built = []
    for name in names:
        extension = SUPPORTED[name](mc_samples) if name in _TAKES_MC_SAMPLES else SUPPORTED[name]()
        built.append(use_curvlib(extension, group_layout=group_layout))
    return built


def kron_to_dense(module: nn.Module, factors: Sequence[Tensor]) -> Tensor:
    """The dense ``[|w|, |w|]`` Kronecker approximation stored in ``module.weight.kfac`` (or ``kflr``, ``kfra``).

    Accepts BackPACK's ungrouped ``[Γ, Ω]`` and both grouped layouts of the plug-in. Rows and
    columns are in ``module.weight.flatten()`` order, also for ``ConvTranspose`` layers (whose
    factors act on the transposed kernel, see the module docstring).
    """
    if not isinstance(module, CONV + CONV_TRANSPOSE):
        raise TypeError(f"expected a convolution layer, got {type(module).__name__}")
    gamma, omega = factors
    groups = module.groups
    if gamma.dim() == 3:  # stacked
        gammas, omegas = gamma.unbind(0), omega.unbind(0)
    else:
        gammas, omegas = _group_blocks(gamma, groups).unbind(0), _group_blocks(omega, groups).unbind(0)
    dense = torch.block_diag(*[torch.kron(g, o) for g, o in zip(gammas, omegas)])
    if isinstance(module, CONV_TRANSPOSE):
        # rows of the blocks are ordered (g, e, d, k); weight.flatten() is ((g, d), e, k)
        c_in, e = module.weight.shape[:2]
        kernel = module.weight.shape[2:].numel()
        order = torch.arange(module.weight.numel(), device=dense.device).reshape(groups, c_in // groups, e, kernel)
        order = order.transpose(1, 2).flatten()  # position in (g, e, d, k) order → weight.flatten() index
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        dense = dense[inverse][:, inverse]
    return dense
