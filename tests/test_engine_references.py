"""Models and independent references for the engine tests (``curvlib.curvature`` and its extensions).

Everything here is built from ``torch.func`` (``jacrev``, ``hessian``, ``functional_call``), plain
autograd, ``torch.nn.functional.unfold`` / explicit loops and explicit formulas, in float64; nothing
calls curvlib. The tests at the bottom check the references themselves against closed forms, so
that an engine test failing against them points at the engine.

Conventions: the GGN of a parameter is ``Jᵀ H J`` with ``J = ∂f/∂θ`` of the network output ``f``
(whole batch, flattened) and ``H = ∇²_f L`` (the loss as reduced). Per-sample quantities use ``H``
restricted to the block of one sample; columns ``(c, n)`` are the columns ``S_c`` of a square root
of ``H`` restricted to sample ``n``.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as tf
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from conftest import Layer, assert_close, torch_padding_pairs

DT = torch.float64
_BN = nn.modules.batchnorm._BatchNorm

# ----------------------------------------------------------------------------------------------
# models (float64, tiny)


class Residual(nn.Module):
    """Conv → BatchNorm → ReLU, a residual block with a 1×1 conv applied twice, ConvTranspose, Linear."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding="same")
        self.shared = nn.Conv2d(4, 4, 1)
        self.t = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.lin = nn.Linear(2 * 4 * 4, classes)  # 8×8 input: pooled to 2×2, upsampled to 4×4

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = h + self.shared(torch.tanh(self.shared(self.c2(h))))
        h = self.t(tf.avg_pool2d(h, 4))
        return self.lin(h.flatten(1))


class ResidualBN(nn.Module):
    """A residual network with BatchNorm (no shared layer): conv, BN, ReLU, skip connection, head."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 3 * 3, classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = h + torch.tanh(self.c2(h))
        h = tf.max_pool2d(h, 2, stride=2)
        return self.head(h.flatten(1))


class MixedConv(nn.Module):
    """Conv1d, Conv3d, a depthwise Conv2d and a ConvTranspose2d with output_padding, joined by a Linear."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2)
        self.c3 = nn.Conv3d(1, 2, 2, stride=(1, 2, 1), padding=(1, 0, 0))
        self.dw = nn.Conv2d(2, 4, 3, padding=1, groups=2, bias=False)  # depthwise with multiplier 2
        self.tr = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Linear(3 * 3 + 2 * 3 * 1 * 2 + 2 * 6 * 6, classes)

    def forward(self, x):
        a = torch.tanh(self.c1(x.flatten(2)[:, :, :8]))  # [N, 3, 3]
        b = torch.sigmoid(self.c3(x[:, :1, None, :3, :3].expand(-1, -1, 2, -1, -1)))  # [N, 2, 3, 1, 2]
        c = self.tr(torch.relu(self.dw(x[:, :, :3, :3])))  # [N, 2, 6, 6]
        return self.head(torch.cat([a.flatten(1), b.flatten(1), c.flatten(1)], 1))


class SharedMLP(nn.Module):
    """A square Linear applied twice (weight sharing) between two other layers."""

    def __init__(self, dim: int = 4, classes: int = 3):
        super().__init__()
        self.inp = nn.Linear(5, dim)
        self.shared = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = self.shared(h) + h
        return self.out(h)


class SequenceModel(nn.Module):
    """Linear layers on ``[N, T, D]`` inputs (shared over the ``T`` positions)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.l1 = nn.Linear(4, 3)
        self.l2 = nn.Linear(3, 2)
        self.head = nn.Linear(2 * 3, classes)

    def forward(self, x):
        return self.head(self.l2(torch.tanh(self.l1(x))).flatten(1))


class SequenceOutput(nn.Module):
    """Linear layers on ``[N, T, D]`` with a ``[N, T, K]`` output (per-position regression/labels)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.l1 = nn.Linear(4, 3)
        self.l2 = nn.Linear(3, classes)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def sequential_cnn(classes: int = 3) -> nn.Sequential:
    """Convolutions at indices 0 and 3, the second after an explicit padding layer (non-zero value)."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.MaxPool2d(2), nn.ConstantPad2d((0, 1, 1, 0), 0.5)),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, classes),
    )


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics for every BatchNorm."""
    for m in model.modules():
        if isinstance(m, _BN):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.3)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.randn_like(m.weight))
                    m.bias.copy_(torch.randn_like(m.bias))
    return model


#: name → (model factory, input shape); all inputs [N ≤ 4, ...], outputs [N, 3]
MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "cnn": (lambda: sequential_cnn(), (3, 2, 8, 8)),
    "residual_train": (lambda: randomize_batchnorm(Residual()).train(), (4, 2, 8, 8)),
    "residual_eval": (lambda: randomize_batchnorm(Residual()).eval(), (3, 2, 8, 8)),
    "resbn_train": (lambda: randomize_batchnorm(ResidualBN()).train(), (3, 2, 6, 6)),
    "resbn_eval": (lambda: randomize_batchnorm(ResidualBN()).eval(), (3, 2, 6, 6)),
    "mixed_conv": (lambda: MixedConv(), (3, 2, 4, 4)),
    "shared": (lambda: SharedMLP(), (4, 5)),
    "sequence": (lambda: SequenceModel(), (3, 3, 4)),
    "sequence_output": (lambda: SequenceOutput(), (2, 2, 4)),  # output [N, T, 3]: MSE/BCE only
}


def make_model(name: str) -> Tuple[nn.Module, Tensor]:
    factory, shape = MODELS[name]
    model = factory().to(DT)
    return model, torch.randn(*shape, dtype=DT)


def make_loss(kind: str, out_shape: Sequence[int]) -> Tuple[nn.Module, Tensor]:
    """``(loss_fn, target)`` for ``kind`` in ce, ce_sum, ce_prob, mse, mse_sum, bce, bce_sum."""
    n, k = out_shape[0], out_shape[1]
    reduction = "sum" if kind.endswith("_sum") else "mean"
    if kind.startswith("ce_prob"):
        return nn.CrossEntropyLoss(reduction=reduction), torch.rand(*out_shape, dtype=DT).softmax(1)
    if kind.startswith("ce"):
        return nn.CrossEntropyLoss(reduction=reduction), torch.randint(0, k, (n,))
    if kind.startswith("mse"):
        return nn.MSELoss(reduction=reduction), torch.randn(*out_shape, dtype=DT)
    if kind.startswith("bce"):
        return nn.BCEWithLogitsLoss(reduction=reduction), torch.rand(*out_shape, dtype=DT)
    raise KeyError(kind)


def reference_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose train-mode BatchNorms do not track running statistics.

    In train mode BatchNorm normalises with batch statistics either way; without tracking, the
    functional transforms below do not try to update the running buffers.
    """
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, _BN) and m.training:
            m.track_running_stats = False
    return ref


def run_engine(model, loss_fn, X, y, *extensions, **kwargs):
    """One forward/backward pass inside ``curvlib.curvature``; returns the context."""
    import curvlib

    with curvlib.curvature(model, loss_fn, *extensions, **kwargs) as ctx:
        loss = loss_fn(model(X), y)
        loss.backward()
    return ctx


# ----------------------------------------------------------------------------------------------
# loss references


def loss_scale(loss_fn: nn.Module, out: Tensor) -> float:
    """``L = scale · Σ_n ℓ_n``: 1 for sum, 1/N (cross-entropy) or 1/numel (MSE, BCE) for mean."""
    if loss_fn.reduction == "sum":
        return 1.0
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return 1.0 / out.shape[0]
    return 1.0 / out.numel()


def output_hessian(loss_fn: nn.Module, out: Tensor, y: Tensor) -> Tensor:
    """``∇²_f L`` as a ``[|f|, |f|]`` matrix (torch.func.hessian)."""
    H = hessian(lambda o: loss_fn(o, y))(out.detach())
    return H.reshape(out.numel(), out.numel())


def explicit_sqrt_hessian(loss_fn: nn.Module, out: Tensor) -> Tensor:
    """The documented square-root factorisation ``[C, *f.shape]`` by explicit formulas.

    Cross-entropy: ``S_c = √scale · √p_c (e_c − p)`` (targets summing to one); MSE: ``√(2·scale) e_c``;
    BCE: ``√(scale · p(1−p)) e_c``. Needed where a quantity depends on the choice of ``S``
    (Gram matrices); ``S Sᵀ = H`` itself is checked against torch.func.hessian.
    """
    out = out.detach()
    n = out.shape[0]
    flat = out.reshape(n, -1)
    dim = flat.shape[1]
    scale = loss_scale(loss_fn, out)
    eye = torch.eye(dim, dtype=out.dtype)
    columns = torch.zeros(dim, n, dim, dtype=out.dtype)
    for c in range(dim):
        for i in range(n):
            if isinstance(loss_fn, nn.CrossEntropyLoss):
                p = flat[i].softmax(0)
                columns[c, i] = p[c].sqrt() * (eye[c] - p)
            elif isinstance(loss_fn, nn.MSELoss):
                columns[c, i] = math.sqrt(2.0) * eye[c]
            else:
                p = flat[i].sigmoid()
                columns[c, i] = (p[c] * (1 - p[c])).sqrt() * eye[c]
    return (columns * math.sqrt(scale)).reshape(dim, *out.shape)


def sample_mask(out_shape: Sequence[int], n: int) -> Tensor:
    """Indicator ``[|f|]`` of sample ``n``'s entries of the (flattened) output."""
    mask = torch.zeros(out_shape, dtype=DT)
    mask[n] = 1
    return mask.flatten()


# ----------------------------------------------------------------------------------------------
# GGN references


def parameter_jacobians(model: nn.Module, X: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``(f, {name: ∂f/∂θ [|f|, |θ|]})`` by jacrev of functional_call (train-mode BN: batch statistics)."""
    ref = reference_copy(model)
    params = {name: p.detach() for name, p in ref.named_parameters()}

    def f(p):
        return functional_call(ref, p, (X,))

    out = f(params)
    jac = jacrev(f)(params)
    return out.detach(), {name: jac[name].reshape(out.numel(), -1) for name in params}


class GGNReference:
    """Exact GGN quantities of a model/loss/batch from dense Jacobians and the loss Hessian."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor):
        self.model = model
        self.out, self.J = parameter_jacobians(model, X)
        self.H = output_hessian(loss_fn, self.out, y)
        self.loss_fn = loss_fn
        self.N = X.shape[0]
        self.shapes = {name: p.shape for name, p in model.named_parameters()}

    def block(self, a: str, b: str = None) -> Tensor:
        """GGN block ``[|θ_a|, |θ_b|]``."""
        b = a if b is None else b
        return self.J[a].T @ self.H @ self.J[b]

    def full(self) -> Tensor:
        J = torch.cat([self.J[name] for name in self.J], 1)
        return J.T @ self.H @ J

    def diag(self, name: str) -> Tensor:
        return torch.einsum("iw,ij,jw->w", self.J[name], self.H, self.J[name]).reshape(self.shapes[name])

    def sample_hessian(self, n: int) -> Tensor:
        mask = sample_mask(self.out.shape, n)
        return self.H * mask[:, None] * mask[None, :]

    def diag_batch(self, name: str) -> Tensor:
        rows = []
        for n in range(self.N):
            Hn = self.sample_hessian(n)
            rows.append(torch.einsum("iw,ij,jw->w", self.J[name], Hn, self.J[name]))
        return torch.stack(rows).reshape(self.N, *self.shapes[name])

    def column_gradients(self, name: str) -> Tensor:
        """``[C, N, |θ|]``: ``Jᵀ`` of column ``c`` of the documented square root restricted to sample ``n``."""
        S = explicit_sqrt_hessian(self.loss_fn, self.out).reshape(-1, self.out.numel())  # [C, |f|]
        masks = torch.stack([sample_mask(self.out.shape, n) for n in range(self.N)])  # [N, |f|]
        return torch.einsum("cf,nf,fw->cnw", S, masks, self.J[name])

    def gram(self, name: str) -> Tensor:
        V = self.column_gradients(name)
        return torch.einsum("cnw,dmw->cndm", V, V)


def mini_blocks(ggn: Tensor, shape: Sequence[int], blocks: Sequence[int]) -> Tensor:
    """``[*blocks, d, d]`` from a parameter's GGN block by index bookkeeping (row-major sub-tensors)."""
    index = torch.arange(math.prod(shape)).reshape(shape)
    sizes = [s // b for s, b in zip(shape, blocks)]
    result = []
    for position in torch.cartesian_prod(*[torch.arange(b) for b in blocks]).reshape(-1, len(blocks)).tolist():
        sub = index[tuple(slice(p * z, (p + 1) * z) for p, z in zip(position, sizes))].flatten()
        result.append(ggn[sub][:, sub])
    d = math.prod(sizes)
    return torch.stack(result).reshape(*blocks, d, d)


# ----------------------------------------------------------------------------------------------
# layer outputs and per-layer messages (for KFAC)


class Recorder:
    """Forward hooks (owned by the test) recording every call ``(module, input, output)`` of given modules."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.calls: List[Tuple[nn.Module, Tensor, Tensor]] = []
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, inputs, output):
        self.calls.append((module, inputs[0].detach(), output))

    def remove(self):
        for h in self.handles:
            h.remove()


def record_calls(model: nn.Module, X: Tensor, names: Sequence[str]):
    """Run a reference copy of ``model`` on ``X``; return ``(output, [(name, x, y) per call])``.

    ``names`` are module names (``model.named_modules()``); the calls are in forward order and ``y``
    is part of the autograd graph of ``output``.
    """
    ref = reference_copy(model)
    modules = dict(ref.named_modules())
    targets = [modules[name] for name in names]
    rec = Recorder(targets)
    try:
        out = ref(X)
    finally:
        rec.remove()
    return out, [(names[targets.index(m)], x, y) for m, x, y in rec.calls]


def output_jacobian(out: Tensor, y: Tensor) -> Tensor:
    """``∂f/∂y`` ``[|f|, |y|]`` by one autograd.grad call per output entry."""
    rows = []
    flat = out.flatten()
    for i in range(flat.numel()):
        (g,) = torch.autograd.grad(flat[i], y, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros(y.numel(), dtype=y.dtype) if g is None else g.flatten())
    return torch.stack(rows)


def layer_output_ggn(out: Tensor, y: Tensor, H: Tensor) -> Tensor:
    """``Jᵀ H J`` w.r.t. a layer output ``y`` ``[|y|, |y|]``."""
    J = output_jacobian(out, y)
    return J.T @ H @ J


def layer_output_gradient(loss: Tensor, y: Tensor) -> Tensor:
    (g,) = torch.autograd.grad(loss, y, retain_graph=True)
    return g


# ----------------------------------------------------------------------------------------------
# KFAC references (the formulas of extensions/kfac.py)


def unfolded(module: nn.Module, x: Tensor) -> Tensor:
    """The layer input's patches ``[N, G, L, D]`` (``L`` output locations, ``D`` like ``weight.flatten(1)``)."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], 1, -1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        padding = module.padding
        if isinstance(padding, str):  # 'same'/'valid': pad explicitly (the smaller half on the left)
            pads = torch_padding_pairs(padding, module.kernel_size, module.dilation)
            x = tf.pad(x, [p for pair in reversed(pads) for p in pair])
            padding = 0
        patches = tf.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        patches = patches.reshape(x.shape[0], module.groups, -1, patches.shape[-1])
        return patches.transpose(2, 3)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    layer = Layer(
        name=type(module).__name__,
        in_size=tuple(x.shape[2:]),
        kernel=tuple(module.kernel_size),
        stride=tuple(module.stride),
        padding=tuple(module.padding),
        dilation=tuple(module.dilation),
        groups=module.groups,
        c_in=module.in_channels,
        c_out=module.out_channels,
        batch=x.shape[0],
        transposed=transposed,
        output_padding=tuple(module.output_padding) if transposed else 0,
    )
    return layer.unfolded_input(x)


def kfac_input_reference(module: nn.Module, x: Tensor, approx: str) -> Tuple[Tensor, Tensor]:
    """(weight input factor ``[G, D, D]``, bias input factor ``[G, 1, 1]``)."""
    U = unfolded(module, x)
    N, G, L = U.shape[:3]
    if approx == "expand":
        weight = torch.einsum("ngld,ngle->gde", U, U) / N
        bias = torch.full((G, 1, 1), float(L), dtype=x.dtype)
    else:
        mean = U.mean(2)
        weight = torch.einsum("ngd,nge->gde", mean, mean) / N
        bias = torch.ones(G, 1, 1, dtype=x.dtype)
    return weight, bias


def _as_nco(module: nn.Module, t: Tensor, lead: int) -> Tensor:
    """A tensor with ``lead`` leading axes then the layer output axes → ``[*lead, N, C_out, O]``."""
    shape = t.shape[lead:]
    if isinstance(module, nn.Linear):
        t = t.reshape(*t.shape[:lead], shape[0], -1, shape[-1]).transpose(-1, -2)
        return t
    return t.reshape(*t.shape[:lead], shape[0], shape[1], -1)


def _flat_index(module: nn.Module, y_shape) -> Tensor:
    """``[N, C, O]`` → position in ``y.flatten()`` (the layer's own output layout)."""
    index = torch.arange(math.prod(y_shape)).reshape(y_shape)
    return _as_nco(module, index[None], 1)[0]


def kfac_output_reference(module: nn.Module, M: Tensor, y_shape, approx: str) -> Tensor:
    """Output factor ``[G, E, E]`` from ``M`` ``[|y|, |y|]`` (a sum ``Σ_c s_c s_cᵀ`` over columns).

    expand: ``1/O Σ_{n,o} M[(n,e,o),(n,f,o)]``; reduce: ``Σ_n Σ_{o,o'} M[(n,e,o),(n,f,o')]``.
    """
    index = _flat_index(module, y_shape)  # [N, C, O]
    N, C, O = index.shape
    G = module.groups if not isinstance(module, nn.Linear) else 1
    E = C // G
    result = torch.zeros(G, E, E, dtype=M.dtype)
    for n in range(N):
        for g in range(G):
            rows = index[n, g * E : (g + 1) * E].flatten()  # (e, o) → position in y
            block = M[rows][:, rows].reshape(E, O, E, O)
            if approx == "expand":
                result[g] += block.diagonal(dim1=1, dim2=3).sum(-1) / O
            else:
                result[g] += block.sum((1, 3))
    return result


# ----------------------------------------------------------------------------------------------
# HesScale reference (BL89 recursion with dense per-layer Jacobians, sequential models)


def bl89_step(layer: Callable, a_in: Tensor, d_out: Tensor, g_out: Tensor, gauss_newton: bool):
    """``(d_in, g_in)`` through ``layer`` at input ``a_in`` by the defining formula."""
    a_in = a_in.detach()
    jac = jacrev(layer)(a_in).reshape(d_out.numel(), a_in.numel())
    d_in = (jac.square() * d_out.reshape(-1, 1)).sum(0)
    if not gauss_newton:
        d_in = d_in + hessian(lambda z: (layer(z) * g_out).sum())(a_in).reshape(a_in.numel(), a_in.numel()).diagonal()
    return d_in.reshape(a_in.shape), (jac.T @ g_out.reshape(-1)).reshape(a_in.shape)


def parameter_diagonal_reference(module: nn.Module, x: Tensor, d: Tensor) -> Dict[str, Tensor]:
    """``diag(J_wᵀ diag(d) J_w)`` per parameter by jacrev of the layer."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    result = {}
    for name in params:
        def f(p, name=name):
            return functional_call(module, {**params, name: p}, (x,))

        jac = jacrev(f)(params[name]).reshape(d.numel(), -1)
        result[name] = (jac.square() * d.reshape(-1, 1)).sum(0).reshape(params[name].shape)
    return result


def hesscale_reference(layers: Sequence[Callable], X: Tensor, loss_fn: nn.Module, y: Tensor, gauss_newton: bool):
    """HesScale diagonals ``{id(module): {name: diag}}`` of a chain ``layers`` (modules may repeat)."""
    activations = [X]
    with torch.no_grad():
        for layer in layers:
            activations.append(layer(activations[-1]))
    out = activations[-1]
    d = output_hessian(loss_fn, out, y).diagonal().reshape(out.shape)
    o = out.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(o, y), o)
    result: Dict[int, Dict[str, Tensor]] = {}
    for k in reversed(range(len(layers))):
        layer = layers[k]
        if isinstance(layer, nn.Module) and any(True for _ in layer.parameters(recurse=False)):
            for name, value in parameter_diagonal_reference(layer, activations[k], d).items():
                entry = result.setdefault(id(layer), {})
                entry[name] = value if name not in entry else entry[name] + value
        if k > 0:
            d, g = bl89_step(layer, activations[k], d, g, gauss_newton)
    return result


# ----------------------------------------------------------------------------------------------
# per-sample gradients


def per_sample_gradients(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Dict[str, Tensor]:
    """Each sample's contribution to the reduced loss's gradient (vmap of grad; eval-mode models)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    N = X.shape[0]
    # the loss of one sample evaluated alone is ℓ_n (sum) or its mean over the sample (mean); the
    # batch's mean reduction adds 1/N on top
    factor = 1.0 if loss_fn.reduction == "sum" else 1.0 / N

    def loss_one(p, x, t):
        return loss_fn(functional_call(model, p, (x[None],)), t[None])

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, X, y)
    return {name: g * factor for name, g in grads.items()}


# ----------------------------------------------------------------------------------------------
# tests of the references themselves


@pytest.fixture(autouse=True)
def _seeded(seed):
    return seed


def test_ggn_reference_linear_mse_closed_form():
    """Linear + MSE(sum): GGN of the weight is ``2 Σ_n (I ⊗ x_n x_nᵀ)`` (row-major vec)."""
    lin = nn.Linear(3, 2).to(DT)
    X = torch.randn(4, 3, dtype=DT)
    y = torch.randn(4, 2, dtype=DT)
    ref = GGNReference(lin, nn.MSELoss(reduction="sum"), X, y)
    expected = 2 * torch.kron(torch.eye(2, dtype=DT), X.T @ X)
    assert_close(ref.block("weight"), expected, name="reference GGN")
    assert_close(ref.diag_batch("weight").sum(0), ref.diag("weight"), name="reference per-sample sum")


def test_sqrt_reference_factorises_hessian():
    out = torch.randn(3, 4, dtype=DT)
    for kind in ("ce", "mse", "bce", "ce_sum"):
        loss_fn, y = make_loss(kind, out.shape)
        S = explicit_sqrt_hessian(loss_fn, out)  # [C, N, K]: C columns per sample
        blocks = torch.einsum("cnk,cnl->nkl", S, S)
        assert_close(torch.block_diag(*blocks), output_hessian(loss_fn, out, y), name=f"S Sᵀ ({kind})")


def test_kfac_reference_linear_single_sample_is_exact():
    """For one sample KFAC of a Linear layer is the exact GGN block: output ⊗ input."""
    lin = nn.Linear(3, 2).to(DT)
    X = torch.randn(1, 3, dtype=DT)
    loss_fn, y = make_loss("ce", (1, 2))
    out, calls = record_calls(lin, X, [""])
    _, x, yy = calls[0]
    H = output_hessian(loss_fn, out, y)
    M = layer_output_ggn(out, yy, H)
    A, _ = kfac_input_reference(lin, x, "expand")
    B = kfac_output_reference(lin, M, yy.shape, "expand")
    exact = GGNReference(lin, loss_fn, X, y).block("weight")
    assert_close(torch.kron(B[0], A[0]), exact, name="KFAC reference for one sample")


def test_unfold_references_agree():
    """F.unfold (Conv2d) and the explicit-loop unfold of conftest agree on a grouped strided conv."""
    conv = nn.Conv2d(4, 2, 3, stride=2, padding=1, dilation=1, groups=2).to(DT)
    x = torch.randn(2, 4, 5, 5, dtype=DT)
    layer = Layer("c", (5, 5), (3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=2, c_in=4, c_out=2, batch=2)
    assert_close(unfolded(conv, x), layer.unfolded_input(x), name="unfold")
    # and the patches reproduce the convolution
    U = unfolded(conv, x)  # [N, G, L, D]
    W = conv.weight.detach().reshape(2, 1, -1)  # [G, E, D]
    y = torch.einsum("ngld,ged->ngel", U, W).reshape(2, 2, 3, 3) + conv.bias.detach()[None, :, None, None]
    assert_close(y, conv(x).detach(), name="conv from patches")


def test_hesscale_reference_single_linear_is_exact():
    """One Linear layer + MSE: the Hessian is the GGN; HesScale is its exact diagonal."""
    lin = nn.Linear(3, 2).to(DT)
    X = torch.randn(4, 3, dtype=DT)
    loss_fn, y = make_loss("mse", (4, 2))
    ref = hesscale_reference([lin], X, loss_fn, y, gauss_newton=False)[id(lin)]
    ggn = GGNReference(lin, loss_fn, X, y)
    for name in ("weight", "bias"):
        assert_close(ref[name], ggn.diag(name), name=name)
