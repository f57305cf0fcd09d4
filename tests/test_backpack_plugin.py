"""The BackPACK plug-in (curvlib.extensions.backpack) against BackPACK itself and independent references.

* Parity: for small extended CNNs (1d/2d/3d, a ConvTranspose model) and two losses, every supported
  BackPACK extension gives the same parameter quantities with BackPACK's own module extensions and
  with the curvlib ones (float64, round-off), and the curvlib kernels are really the ones called.
* Where BackPACK refuses or fails (grouped KFAC/KFLR/KFRA, ConvTranspose with output_padding,
  ``padding='same'``, ``padding_mode='reflect'``), the plug-in is checked against references built
  from explicit ``torch.nn.functional.unfold``, autograd Jacobians and the loss Hessian.

Skipped where BackPACK is not installed (see curvlib/extensions/backpack.py for the install command).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

pytest.importorskip("backpack")

from backpack import backpack, extend  # noqa: E402
from backpack import extensions as bpext  # noqa: E402

import curvlib.functional  # noqa: E402
from curvlib.extensions import backpack as plugin  # noqa: E402
from conftest import DTYPE, assert_close  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:The Kronecker factors stored in the weight:UserWarning"),
]

# ----------------------------------------------------------------------------------------------
# models: (input shape without batch, builder, number of outputs)


def _model_2d():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2), nn.Flatten(), nn.Linear(5 * 3 * 3, 4)
    )


def _model_1d():
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, dilation=2, padding=1), nn.Sigmoid(), nn.Conv1d(3, 4, 2, stride=2), nn.Flatten(),
        nn.Linear(4 * 3, 4),
    )


def _model_3d():
    return nn.Sequential(
        nn.Conv3d(2, 3, 2), nn.Tanh(), nn.Conv3d(3, 2, 2, stride=2, padding=1), nn.Flatten(), nn.Linear(2 * 8, 4)
    )


def _model_transpose():
    return nn.Sequential(
        nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2), nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4),
    )


MODELS = {
    "2d": ((4, 3, 8, 8), _model_2d),
    "1d": ((4, 2, 9), _model_1d),
    "3d": ((3, 2, 4, 4, 4), _model_3d),
    "transpose": ((3, 3, 4, 4), _model_transpose),
}
LOSSES = ("cross_entropy", "mse")

# extension name → (constructor, attribute, kernel of curvlib.functional its conv weights go through)
EXTENSIONS = {
    "DiagGGNExact": (bpext.DiagGGNExact, "diag_ggn_exact", "ggn_diag"),
    "DiagGGNMC": (lambda: bpext.DiagGGNMC(mc_samples=2), "diag_ggn_mc", "ggn_diag"),
    "BatchDiagGGNExact": (bpext.BatchDiagGGNExact, "diag_ggn_exact_batch", "ggn_diag"),
    "BatchDiagGGNMC": (bpext.BatchDiagGGNMC, "diag_ggn_mc_batch", "ggn_diag"),
    "DiagHessian": (bpext.DiagHessian, "diag_h", "ggn_diag"),
    "BatchDiagHessian": (bpext.BatchDiagHessian, "diag_h_batch", "ggn_diag"),
    "KFAC": (lambda: bpext.KFAC(mc_samples=2), "kfac", "kfc"),
    "KFLR": (bpext.KFLR, "kflr", "kfc"),
    "KFRA": (bpext.KFRA, "kfra", "kfc"),
    "SqrtGGNExact": (bpext.SqrtGGNExact, "sqrt_ggn_exact", "weight_vjp"),
    "SqrtGGNMC": (bpext.SqrtGGNMC, "sqrt_ggn_mc", "weight_vjp"),
    "BatchGrad": (bpext.BatchGrad, "grad_batch", "weight_vjp"),
}
CONV_LAYERS = plugin.CONV + plugin.CONV_TRANSPOSE


def _extended(plain):
    """A BackPACK-extended copy (BackPACK's hooks do not mix with torch.func, so references use ``plain``)."""
    return extend(copy.deepcopy(plain))


def _data(input_shape, model, loss, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, dtype=DTYPE, generator=generator)
    with torch.no_grad():
        classes = model(x).shape[1]
    if loss == "cross_entropy":
        return x, torch.randint(0, classes, (input_shape[0],), generator=generator), nn.CrossEntropyLoss()
    return x, torch.randn(input_shape[0], classes, dtype=DTYPE, generator=generator), nn.MSELoss()


def _run(model, lossfunc, x, y, extension, seed):
    """Forward/backward under ``extension``; ``{parameter name: saved quantity}``."""
    model.zero_grad()
    torch.manual_seed(seed)  # same MC samples for both runs
    with backpack(extension):
        lossfunc(model(x), y).backward()
    results = {}
    for name, parameter in model.named_parameters():
        results[name] = getattr(parameter, extension.savefield)
        delattr(parameter, extension.savefield)
    return results


def _compare(actual, expected, name):
    if isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), name
        for i, (a, e) in enumerate(zip(actual, expected)):
            _compare(a, e, f"{name}[{i}]")
    else:
        assert_close(actual, expected, name=name, allow_zero=True)


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the curvlib.functional kernels the plug-in uses."""
    calls = {"ggn_diag": 0, "kfc": 0, "weight_vjp": 0}
    for kernel in calls:
        original = getattr(curvlib.functional, kernel)

        def counted(*args, _original=original, _kernel=kernel, **kwargs):
            calls[_kernel] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(curvlib.functional, kernel, counted)
    return calls


# ----------------------------------------------------------------------------------------------
# parity with BackPACK's own module extensions


# BackPACK's own KFRA fails for MSELoss in float64 (its MSE loss Hessian is created in float32)
PARITY_CASES = [
    pytest.param(extension, model_name, loss, id=f"{extension}-{model_name}-{loss}")
    for extension in EXTENSIONS
    for model_name in MODELS
    for loss in LOSSES
    if not (extension == "KFRA" and loss == "mse")
]


@pytest.mark.parametrize("extension, model_name, loss", PARITY_CASES)
def test_parity_with_backpack(extension, model_name, loss, seed, spy):
    input_shape, builder = MODELS[model_name]
    make, savefield, kernel = EXTENSIONS[extension]
    model = extend(builder().to(DTYPE))
    x, y, lossfunc = _data(input_shape, model, loss, seed)
    lossfunc = extend(lossfunc)

    stock = _run(model, lossfunc, x, y, make(), seed)
    assert sum(spy.values()) == 0
    ext = plugin.use_curvlib(make())
    assert ext.savefield == savefield
    ours = _run(model, lossfunc, x, y, ext, seed)
    conv_layers = [m for m in model if isinstance(m, CONV_LAYERS)]
    assert spy[kernel] >= len(conv_layers), f"curvlib.functional.{kernel} was not used: {spy}"

    assert stock.keys() == ours.keys()
    for name in stock:
        _compare(ours[name], stock[name], f"{extension} {model_name} {loss} {name}")
    nonzero = stock["0.weight"] if not isinstance(stock["0.weight"], list) else stock["0.weight"][1]
    assert nonzero.abs().max() > 0, "vacuous comparison"


def test_curvlib_extensions_builds_registered_extensions(seed, spy):
    built = plugin.curvlib_extensions()
    assert [type(e).__name__ for e in built] == list(plugin.COMMON)
    kfac, diag = plugin.curvlib_extensions("KFAC", "DiagGGNMC", mc_samples=3)
    assert kfac.get_num_mc_samples() == 3 and diag.get_num_mc_samples() == 3
    input_shape, builder = MODELS["2d"]
    model = extend(builder().to(DTYPE))
    x, y, lossfunc = _data(input_shape, model, "cross_entropy", seed)
    with backpack(*built):
        extend(lossfunc)(model(x), y).backward()
    for ext in built:
        assert hasattr(model[0].weight, ext.savefield) and hasattr(model[2].bias, ext.savefield)
    assert spy["ggn_diag"] >= 3 * 2 and spy["kfc"] >= 2 * 2
    with pytest.raises(ValueError, match="unknown extension"):
        plugin.curvlib_extensions("DiagGGN")
    with pytest.raises(TypeError, match="no BackPACK module extensions"):
        plugin.use_curvlib(bpext.Variance())
    with pytest.raises(ValueError, match="group_layout"):
        plugin.use_curvlib(bpext.KFLR(), group_layout="dense")


def test_modules_argument_restricts_registration(seed, spy):
    input_shape, builder = MODELS["transpose"]
    model = extend(builder().to(DTYPE))
    x, y, lossfunc = _data(input_shape, model, "mse", seed)
    with backpack(plugin.use_curvlib(bpext.DiagGGNExact(), modules=[nn.Conv2d])):
        extend(lossfunc)(model(x), y).backward()
    assert spy["ggn_diag"] == 1  # the Conv2d only, the ConvTranspose2d stays BackPACK's


# ----------------------------------------------------------------------------------------------
# independent references: autograd Jacobians, the loss Hessian, explicit unfold


def _output_jacobian(model, x, name):
    """``∂ model(x)[n, k] / ∂ parameter`` as ``[N, K, *parameter.shape]``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p):
        return functional_call(model, {**params, name: p}, (x,))

    return jacrev(f)(params[name])


def _ce_hessians(logits):
    """Per-sample Hessians ``[N, K, K]`` of the mean cross-entropy w.r.t. the logits."""
    p = logits.detach().softmax(1)
    return (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / logits.shape[0]


def _ggn(model, x, name):
    """Exact GGN of a parameter (mean cross-entropy): ``Σ_n J_nᵀ H_n J_n``, ``[|p|, |p|]``."""
    jac = _output_jacobian(model, x, name).flatten(2)
    return torch.einsum("nkp,nkl,nlq->pq", jac, _ce_hessians(model(x)), jac)


def _omega_unfold(x, conv: nn.Conv2d):
    """``[G, D, D]``: ``1/N Σ_n Σ_o u uᵀ`` from ``torch.nn.functional.unfold``, rows ``(c, k)`` per group."""
    u = torch.nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    u = u.unflatten(1, (conv.groups, -1))  # [N, G, D, O]
    return torch.einsum("ngdo,ngeo->gde", u, u) / x.shape[0]


def _omega_jacobian(x, conv: nn.ConvTranspose2d):
    """``[G, D, D]`` for a ConvTranspose layer from its weight Jacobian (the definition of ``u``)."""
    weight = conv.weight.detach()

    def f(w):
        return torch.nn.functional.conv_transpose2d(
            x, w, None, conv.stride, conv.padding, conv.output_padding, conv.groups, conv.dilation
        )

    jac = jacrev(f)(weight)  # [N, C_out, *O, C_in, E, *K]
    groups, c_in, e = conv.groups, weight.shape[0], weight.shape[1]
    d = c_in // groups
    blocks = []
    for g in range(groups):
        # u[n, o, (d, k)] = ∂ y[n, g·E, o] / ∂ weight[g·d + d', 0, k]
        u = jac[:, g * e, :, :, g * d:(g + 1) * d, 0].flatten(1, 2).flatten(2)
        blocks.append(torch.einsum("noa,nob->ab", u, u) / x.shape[0])
    return torch.stack(blocks)


def _dense_reference(weight_shape, gamma, omega, transposed):
    """``⊕_g Γ_g ⊗ Ω_g`` in ``weight.flatten()`` order, built index by index (no kron, no permutation)."""
    groups = omega.shape[0]
    kernel = torch.Size(weight_shape[2:]).numel()
    if transposed:
        c_in, e = weight_shape[0], weight_shape[1]
        d = c_in // groups
        dense = torch.zeros(c_in, e, kernel, c_in, e, kernel, dtype=gamma.dtype)
        for g in range(groups):
            gam = gamma[g * e:(g + 1) * e, g * e:(g + 1) * e]
            om = omega[g].reshape(d, kernel, d, kernel)
            s = slice(g * d, (g + 1) * d)
            dense[s, :, :, s, :, :] = torch.einsum("ef,akbl->aekbfl", gam, om)
    else:
        c_out, d = weight_shape[0], weight_shape[1]
        e = c_out // groups
        dense = torch.zeros(c_out, d * kernel, c_out, d * kernel, dtype=gamma.dtype)
        for g in range(groups):
            s = slice(g * e, (g + 1) * e)
            dense[s, :, s, :] = torch.einsum("ef,ab->eafb", gamma[s, s], omega[g])
    size = torch.Size(weight_shape).numel()
    return dense.reshape(size, size)


# ----------------------------------------------------------------------------------------------
# grouped convolutions: BackPACK refuses KFAC/KFLR/KFRA, the plug-in computes them


def _grouped_model(transposed):
    if transposed:
        return nn.Sequential(
            nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 7 * 7, 3)
        ), (3, 4, 4, 4)
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, groups=2), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ), (3, 4, 7, 7)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
def test_grouped_kflr_matches_unfold_reference(transposed, seed, spy):
    plain, input_shape = _grouped_model(transposed)
    plain = plain.to(DTYPE)
    model = _extended(plain)
    x, y, lossfunc = _data(input_shape, model, "cross_entropy", seed)
    lossfunc = extend(lossfunc)
    with pytest.raises(NotImplementedError, match="groups ≠ 1 is not supported by KFLR"):
        with backpack(bpext.KFLR()):
            lossfunc(model(x), y).backward()
    model.zero_grad()

    results = {}
    for layout in plugin.GROUP_LAYOUTS:
        results[layout] = _run(model, lossfunc, x, y, plugin.use_curvlib(bpext.KFLR(), group_layout=layout), seed)
    assert spy["kfc"] >= 2

    for index, layer in enumerate(model):
        if not isinstance(layer, CONV_LAYERS):
            continue
        layer_input = x if index == 0 else plain[:index](x).detach()
        omega = _omega_jacobian(layer_input, layer) if transposed else _omega_unfold(layer_input, layer)
        gamma = _ggn(plain, x, f"{index}.bias")  # KFLR's Γ is the exact bias GGN
        groups = layer.groups
        e = gamma.shape[0] // groups
        gamma_blocks = torch.stack([gamma[g * e:(g + 1) * e, g * e:(g + 1) * e] for g in range(groups)])

        stacked = results["stacked"][f"{index}.weight"]
        _compare(stacked, [gamma_blocks, omega], f"layer {index} stacked [Γ_g, Ω_g]")
        block = results["block_diag"][f"{index}.weight"]
        _compare(block, [torch.block_diag(*gamma_blocks), torch.block_diag(*omega)], f"layer {index} block_diag")
        # the bias keeps BackPACK's factor: the full bias GGN
        _compare(results["block_diag"][f"{index}.bias"], [gamma], f"layer {index} bias")

        reference = _dense_reference(layer.weight.shape, gamma, omega, transposed)
        for layout in plugin.GROUP_LAYOUTS:
            dense = plugin.kron_to_dense(layer, results[layout][f"{index}.weight"])
            assert_close(dense, reference, name=f"layer {index} kron_to_dense({layout})")


@pytest.mark.parametrize("name", ["KFAC", "KFRA"])
def test_grouped_kfac_kfra_refused_by_backpack_work_with_plugin(name, seed):
    builder_model, input_shape = _grouped_model(False)
    model = extend(builder_model.to(DTYPE))
    x, y, lossfunc = _data(input_shape, model, "cross_entropy", seed)
    lossfunc = extend(lossfunc)
    make = EXTENSIONS[name][0]
    with pytest.raises(NotImplementedError, match=f"groups ≠ 1 is not supported by {name}"):
        with backpack(make()):
            lossfunc(model(x), y).backward()
    model.zero_grad()
    result = _run(model, lossfunc, x, y, plugin.use_curvlib(make(), group_layout="stacked"), seed)
    for index in (0, 2):
        gamma, omega = result[f"{index}.weight"]
        layer = model[index]
        layer_input = x if index == 0 else model[:index](x).detach()
        assert_close(omega, _omega_unfold(layer_input, layer), name=f"{name} Ω layer {index}")
        # Γ_g are the diagonal blocks of BackPACK's own (ungrouped-shape) bias factor
        bias_gamma = result[f"{index}.bias"][0]
        e = bias_gamma.shape[0] // layer.groups
        for g in range(layer.groups):
            assert_close(gamma[g], bias_gamma[g * e:(g + 1) * e, g * e:(g + 1) * e], name=f"{name} Γ_{g} layer {index}")


def test_kron_to_dense_ungrouped_matches_kron(seed):
    conv = nn.Conv2d(2, 3, 2).to(DTYPE)
    gamma, omega = torch.randn(3, 3, dtype=DTYPE), torch.randn(8, 8, dtype=DTYPE)
    assert_close(plugin.kron_to_dense(conv, [gamma, omega]), torch.kron(gamma, omega), name="conv")
    # BackPACK's ConvTranspose factors approximate the GGN of weight.transpose(0, 1)
    conv_t = nn.ConvTranspose2d(2, 3, 2).to(DTYPE)  # weight [2, 3, 2, 2]
    gamma_t, omega_t = torch.randn(3, 3, dtype=DTYPE), torch.randn(8, 8, dtype=DTYPE)
    dense_t = plugin.kron_to_dense(conv_t, [gamma_t, omega_t])
    v = torch.randn(conv_t.weight.shape, dtype=DTYPE)
    expected = (torch.kron(gamma_t, omega_t) @ v.transpose(0, 1).flatten()).reshape(3, 2, 2, 2).transpose(0, 1)
    assert_close(dense_t @ v.flatten(), expected.flatten(), name="conv_transpose matvec")
    with pytest.raises(TypeError):
        plugin.kron_to_dense(nn.Linear(2, 2), [gamma, omega])


# ----------------------------------------------------------------------------------------------
# layers BackPACK fails on or gets wrong: checked against the autograd GGN diagonal


LAYERS_BEYOND_BACKPACK = {
    # BackPACK unfolds with output_padding=0 and fails on the shape mismatch
    "conv_transpose_output_padding": (
        (3, 2, 3, 3), lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), 3 * 6 * 6
    ),
    # BackPACK passes the string to im2col
    "same_even_kernel": ((3, 2, 5, 5), lambda: nn.Conv2d(2, 3, 2, padding="same"), 3 * 5 * 5),
    # BackPACK ignores the padding mode (runs, but wrong)
    "reflect": ((3, 2, 5, 5), lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), 3 * 5 * 5),
}


@pytest.mark.parametrize("case", list(LAYERS_BEYOND_BACKPACK))
def test_layers_beyond_backpack_match_autograd(case, seed):
    input_shape, make_layer, features = LAYERS_BEYOND_BACKPACK[case]
    torch.manual_seed(seed)
    plain = nn.Sequential(make_layer(), nn.Flatten(), nn.Linear(features, 3)).to(DTYPE)
    model = _extended(plain)
    x, y, lossfunc = _data(input_shape, model, "cross_entropy", seed)
    lossfunc = extend(lossfunc)
    ggn = _ggn(plain, x, "0.weight")
    shape = model[0].weight.shape

    diag = _run(model, lossfunc, x, y, plugin.use_curvlib(bpext.DiagGGNExact()), seed)["0.weight"]
    assert_close(diag, ggn.diagonal().reshape(shape), name=f"{case} DiagGGNExact")

    # KFLR: Γ is the exact bias GGN, Ω the unfolded-input second moment (by definition)
    gamma, omega = _run(model, lossfunc, x, y, plugin.use_curvlib(bpext.KFLR()), seed)["0.weight"]
    assert_close(gamma, _ggn(plain, x, "0.bias"), name=f"{case} KFLR Γ")
    if case == "conv_transpose_output_padding":
        assert_close(omega, _omega_jacobian(x, model[0])[0], name=f"{case} KFLR Ω")
    else:
        mode = "constant" if model[0].padding_mode == "zeros" else model[0].padding_mode
        padded = torch.nn.functional.pad(x, model[0]._reversed_padding_repeated_twice, mode=mode)
        probe = nn.Conv2d(2, 3, model[0].kernel_size)  # same kernel, no padding, on the padded input
        assert_close(omega, _omega_unfold(padded, probe)[0], name=f"{case} KFLR Ω")

    if case == "conv_transpose_output_padding":  # BackPACK's KFLR runs, but with the wrong Ω
        stock_omega = _run(model, lossfunc, x, y, bpext.KFLR(), seed)["0.weight"][1]
        assert not torch.allclose(stock_omega, omega)
    if case == "reflect":  # BackPACK runs but ignores the padding mode
        stock = _run(model, lossfunc, x, y, bpext.DiagGGNExact(), seed)["0.weight"]
        assert not torch.allclose(stock, diag)
    else:
        with pytest.raises((RuntimeError, TypeError)):
            _run(model, lossfunc, x, y, bpext.DiagGGNExact(), seed)


class _OutputSize(nn.Module):
    """A ConvTranspose2d called with ``output_size`` (the effective output_padding is 1)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
        self.flatten, self.linear = nn.Flatten(), nn.Linear(3 * 6 * 6, 3)

    def forward(self, x):
        return self.linear(self.flatten(self.conv(x, output_size=(6, 6))))


def test_conv_transpose_called_with_output_size(seed):
    plain = _OutputSize().to(DTYPE)
    model = copy.deepcopy(plain)  # extend the layers, not the container (BackPACK has no rule for it)
    for child in model.children():
        extend(child)
    x, y, lossfunc = _data((3, 2, 3, 3), model, "cross_entropy", seed)
    lossfunc = extend(lossfunc)
    with pytest.raises(RuntimeError):  # BackPACK unfolds for output_padding=0
        _run(model, lossfunc, x, y, bpext.DiagGGNExact(), seed)
    model.zero_grad()
    diag = _run(model, lossfunc, x, y, plugin.use_curvlib(bpext.DiagGGNExact()), seed)["conv.weight"]
    assert_close(diag, _ggn(plain, x, "conv.weight").diagonal().reshape(diag.shape), name="output_size DiagGGNExact")


def test_reflect_padding_warns_when_backpropagating_through(seed):
    model = extend(nn.Sequential(nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten()).to(DTYPE))
    x = torch.randn(2, 2, 9, dtype=DTYPE, requires_grad=True)  # BackPACK backpropagates to x
    lossfunc = extend(nn.MSELoss())
    with pytest.warns(UserWarning, match="padding_mode='reflect'"):
        with backpack(plugin.use_curvlib(bpext.DiagGGNExact())):
            lossfunc(model(x), torch.zeros(2, 18, dtype=DTYPE)).backward()
