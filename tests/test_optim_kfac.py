"""KFAC optimizer (curvlib.optim.KFAC) against factors and Kronecker inverses computed by hand.

References are independent of curvlib: layer inputs/outputs from plain forward hooks, patches by
an explicit unfold loop (conftest), output factors from ``torch.func`` Jacobians of the rest of the
network and the loss Hessian, and the preconditioned step by solving with the explicit Kronecker
matrix ``G ⊗ A`` (float64).
"""

from __future__ import annotations

import copy
import gc
import io
import math

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev

from conftest import Layer, assert_close
from curvlib.optim import KFAC

DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------
# tiny networks: one convolution-like layer, Tanh, Flatten, Linear


NETS = {
    # name: (first layer, its conftest description (None for Linear), input shape per sample)
    "conv2d-groups": (
        lambda: nn.Conv2d(2, 4, 2, groups=2),
        Layer("c2", in_size=(3, 3), kernel=(2, 2), groups=2, c_in=2, c_out=4),
        (2, 3, 3),
    ),
    "conv1d-padding": (
        lambda: nn.Conv1d(2, 3, 3, padding=1, stride=2),
        Layer("c1", in_size=(5,), kernel=(3,), padding=1, stride=2, c_in=2, c_out=3),
        (2, 5),
    ),
    "convtranspose2d-groups": (
        lambda: nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2),
        Layer("t2", in_size=(2, 2), kernel=(2, 2), stride=2, groups=2, c_in=4, c_out=4, transposed=True),
        (4, 2, 2),
    ),
    "linear": (lambda: nn.Linear(5, 4), None, (5,)),
}


def make_net(name: str, classes: int = 3, bias: bool = True) -> nn.Sequential:
    build, description, shape = NETS[name]
    first = build()
    if not bias:
        first.bias = None
    with torch.no_grad():
        out = first(torch.zeros(1, *shape))
    net = nn.Sequential(first, nn.Tanh(), nn.Flatten(), nn.Linear(out[0].numel(), classes))
    return net.to(DTYPE)


def weight_blocks(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``W_g`` ``[G, E, D]`` as documented (written out explicitly, not with the optimizer's helper)."""
    if isinstance(module, nn.Linear):
        return tensor[None]
    groups = module.groups
    if isinstance(module, nn.ConvTranspose2d):
        c_in_g = tensor.shape[0] // groups
        blocks = []
        for g in range(groups):
            w = tensor[g * c_in_g : (g + 1) * c_in_g]  # [C_in/G, E, *K]
            blocks.append(w.transpose(0, 1).reshape(w.shape[1], -1))
        return torch.stack(blocks)
    return tensor.reshape(groups, tensor.shape[0] // groups, -1)


def reference_factors(net, X, y, index, approx, fisher, description=None):
    """``(A [G, D, D], G [G, E, E], a)`` of layer ``net[index]`` by hand (float64)."""
    loss_fn = nn.CrossEntropyLoss()
    module = net[index]
    head, tail = net[:index], net[index + 1 :]
    x_in = head(X).detach()
    y_out = module(x_in).detach()
    n = X.shape[0]
    # input factor
    if isinstance(module, nn.Linear):
        patches = x_in[:, None, None, :]  # [N, G=1, L=1, D]
    else:
        patches = description.unfolded_input(x_in)  # [N, G, L, D]
    groups, locations = patches.shape[1], patches.shape[2]
    if approx == "expand":
        A = torch.einsum("ngld,ngle->gde", patches, patches) / n
        a = float(locations)
    else:
        mean = patches.mean(2)
        A = torch.einsum("ngd,nge->gde", mean, mean) / n
        a = 1.0
    # output factor from per-sample curvature w.r.t. the layer output M = Jᵀ H J (or gradients)
    out_shape = y_out.shape[1:]
    channels = out_shape[0]
    if fisher == "type-2":
        f = tail(y_out)
        J = jacrev(tail)(y_out).reshape(f.numel(), y_out.numel())
        H = hessian(lambda logits: loss_fn(logits, y))(f.detach()).reshape(f.numel(), f.numel())
        locations_out = y_out[0, 0].numel() if y_out.dim() > 2 else 1
        M = (J.T @ H @ J).reshape(n, channels, locations_out, n, channels, locations_out)
        M = torch.stack([M[i, :, :, i] for i in range(n)])  # [N, C, O, C, O]: samples do not interact
    else:  # empirical: s_n = √N ∂L/∂y_n
        y_var = y_out.clone().requires_grad_()
        grad = torch.autograd.grad(loss_fn(tail(y_var), y), y_var)[0] * math.sqrt(n)
        s = grad.reshape(n, channels, -1)
        M = torch.einsum("nco,ndp->ncodp", s, s)
    e = channels // groups
    G = []
    for g in range(groups):
        block = M[:, g * e : (g + 1) * e, :, g * e : (g + 1) * e, :]
        if approx == "expand":
            G.append(torch.einsum("niojo->ij", block) / block.shape[2])
        else:
            G.append(block.sum((0, 2, 4)))
    return A.detach(), torch.stack(G).detach(), a


def reference_direction(A, G, grad_blocks, damping, split):
    """Solve ``(G ⊗ A (+ damping)) vec(Δ) = vec(∇W)`` per group with the explicit Kronecker matrix."""
    result = []
    for g in range(A.shape[0]):
        Ag, Gg = A[g], G[g]
        if split == "exact":
            matrix = torch.kron(Gg, Ag) + damping * torch.eye(Gg.shape[0] * Ag.shape[0], dtype=DTYPE)
        else:
            if split == "pi":
                pi = math.sqrt((torch.trace(Ag) / Ag.shape[0]) / (torch.trace(Gg) / Gg.shape[0]))
            else:
                pi = 1.0
            root = math.sqrt(damping)
            eye_a, eye_g = torch.eye(Ag.shape[0], dtype=DTYPE), torch.eye(Gg.shape[0], dtype=DTYPE)
            matrix = torch.kron(Gg + root / pi * eye_g, Ag + root * pi * eye_a)
        result.append(torch.linalg.solve(matrix, grad_blocks[g].reshape(-1)).reshape(grad_blocks[g].shape))
    return torch.stack(result)


def train_step(net, opt, X, y, loss_fn=None):
    loss_fn = loss_fn or opt.loss_fn
    opt.zero_grad()
    loss = loss_fn(net(X), y)
    loss.backward()
    opt.step()
    return loss


# ----------------------------------------------------------------------------------------------
# one step equals the step computed by hand


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize(
    "fisher,split,inverse",
    [("type-2", "pi", "cholesky"), ("type-2", "sqrt", "eigen"), ("type-2", "exact", "eigen"), ("empirical", "pi", "eigen")],
)
def test_one_step_equals_hand_computed_kronecker_step(seed, net_name, approx, fisher, split, inverse):
    net = make_net(net_name)
    shape = NETS[net_name][2]
    X, y = torch.randn(3, *shape, dtype=DTYPE), torch.randint(0, 3, (3,))
    reference_net = copy.deepcopy(net)
    lr, damping = 0.3, 0.05
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(net, loss_fn, torch.optim.SGD(net.parameters(), lr=lr), approx=approx, fisher=fisher,
               damping=damping, damping_split=split, inverse=inverse)
    train_step(net, opt, X, y)

    loss = loss_fn(reference_net(X), y)
    grads = torch.autograd.grad(loss, list(reference_net.parameters()))
    grad_of = dict(zip(reference_net.parameters(), grads))
    for index in (0, 3):
        module, trained = reference_net[index], net[index]
        description = NETS[net_name][1] if index == 0 else None
        A, G, a = reference_factors(reference_net, X, y, index, approx, fisher, description)
        direction = reference_direction(A, G, weight_blocks(module, grad_of[module.weight]), damping, split)
        expected = module.weight.detach() - lr * _from_blocks(module, direction)
        assert_close(trained.weight.detach(), expected, rtol=1e-9, name=f"{net_name} layer {index} weight")
        # bias: G ⊗ a with the scalar input factor a
        bias_grad = grad_of[module.bias].reshape(G.shape[0], G.shape[1], 1)
        bias_direction = reference_direction(torch.full((G.shape[0], 1, 1), a, dtype=DTYPE), G, bias_grad, damping, split)
        expected_bias = module.bias.detach() - lr * bias_direction.reshape(module.bias.shape)
        assert_close(trained.bias.detach(), expected_bias, rtol=1e-9, name=f"{net_name} layer {index} bias")


def _from_blocks(module, blocks):
    """Inverse of :func:`weight_blocks`."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        return blocks[0]
    if isinstance(module, nn.ConvTranspose2d):
        groups = module.groups
        c_in_g = weight.shape[0] // groups
        parts = [blocks[g].reshape(weight.shape[1], c_in_g, *weight.shape[2:]).transpose(0, 1) for g in range(groups)]
        return torch.cat(parts)
    return blocks.reshape(weight.shape)


def test_kl_clip_scales_the_update(seed):
    net = make_net("conv2d-groups")
    X, y = torch.randn(4, 2, 3, 3, dtype=DTYPE), torch.randint(0, 3, (4,))
    clipped_net = copy.deepcopy(net)
    lr, kappa = 0.5, 1e-6
    free = KFAC(net, nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=lr), fisher="type-2")
    clipped = KFAC(clipped_net, nn.CrossEntropyLoss(), torch.optim.SGD(clipped_net.parameters(), lr=lr),
                   fisher="type-2", kl_clip=kappa)
    grads = []
    for model, opt in ((net, free), (clipped_net, clipped)):
        opt.zero_grad()
        opt.loss_fn(model(X), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    deltas = [p.grad for p in net.parameters()]
    vg = sum(lr**2 * (d * g).sum() for d, g in zip(deltas, grads[0])).item()
    nu = min(1.0, math.sqrt(kappa / vg))
    assert nu < 1, "the test needs an update large enough to be clipped"
    assert clipped.last_kl_scale == pytest.approx(nu, rel=1e-12)
    for d, clipped_delta in zip(deltas, (p.grad for p in clipped_net.parameters())):
        assert_close(clipped_delta, nu * d, rtol=1e-12, name="clipped update")


# ----------------------------------------------------------------------------------------------
# moving average, intervals, hooks


def _forward_hook_count(*modules) -> int:
    return sum(len(m._forward_hooks) for module in modules for m in module.modules())


def test_ema_intervals_and_hooks(seed):
    net = make_net("conv2d-groups")
    loss_fn = nn.CrossEntropyLoss()
    batches = [(torch.randn(3, 2, 3, 3, dtype=DTYPE), torch.randint(0, 3, (3,))) for _ in range(6)]
    ema, damping = 0.75, 0.01
    # lr = 0: the parameters stay put, so every step's factors come from the same network
    opt = KFAC(net, loss_fn, torch.optim.SGD(net.parameters(), lr=0.0), approx="expand", fisher="type-2",
               ema=ema, damping=damping, factor_update_every=2, inverse_update_every=4)
    description = NETS["conv2d-groups"][1]
    factors = [reference_factors(net, X, y, 0, "expand", "type-2", description) for X, y in batches]
    directions = {}
    for step, (X, y) in enumerate(batches):
        assert opt.hooks_active == (step % 2 == 0), f"hooks before step {step}"
        assert (_forward_hook_count(net, loss_fn) > 0) == (step % 2 == 0)
        loss = loss_fn(net(X), y)
        grad = torch.autograd.grad(loss, net[0].weight, retain_graph=True)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        directions[step] = (weight_blocks(net[0], grad), weight_blocks(net[0], net[0].weight.grad))
    assert opt.hooks_active  # step 6 collects again

    def average(steps):
        A, G = factors[steps[0]][0], factors[steps[0]][1]
        for s in steps[1:]:
            A, G = ema * A + (1 - ema) * factors[s][0], ema * G + (1 - ema) * factors[s][1]
        return A, G

    A, G = average([0, 2, 4])
    current = opt.factors(net[0])
    assert_close(current["A"], A, rtol=1e-10, name="EMA input factor")
    assert_close(current["G"], G, rtol=1e-10, name="EMA output factor")
    # step 3 uses the inverses of step 0 (factors of step 2 are not inverted before step 4);
    # steps 4 and 5 use the inverses of the factors averaged over steps 0, 2, 4
    for step, used in ((1, [0]), (3, [0]), (5, [0, 2, 4])):
        A, G = average(used)
        grad, got = directions[step]
        assert_close(got, reference_direction(A, G, grad, damping, "pi"), rtol=1e-9, name=f"direction at step {step}")


def test_damping_change_takes_effect_at_next_inverse_update(seed):
    net = make_net("linear")
    X, y = torch.randn(4, 5, dtype=DTYPE), torch.randint(0, 3, (4,))
    opt = KFAC(net, nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.0), fisher="type-2",
               damping=1e-2, ema=0.0, inverse_update_every=2)
    train_step(net, opt, X, y)
    first = net[0].weight.grad.clone()
    opt.damping = 10.0
    train_step(net, opt, X, y)  # step 1: old inverses
    assert_close(net[0].weight.grad, first, rtol=1e-12, name="direction before the inverse update")
    train_step(net, opt, X, y)  # step 2: new damping
    A, G, _ = reference_factors(net, X, y, 0, "expand", "type-2")
    grad = torch.autograd.grad(nn.CrossEntropyLoss()(net(X), y), net[0].weight)[0]
    assert_close(net[0].weight.grad, reference_direction(A, G, grad[None], 10.0, "pi")[0], rtol=1e-9,
                 name="direction with the new damping")


def test_no_factors_means_plain_update_and_warning(seed):
    net = make_net("linear")
    X, y = torch.randn(4, 5, dtype=DTYPE), torch.randint(0, 3, (4,))
    opt = KFAC(net, nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.1), fisher="type-2")
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    loss = nn.functional.cross_entropy(net(X), y)  # not the loss module given to KFAC: no statistics
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    with pytest.warns(UserWarning, match="no curvature statistics"):
        opt.step()
    for p, p0, g in zip(net.parameters(), before, grads):
        assert_close(p.detach(), p0 - 0.1 * g, rtol=1e-12, name="plain SGD step")


# ----------------------------------------------------------------------------------------------
# every layer type; fallback; skip list


class MixedNet(nn.Module):
    """Conv3d → Conv1d → grouped Conv2d → grouped ConvTranspose2d → BatchNorm → depthwise → Linear, LayerNorm."""

    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(1, 2, 2, padding=1)               # [N,2,3,3,3]
        self.conv1d = nn.Conv1d(2, 4, 3, padding=1)               # on [N,2,27]
        self.conv2d = nn.Conv2d(4, 4, 3, padding=1, groups=2)     # on [N,4,9,3]
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2, bias=False)  # [N,4,18,6], BatchNorm next
        self.bn = nn.BatchNorm2d(4)
        self.depthwise = nn.Conv2d(4, 4, 3, stride=3, groups=4)   # [N,4,6,2]
        self.norm = nn.LayerNorm(48)
        self.head = nn.Linear(48, 5)

    def forward(self, x):
        x = torch.tanh(self.conv3d(x))
        x = torch.tanh(self.conv1d(x.flatten(2)))
        x = torch.relu(self.conv2d(x.reshape(x.shape[0], 4, 9, 3)))
        x = torch.relu(self.bn(self.up(x)))
        x = self.depthwise(x)
        return self.head(self.norm(x.flatten(1)))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_every_layer_type_and_plain_fallback(seed, approx):
    net = MixedNet().to(DTYPE)
    X, y = torch.randn(6, 1, 2, 2, 2, dtype=DTYPE), torch.randint(0, 5, (6,))
    loss_fn = nn.CrossEntropyLoss()
    lr = 0.05
    opt = KFAC(net, loss_fn, torch.optim.SGD(net.parameters(), lr=lr), approx=approx, fisher="mc",
               damping=0.1, kl_clip=1e-2, skip=["conv1d"])
    assert sorted(opt.plain_update_modules) == ["bn", "conv1d", "norm"]
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    opt.zero_grad()
    first_loss = loss_fn(net(X), y)
    first_loss.backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    opt.step()
    for name, p in net.named_parameters():
        plain = before[name] - lr * grads[name]
        if name.split(".")[0] in ("bn", "conv1d", "norm"):
            assert_close(p.detach(), plain, rtol=1e-12, name=f"{name}: plain update")
        else:
            assert not torch.allclose(p.detach(), plain), f"{name} was not preconditioned"
            assert opt.factors(name.split(".")[0]), f"no factors for {name}"
    losses = [train_step(net, opt, X, y).item() for _ in range(8)]
    assert losses[-1] < first_loss.item(), f"no progress in 9 steps: {first_loss.item():.3f} → {losses}"


def test_frozen_and_unoptimized_parameters(seed):
    net = make_net("conv2d-groups")
    net[0].weight.requires_grad_(False)
    opt = KFAC(net, nn.CrossEntropyLoss(), torch.optim.SGD([net[0].bias, net[3].weight], lr=0.1), fisher="type-2")
    X, y = torch.randn(3, 2, 3, 3, dtype=DTYPE), torch.randint(0, 3, (3,))
    bias_before = net[3].bias.detach().clone()
    train_step(net, opt, X, y)
    assert set(opt.factors(net[0])) == {"G", "a"}  # bias only
    assert set(opt.factors(net[3])) == {"A", "G"}  # weight only
    assert torch.equal(net[3].bias.detach(), bias_before)  # not in the optimizer: untouched


# ----------------------------------------------------------------------------------------------
# checkpoints


def _checkpoint_run(base_factory, steps_before, steps_after, seed):
    torch.manual_seed(seed)
    net = MixedNet().to(DTYPE)
    batches = [(torch.randn(4, 1, 2, 2, 2, dtype=DTYPE), torch.randint(0, 5, (4,))) for _ in range(steps_before + steps_after)]
    loss_fn = nn.CrossEntropyLoss()

    def build(model):
        base = base_factory(model.parameters())
        opt = KFAC(model, loss_fn, base, approx="reduce", fisher="mc", mc_samples=2, factor_update_every=2,
                   inverse_update_every=3, kl_clip=1e-2, seed=seed)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    opt, scheduler = build(net)
    for X, y in batches[:steps_before]:
        train_step(net, opt, X, y)
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()}, buffer)
    for X, y in batches[steps_before:]:
        torch.rand(3)  # the user's own use of the global generator must not matter
        train_step(net, opt, X, y)
        scheduler.step()
    continued = [p.detach().clone() for p in net.parameters()]

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    torch.manual_seed(seed + 1)
    resumed = MixedNet().to(DTYPE)
    resumed.load_state_dict(checkpoint["model"])
    opt2, scheduler2 = build(resumed)
    opt2.load_state_dict(checkpoint["opt"])
    scheduler2.load_state_dict(checkpoint["sched"])
    for X, y in batches[steps_before:]:
        train_step(resumed, opt2, X, y)
        scheduler2.step()
    return continued, [p.detach() for p in resumed.parameters()], opt2


@pytest.mark.parametrize(
    "base_factory",
    [lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3), lambda params: torch.optim.Adam(params, lr=1e-2)],
    ids=["sgd-momentum", "adam"],
)
def test_state_dict_resume_is_bit_identical(seed, base_factory):
    continued, resumed, opt = _checkpoint_run(base_factory, steps_before=3, steps_after=4, seed=seed)
    assert opt.steps == 7
    for a, b in zip(continued, resumed):
        assert torch.equal(a, b), f"resumed run differs: max {(a - b).abs().max().item():.3e}"


def test_mc_sampling_uses_its_own_generator(seed):
    net = make_net("linear")
    X, y = torch.randn(4, 5, dtype=DTYPE), torch.randint(0, 3, (4,))
    opt = KFAC(net, nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.1), fisher="mc", seed=7)
    state = torch.get_rng_state()
    opt.zero_grad()
    opt.loss_fn(net(X), y).backward()
    assert torch.equal(torch.get_rng_state(), state), "MC sampling drew from the global generator"
    opt.step()


# ----------------------------------------------------------------------------------------------
# robustness of the hooks


def test_hooks_survive_exceptions_double_calls_eval_passes_and_deletion(seed):
    net = make_net("conv2d-groups")
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(4, 2, 3, 3, dtype=DTYPE), torch.randint(0, 3, (4,))
    opt = KFAC(net, loss_fn, torch.optim.SGD(net.parameters(), lr=0.1), fisher="type-2")
    # an exception between the forward pass and step(): the next iteration starts clean
    opt.zero_grad()
    with pytest.raises(RuntimeError):
        net(torch.randn(4, 3, 3, 3, dtype=DTYPE))  # wrong channel count
    # an evaluation pass without gradients and a second loss module on another model in between
    with torch.no_grad():
        net(X)
    other = make_net("linear")
    loss_fn(other(torch.randn(2, 5, dtype=DTYPE)), torch.randint(0, 3, (2,))).backward()
    train_step(net, opt, X, y)
    assert opt.factors(net[0])["A"].shape == (2, 4, 4)
    # the model called twice in one step (a layer shared by two calls): factors sum over the calls
    opt.zero_grad()
    loss_fn(net(X) + net(2 * X), y).backward()
    opt.step()
    # an optimizer that is dropped removes its hooks
    opt2 = KFAC(other, loss_fn, torch.optim.SGD(other.parameters(), lr=0.1))
    assert _forward_hook_count(other) > 0
    del opt2
    gc.collect()
    assert _forward_hook_count(other) == 0
    opt.remove_hooks()
    assert _forward_hook_count(net, loss_fn) == 0


def test_gradient_accumulation_averages_statistics(seed):
    net = make_net("linear")
    X, y = torch.randn(6, 5, dtype=DTYPE), torch.randint(0, 3, (6,))
    whole, halves = copy.deepcopy(net), copy.deepcopy(net)
    opts = [KFAC(m, nn.CrossEntropyLoss(), torch.optim.SGD(m.parameters(), lr=0.1), fisher="type-2", approx="expand")
            for m in (whole, halves)]
    train_step(whole, opts[0], X, y)
    opts[1].zero_grad()
    for part in (slice(0, 3), slice(3, 6)):
        (opts[1].loss_fn(halves(X[part]), y[part]) / 2).backward()
    opts[1].step()
    for key in ("A", "G"):
        assert_close(opts[1].factors(halves[0])[key], opts[0].factors(whole[0])[key], rtol=1e-10, name=key)
    for p, q in zip(whole.parameters(), halves.parameters()):
        assert_close(q.detach(), p.detach(), rtol=1e-10, name="parameters")


def test_grad_scaler_and_empirical_factors(seed):
    net = make_net("conv2d-groups")
    X, y = torch.randn(4, 2, 3, 3, dtype=DTYPE), torch.randint(0, 3, (4,))
    scaled_net = copy.deepcopy(net)
    loss_fn = nn.CrossEntropyLoss()
    plain = KFAC(net, loss_fn, torch.optim.SGD(net.parameters(), lr=0.1), fisher="empirical")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = KFAC(scaled_net, loss_fn, torch.optim.SGD(scaled_net.parameters(), lr=0.1), fisher="empirical",
                  grad_scaler=scaler)
    for _ in range(2):
        train_step(net, plain, X, y)
        scaled.zero_grad()
        scaler.scale(loss_fn(scaled_net(X), y)).backward()
        scaler.step(scaled)
        scaler.update()
    for p, q in zip(net.parameters(), scaled_net.parameters()):
        assert_close(q.detach(), p.detach(), rtol=1e-10, name="parameters with GradScaler")


def test_float32_model_float64_factors_and_autocast(seed):
    net = make_net("conv2d-groups").float()
    X, y = torch.randn(4, 2, 3, 3), torch.randint(0, 3, (4,))
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(net, loss_fn, torch.optim.SGD(net.parameters(), lr=0.1), factor_dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(net(X), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert opt.factors(net[0])["A"].dtype == torch.float64
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())


def test_autocast_input_factors_come_from_float32_inputs(seed):
    """Under bfloat16 autocast the Linear layer's recorded input is bfloat16; its factor is computed from
    that input cast to float32 (the engine starts the input factors early: the cast must come first)."""
    net = make_net("conv2d-groups").float()
    X, y = torch.randn(6, 2, 3, 3), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(net, loss_fn, torch.optim.SGD(net.parameters(), lr=0.1), factor_dtype=torch.float64)
    recorded = []
    handle = net[3].register_forward_hook(lambda m, i, o: recorded.append(i[0].detach()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(net(X), y)
    handle.remove()
    opt.zero_grad()
    loss.backward()
    opt.step()
    x = recorded[0]
    assert x.dtype == torch.bfloat16
    x = x.double()
    assert_close(opt.factors(net[3])["A"][0], x.T @ x / x.shape[0], rtol=1e-6, name="Linear A under autocast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_factors_of_accumulated_passes_wait_for_the_side_stream(seed, monkeypatch):
    """On CUDA the input factors run on the engine's side stream; the optimizer files them only after
    their backward pass ended. A slowed-down factor (``torch.cuda._sleep``) over two accumulated backward
    passes still gives the average of the factors of the two batches."""
    import curvlib.functional as F

    original = F.kfc

    def slow_kfc(x, *args, **kwargs):
        torch.cuda._sleep(50_000_000)
        return original(x, *args, **kwargs)

    monkeypatch.setattr(F, "kfc", slow_kfc)
    net = make_net("conv2d-groups").float().cuda()
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(net, loss_fn, torch.optim.SGD(net.parameters(), lr=0.1), approx="expand", factor_dtype=torch.float64)
    batches = [(torch.randn(8, 2, 3, 3, device="cuda"), torch.randint(0, 3, (8,), device="cuda")) for _ in range(2)]
    with torch.no_grad():  # the Linear layer's inputs, before the step changes the convolution
        hidden = [torch.tanh(net[0](X)).flatten(1).double() for X, _ in batches]
    expected = sum(h.T @ h / h.shape[0] for h in hidden) / 2
    opt.zero_grad()
    for X, y in batches:
        loss_fn(net(X), y).backward()
    opt.step()
    assert_close(opt.factors(net[3])["A"][0], expected, rtol=1e-5, name="Linear A, two passes, side stream")


# ----------------------------------------------------------------------------------------------
# configuration errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(damping=-1e-3), "damping"),
        (dict(approx="diagonal"), "approx"),
        (dict(fisher="hessian"), "fisher"),
        (dict(ema=1.0), "ema"),
        (dict(factor_update_every=0), "factor_update_every"),
        (dict(inverse_update_every=2.5), "inverse_update_every"),
        (dict(inverse="svd"), "inverse"),
        (dict(damping_split="exact"), "inverse='eigen'"),
        (dict(damping_split="half"), "damping_split"),
        (dict(kl_clip=0.0), "kl_clip"),
        (dict(factor_dtype=torch.int32), "factor_dtype"),
        (dict(skip=["nope"]), "no submodule named 'nope'"),
        (dict(distributed="yes"), "distributed"),
    ],
)
def test_bad_configuration(kwargs, match):
    net = make_net("linear")
    with pytest.raises(ValueError, match=match):
        KFAC(net, nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.1), **kwargs)


def test_bad_arguments():
    net = make_net("linear")
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no Linear or convolution layer"):
        norm = nn.Sequential(nn.LayerNorm(3), nn.BatchNorm1d(3))
        KFAC(norm, nn.CrossEntropyLoss(), torch.optim.SGD(norm.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no Linear or convolution layer"):
        KFAC(net, nn.CrossEntropyLoss(), sgd, skip=[net[0], net[3]])
    with pytest.raises(TypeError, match="base must be a torch.optim.Optimizer"):
        KFAC(net, nn.CrossEntropyLoss(), "sgd")
    with pytest.raises(TypeError, match="not another curvature optimizer"):
        KFAC(net, nn.CrossEntropyLoss(), KFAC(net, nn.CrossEntropyLoss(), sgd))
    with pytest.raises(ValueError, match="loss_fn"):
        KFAC(net, nn.NLLLoss(), sgd)
    with pytest.raises(TypeError, match="model"):
        KFAC("net", nn.CrossEntropyLoss(), sgd)


def test_inversion_skipped_when_factors_and_damping_are_unchanged(seed, monkeypatch):
    net = make_net("linear")
    X, y = torch.randn(4, 5, dtype=DTYPE), torch.randint(0, 3, (4,))
    opt = KFAC(net, nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.1), factor_update_every=4,
               inverse_update_every=2)
    steps = []
    original = opt._compute_inverses
    monkeypatch.setattr(opt, "_compute_inverses", lambda name: (steps.append(opt.steps), original(name)))
    for step in range(8):
        if step == 6:
            opt.damping = 0.5
        train_step(net, opt, X, y)
    assert steps == [0, 0, 4, 4, 6, 6]  # two layers; factors new at 0 and 4, damping new at 6


# ----------------------------------------------------------------------------------------------
# damped inverses


def test_cholesky_retried_in_float64():
    from curvlib.optim._linalg import damped_inverse

    # an exactly representable rank-1 float32 factor: + 1e-4 I vanishes in float32 (ulp(1e4) ≈ 1e-3),
    # so the float32 Cholesky fails, while in float64 the damped factor is positive definite
    v = torch.tensor([100.0, 200.0, 300.0])
    A = torch.outer(v, v)[None]
    assert torch.linalg.cholesky_ex(A + 1e-4 * torch.eye(3))[1].item() > 0, "float32 Cholesky should fail"
    inverse = damped_inverse(A, torch.tensor([1e-4]))
    expected = torch.linalg.inv(A.double() + 1e-4 * torch.eye(3, dtype=DTYPE))
    assert inverse.dtype == torch.float32
    assert_close(inverse.double(), expected, rtol=1e-5, name="float64 retry")
    with pytest.raises(ValueError, match="increase damping"):
        damped_inverse(A, torch.tensor([0.0]))


def test_float16_autocast_with_grad_scaler_gives_finite_empirical_factors(seed):
    # loss-scaled float16 gradients squared overflow float16: statistics are accumulated in float32
    net = make_net("conv2d-groups").float()
    reference = copy.deepcopy(net)
    X, y = torch.randn(8, 2, 3, 3), torch.randint(0, 3, (8,))
    loss_fn = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = KFAC(net, loss_fn, torch.optim.SGD(net.parameters(), lr=0.1), fisher="empirical", grad_scaler=scaler)
    plain = KFAC(reference, loss_fn, torch.optim.SGD(reference.parameters(), lr=0.1), fisher="empirical")
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = loss_fn(net(X), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    train_step(reference, plain, X, y)
    for key in ("A", "G"):
        got, expected = opt.factors(net[0])[key], plain.factors(reference[0])[key]
        assert got.dtype == torch.float32
        assert_close(got, expected, rtol=2e-2, name=f"{key} under float16 autocast")
