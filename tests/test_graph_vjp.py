"""The engine's graph walk with batched rules (curvlib.engine.graph_vjp, curvlib.engine.batched_rules).

Reference: one ``torch.autograd.grad`` per vector (autograd's own backward formulas), float64, fresh
random inputs and vectors per test.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge

from curvlib import extensions as ext
from curvlib.engine import curvature
from curvlib.engine.batched_rules import BackwardOptions, UnsupportedNode, rule_for, supported_node_names
from curvlib.engine.graph_vjp import GraphVJP
from curvlib.engine.padding import ConstantPadding
from curvlib.precision import fp32_precision

DTYPE = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def looped_vjp(output, tensors, vectors):
    """``[J, *t.shape]`` per tensor: one autograd backward per vector (zeros where not reached)."""
    per_vector = [torch.autograd.grad(output, tensors, v, retain_graph=True, allow_unused=True) for v in vectors]
    return [torch.stack([g[i] if g[i] is not None else torch.zeros_like(t) for g in per_vector])
            for i, t in enumerate(tensors)]


def check(output, watched, vectors=None, options=BackwardOptions(), source=None, tol=1e-12):
    """Graph walk against the looped reference at the tensors ``watched``; returns the plan."""
    vectors = torch.randn(4, *output.shape, dtype=output.dtype, device=output.device) if vectors is None else vectors
    plan = GraphVJP.build(output if source is None else source, [get_gradient_edge(t) for t in watched], options)
    assert plan is not None, "a node on the way has no rule"
    got = plan.run(vectors, [t.shape for t in watched])
    expected = looped_vjp(output, watched, vectors)
    for g, e, t in zip(got, expected, watched):
        assert g.shape == (vectors.shape[0], *t.shape)
        torch.testing.assert_close(g, e, atol=tol, rtol=tol)
    return plan


def forward_recording(layers, x):
    """Run ``layers`` one by one; the output and every intermediate."""
    outputs = []
    for layer in layers:
        x = layer(x)
        outputs.append(x)
    return x, outputs


class Padded(nn.Module):
    """``F.pad`` through the engine's view-backward padding (``ConstantPaddingBackward``)."""

    def __init__(self, pad):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return ConstantPadding.apply(x, self.pad, 0.25)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def all_cnn_like():
    return [
        nn.ZeroPad2d(1), nn.Conv2d(3, 5, 3), nn.ReLU(), Padded((0, 1, 0, 1)), nn.Conv2d(5, 6, 3, stride=2), nn.ReLU(),
        nn.ConstantPad2d((1, -1, 0, 2), 0.5), nn.Conv2d(6, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    ]


def pooling_and_norm():
    return [
        nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6).eval(), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 3, padding=1, dilation=1), nn.Hardtanh(-0.5, 0.7), nn.AvgPool2d(2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(2), Lambda(lambda t: t.permute(0, 2, 3, 1)), Lambda(lambda t: t.transpose(1, 2)),
        Lambda(lambda t: t.reshape(t.shape[0], -1)), nn.Linear(16, 5),
    ]


def activations():
    return [
        nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8),
        nn.SiLU(), nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 8), nn.Mish(),
        nn.Linear(8, 8), nn.Hardswish(), nn.LogSigmoid(), nn.Linear(8, 8), nn.Dropout(0.3), nn.CELU(),
        Lambda(lambda t: (t.exp() + 2.0).log() * 0.5 - (t.abs() + 1.0).sqrt() / 3.0 + t.pow(2) * 0.1),
        Lambda(lambda t: t.unsqueeze(1).squeeze(1).mean(-1, keepdim=True) + t.sum(-1, keepdim=True) - t),
        nn.Linear(8, 3),
    ]


def volumetric():
    return [
        nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2), nn.ConvTranspose3d(4, 3, 2, stride=2),
        nn.AvgPool3d(2), nn.Flatten(), Lambda(lambda t: t.t().t()), nn.Linear(3 * 8, 2),
    ]


def one_dimensional():
    # the second transposed layer's output padding (2) is not below its stride: the data gradient's
    # adjoint convolution overshoots and convolution_backward runs instead
    return [nn.Conv1d(3, 4, 5, stride=2, padding=2), nn.Threshold(0.1, -1.0), nn.ConvTranspose1d(4, 2, 3, stride=2),
            nn.ConvTranspose1d(2, 2, 3, stride=2, dilation=3, output_padding=2), nn.BatchNorm1d(2).eval(),
            Lambda(lambda t: t.mean((1, 2)))]


MODELS = {
    "all_cnn_like": (all_cnn_like, (3, 3, 8, 8), [1, 4, 7, 11]),
    "pooling_and_norm": (pooling_and_norm, (2, 3, 8, 8), [0, 1, 4, 11]),
    "activations": (activations, (5, 6), [0, 2, 6, 12, 17, 22]),
    "volumetric": (volumetric, (2, 2, 4, 4, 4), [0, 3, 7]),
    "one_dimensional": (one_dimensional, (3, 3, 10), [0, 2, 3]),
}


def randomize(layers):
    for layer in layers:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.data.uniform_(0.5, 1.5)
    return layers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_graph_vjp_matches_autograd(name, device):
    make, shape, watched = MODELS[name]
    layers = randomize([layer.to(device, DTYPE) for layer in make()])
    for layer in layers:
        layer.train(isinstance(layer, nn.Dropout))
    out, outputs = forward_recording(layers, torch.randn(*shape, dtype=DTYPE, device=device))
    plan = check(out, [outputs[i] for i in watched])
    names = {type(node).__name__ for node in plan.order}
    assert names - {"AccumulateGrad"}, names


def test_graph_vjp_residual_and_broadcast():
    """Nodes feeding several consumers (gradients summed), broadcast operands (gradients summed to shape)."""
    conv1, conv2 = nn.Conv2d(3, 3, 3, padding=1).to(DTYPE), nn.Conv2d(3, 3, 1).to(DTYPE)
    x = torch.randn(2, 3, 5, 5, dtype=DTYPE, requires_grad=True)
    h = conv1(x)
    a = torch.relu(h)
    gate = torch.sigmoid(a.mean((2, 3), keepdim=True))  # [N, C, 1, 1]
    b = conv2(a * gate) + h  # broadcast product and a residual sum
    c = b / (2.0 + gate) - 0.5 * b
    out = c.sum((2, 3))
    check(out, [h, a, b])


def test_graph_vjp_staged_source_and_unreached_edges():
    conv1, conv2 = nn.Conv2d(2, 3, 3).to(DTYPE), nn.Conv2d(3, 2, 3).to(DTYPE)
    x = torch.randn(2, 2, 7, 7, dtype=DTYPE)
    h1 = conv1(x)
    h2 = conv2(torch.relu(h1))
    out = h2.sum((2, 3))
    gate = get_gradient_edge(h2)
    vectors = torch.randn(3, *h2.shape, dtype=DTYPE)
    plan = GraphVJP.build(gate, [get_gradient_edge(h1), gate])
    got_h1, got_h2 = plan.run(vectors, [h1.shape, h2.shape])
    torch.testing.assert_close(got_h2, vectors)  # the source's own edge: the vectors
    torch.testing.assert_close(got_h1, looped_vjp(h2, [h1], vectors)[0])
    # an edge not below the source: zeros of its shape, or an error where it must be reached
    other = torch.randn(2, 4, dtype=DTYPE, requires_grad=True) * 2
    plan = GraphVJP.build(out, [get_gradient_edge(h1), get_gradient_edge(other)])
    vectors = torch.randn(3, *out.shape, dtype=DTYPE)
    grads = plan.run(vectors, [h1.shape, other.shape])
    assert grads[1].shape == (3, 2, 4) and not grads[1].any()
    with pytest.raises(RuntimeError, match="must reach"):
        plan.run(vectors, [h1.shape, None])


def test_graph_vjp_declines_nodes_without_rules():
    x = torch.randn(3, 4, dtype=DTYPE, requires_grad=True)
    h = x * 2
    out = torch.cumsum(h, 1)  # CumsumBackward0: no batched rule
    assert rule_for(out.grad_fn) is None
    assert GraphVJP.build(out, [get_gradient_edge(h)]) is None
    assert GraphVJP.build(out, [h]) is None  # tensors, not gradient edges: autograd resolves them
    assert "ConvolutionBackward0" in supported_node_names()


def test_batch_norm_in_training_mode_is_unsupported_at_run_time():
    bn = nn.BatchNorm2d(3).to(DTYPE).train()
    conv = nn.Conv2d(3, 3, 1).to(DTYPE)
    h = conv(torch.randn(4, 3, 2, 2, dtype=DTYPE))
    out = bn(h).sum((2, 3))
    plan = GraphVJP.build(out, [get_gradient_edge(h)])
    assert plan is not None
    with pytest.raises(UnsupportedNode, match="training"):
        plan.run(torch.randn(2, *out.shape, dtype=DTYPE), [h.shape])


def test_rules_derive_from_saved_tensors_once():
    conv1, conv2 = nn.Conv2d(2, 3, 3).to(DTYPE), nn.Conv2d(3, 2, 3).to(DTYPE)
    h = conv1(torch.randn(2, 2, 7, 7, dtype=DTYPE))
    out = conv2(torch.relu(h)).sum((2, 3))
    cache = {}
    plan = GraphVJP.build(out, [get_gradient_edge(h)], cache=cache)
    vectors = torch.randn(3, *out.shape, dtype=DTYPE)
    first = plan.run(vectors, [h.shape])[0]
    derived = dict(cache)
    assert {name for _, name in derived} >= {"weight", "hyperparameters", "result"}
    torch.testing.assert_close(plan.run(2 * vectors, [h.shape])[0], 2 * first)
    assert all(cache[key] is value for key, value in derived.items())  # the second chunk reused them


def _cnn():
    return nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ZeroPad2d((0, 1, 0, 1)),
                         nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 5))


def _engine_run(model, X, y, column_backward, *extensions, **kwargs):
    loss_fn = nn.CrossEntropyLoss()
    with curvature(model, loss_fn, *extensions, column_backward=column_backward, **kwargs) as ctx:
        loss_fn(model(X), y).backward()
    return ctx


@pytest.mark.parametrize("budget", [None, 2e5])
def test_engine_results_agree_between_column_backwards(budget):
    model = _cnn().to(DTYPE)
    X, y = torch.randn(6, 3, 8, 8, dtype=DTYPE), torch.randint(0, 5, (6,))
    results = {}
    for mode in ("graph", "autograd"):
        model.zero_grad()
        ctx = _engine_run(model, X, y, mode, ext.KFACExpand(fisher="type-2"), ext.DiagGGNExact(), memory_budget=budget)
        assert ctx.last_column_backward == mode
        assert budget is None or ctx.last_chunk_size < 5
        results[mode] = [(p.diag_ggn_exact.clone(), [p.kfac_expand.input.clone(), p.kfac_expand.output.clone()])
                         for p in model.parameters()]
    for (d_graph, k_graph), (d_auto, k_auto) in zip(results["graph"], results["autograd"]):
        torch.testing.assert_close(d_graph, d_auto, atol=1e-12, rtol=1e-10)
        for a, b in zip(k_graph, k_auto):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    ctx = _engine_run(model, X, y, "auto", ext.DiagGGNExact())
    assert ctx.last_column_backward == "graph"


def test_engine_falls_back_where_a_node_has_no_rule():
    model = nn.Sequential(nn.Linear(4, 6), Lambda(lambda t: torch.cumsum(t, 1)), nn.Linear(6, 3)).to(DTYPE)
    X, y = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,))
    ctx = _engine_run(model, X, y, "auto", ext.DiagGGNExact())
    assert ctx.last_column_backward == "autograd"
    with pytest.raises(ValueError, match="column_backward='graph'"):
        _engine_run(model, X, y, "graph", ext.DiagGGNExact())
    bn_model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).to(DTYPE)  # train mode
    ctx = _engine_run(bn_model, X, y, "auto", ext.DiagGGNExact(), batch_coupled=False)
    assert ctx.last_column_backward == "autograd"
    with pytest.raises(ValueError, match="training"):
        _engine_run(bn_model, X, y, "graph", ext.DiagGGNExact(), batch_coupled=False)


def test_column_backward_argument_is_checked():
    with pytest.raises(ValueError, match="column_backward must be one of"):
        curvature(_cnn(), nn.CrossEntropyLoss(), ext.DiagGGNExact(), column_backward="vmap")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="channels-last data gradients run on CUDA only")
def test_channels_last_data_gradients_on_cuda():
    layers = [layer.to("cuda", torch.float32) for layer in all_cnn_like()]
    out, outputs = forward_recording(layers, torch.randn(3, 3, 8, 8, device="cuda"))
    with fp32_precision("ieee", torch.device("cuda")):
        check(out, [outputs[i] for i in (1, 4, 7)], options=BackwardOptions(channels_last=True), tol=1e-4)


# ----------------------------------------------------------------------------------------------
# chains: a convolution's data gradient, a padding's window and a ReLU's mask in one kernel


def _chains(plan) -> list:
    """The node type names of each chain the plan runs at once."""
    return [tuple(type(node).__name__ for node in step[6][0]) for step in plan.steps if step[6] is not None]


def _chain_net(kind: str, seed: int, device="cpu", dtype=DTYPE):
    """``(output, watched tensors)`` of a small net whose last convolution (stride 2) follows a ReLU or
    threshold, with a padding between them or not, or an obstacle to fusing them (``kind``); parameters
    and input drawn from ``seed`` (in float64, then converted: equal seeds give the same net in any dtype)."""
    torch.manual_seed(seed)
    conv1 = nn.Conv2d(3, 16, 3, padding=1).to(DTYPE).to(device, dtype)
    conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1 if kind in ("no-pad", "threshold", "two-consumers") else 0)
    conv2 = conv2.to(DTYPE).to(device, dtype)
    x = torch.randn(3, 3, 9, 9, dtype=DTYPE).to(device, dtype)
    h = conv1(x)
    a = F.threshold(h, 0.1, -2.0) if kind == "threshold" else torch.relu(h)
    if kind == "module-pad":
        padded = ConstantPadding.apply(a, (1, 0, 2, 1), 0.0)
    elif kind == "pytorch-pad":
        padded = F.pad(a, (1, 0, 2, 1))
    elif kind == "negative-pad":
        padded = F.pad(a, (1, -1, 2, 1))
    elif kind == "channel-pad":
        padded = F.pad(a, (1, 1, 1, 1, 0, 1))
        conv2 = nn.Conv2d(17, 16, 3, stride=2).to(DTYPE).to(device, dtype)
    else:
        padded = a
    out = conv2(padded)
    if kind == "two-consumers":
        out = out + a.mean((1, 2, 3), keepdim=True)
    out = out.mean((2, 3))
    watched = [h, a] if kind == "watched" else [h]
    return out, watched


CHAIN_KINDS = {
    "module-pad": ("ConvolutionBackward0", "ConstantPaddingBackward", "ReluBackward0"),
    "pytorch-pad": ("ConvolutionBackward0", "ConstantPadNdBackward0", "ReluBackward0"),
    "no-pad": ("ConvolutionBackward0", "ReluBackward0"),
    "threshold": ("ConvolutionBackward0", "ThresholdBackward0"),
    "negative-pad": None,     # a negative pad crops: its backward is no window
    "channel-pad": None,      # the padded axis is the channels'
    "two-consumers": None,    # the ReLU's gradient also comes from elsewhere
    "watched": None,          # the ReLU's output gradient is wanted itself
}


@pytest.mark.parametrize("kind", sorted(CHAIN_KINDS))
def test_chains_are_found_where_each_node_is_the_only_consumer(kind, seed):
    """The walk chains convolution, padding and ReLU only where nothing else needs the gradients in
    between; on the CPU the chain's rule declines and the nodes' own rules give autograd's result,
    also after the plan is stored by position and rebound to a new graph of the same structure."""
    from curvlib.engine.skeleton import GraphSkeleton

    out, watched = _chain_net(kind, seed)
    plan = check(out, watched)
    expected = CHAIN_KINDS[kind]
    assert _chains(plan) == ([] if expected is None else [expected])
    skeleton = GraphSkeleton(out)
    stored = plan.positional(skeleton)
    out2, watched2 = _chain_net(kind, seed + 1)  # a new draw of the same structure
    skeleton2 = GraphSkeleton(out2)
    assert skeleton2.key == skeleton.key
    rebound = GraphVJP.rebound(stored, skeleton2, BackwardOptions(), {})
    assert _chains(rebound) == _chains(plan)
    vectors = torch.randn(3, *out2.shape, dtype=DTYPE)
    for got, want in zip(rebound.run(vectors, [t.shape for t in watched2]), looped_vjp(out2, watched2, vectors)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused data gradient runs on CUDA only")


@cuda
@pytest.mark.parametrize("kind", [k for k, chain in sorted(CHAIN_KINDS.items()) if chain is not None])
@pytest.mark.parametrize("choice", ["measured", "separately", "fused"])
def test_chain_runs_data_gradient_window_and_mask_in_one_kernel(kind, choice, seed, monkeypatch):
    """On CUDA the chain's rule gives autograd's gradient whichever way it runs: measured, cuDNN and
    the mask kernel separately, or curvlib's kernel with the window and mask in its epilogue (whose
    launch is checked); bfloat16 channels-last messages, as the engine carries them."""
    from curvlib import kernels

    if not kernels.available():
        pytest.skip("needs Triton")
    from curvlib.kernels import input_vjp

    out, watched = _chain_net(kind, seed, "cuda", torch.float32)
    vectors = torch.randn(4, *out.shape, dtype=DTYPE, device="cuda")
    options = BackwardOptions(channels_last=True, message_dtype=torch.bfloat16)
    plan = GraphVJP.build(out, [get_gradient_edge(t) for t in watched], options)
    assert _chains(plan) == [CHAIN_KINDS[kind]]
    input_vjp._CHOICES.clear()
    launches = []
    original = input_vjp.input_vjp
    monkeypatch.setattr(input_vjp, "input_vjp", lambda *a, **k: launches.append(k.get("mask")) or original(*a, **k))
    if choice != "measured":  # the adjoint, or the first block configuration of the kernel
        monkeypatch.setattr(input_vjp._CHOICES, "choose", lambda key, candidates, run, device: (
            input_vjp.ADJOINT if choice == "separately" else candidates()[1]))
    got = plan.run(vectors.float(), [t.shape for t in watched])[0]
    out64, watched64 = _chain_net(kind, seed, "cuda", DTYPE)
    expected = looped_vjp(out64, watched64, vectors)[0]
    error = ((got.double() - expected).norm() / expected.norm()).item()
    assert error < 2e-2, error
    masked = [mask for mask in launches if mask is not None]
    if choice == "fused":
        # a ReLU's saved output is carried in the message dtype; a threshold's input keeps float32 (rounded,
        # inputs next to the threshold would compare the other way)
        carried = torch.float32 if kind == "threshold" else torch.bfloat16
        assert masked and all(mask.dtype == carried for mask in masked)
    elif choice == "separately":
        assert not launches
    else:
        assert masked and len(input_vjp._CHOICES.timings) == 1  # measured: both ways tried


def test_threshold_masks_keep_their_dtype_unless_the_threshold_is_zero(seed):
    """Under a bfloat16 message dtype a ReLU's saved output and a zero threshold's input are carried in
    bfloat16 (the comparison with zero survives rounding); a non-zero threshold's input stays float32:
    rounded, an input just above 0.1 compares as equal to it and is masked."""
    from curvlib.engine.batched_rules import _mask_operand

    options = BackwardOptions(message_dtype=torch.bfloat16)
    x = torch.randn(4, 6, requires_grad=True)
    x_near = torch.full((4, 6), 0.1002, requires_grad=True)  # in bfloat16 equal to the threshold 0.1
    nodes = {"relu": torch.relu(x).grad_fn, "zero": F.threshold(x, 0.0, 0.0).grad_fn,
             "nonzero": F.threshold(x_near, 0.1, -1.0).grad_fn}
    dtypes = {name: _mask_operand(node, {}, options)[0].dtype for name, node in nodes.items()}
    assert dtypes == {"relu": torch.bfloat16, "zero": torch.bfloat16, "nonzero": torch.float32}
    # the kept float32 input decides as autograd does: 0.1002 > 0.1 passes the gradient
    g = torch.randn(2, 4, 6).to(torch.bfloat16)
    passed = rule_for(nodes["nonzero"])(nodes["nonzero"], g, [True], {}, options)[0]
    assert torch.equal(passed.float(), g.float())
    assert torch.tensor(0.1002).to(torch.bfloat16) <= torch.tensor(0.1).to(torch.bfloat16)  # rounded: masked
