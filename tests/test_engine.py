"""The ``curvlib.curvature`` context manager: hygiene, memory budget, errors, engine behaviour.

Results are compared with independent references (tests/test_engine_references.py) or with the
engine's own results under a different configuration where the claim is "identical" (chunking,
``batch_coupled=True`` on a model whose samples do not interact).
"""

from __future__ import annotations

import copy
import gc
import math
import warnings
import weakref

import pytest
import torch
from torch import nn

import curvlib
import curvlib.engine.context as engine_context
from conftest import assert_close
from curvlib.extensions import (
    BatchDiagGGNExact,
    BatchDiagGGNMC,
    BatchGrad,
    DiagGGNExact,
    DiagGGNMC,
    Extension,
    GGNGram,
    GGNMiniBlock,
    HesScale,
    HesScaleGN,
    KFACExpand,
    KFACReduce,
    KroneckerFactors,
)
from test_engine_references import DT, GGNReference, make_loss, make_model, per_sample_gradients, run_engine

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

SAVEFIELDS = {
    "diag_ggn_exact",
    "diag_ggn_mc",
    "diag_ggn_exact_batch",
    "diag_ggn_mc_batch",
    "ggn_mini_block",
    "ggn_gram",
    "diag_hesscale",
    "diag_hesscale_gn",
    "kfac_expand",
    "kfac_reduce",
    "grad_batch",
}


@pytest.fixture(autouse=True)
def _seeded(seed):
    return seed


def all_extensions(hesscale=True, kfac=True):
    extensions = [
        DiagGGNExact(), DiagGGNMC(2), BatchDiagGGNExact(), BatchDiagGGNMC(2), GGNMiniBlock("output"), GGNGram(), BatchGrad(),
    ]
    if hesscale:
        extensions += [HesScale(), HesScaleGN()]
    if kfac:
        extensions += [KFACExpand(fisher="mc"), KFACReduce(fisher="empirical")]
    return extensions


def cnn_with_bn_eval():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, groups=1),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    ).to(DT)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# where the results land


def test_results_land_under_documented_names_and_shapes():
    model = cnn_with_bn_eval()
    X = torch.randn(3, 2, 8, 8, dtype=DT)
    loss_fn, y = make_loss("ce", (3, 3))
    gram = GGNGram()
    run_engine(
        model, loss_fn, X, y,
        DiagGGNExact(), DiagGGNMC(2), BatchDiagGGNExact(), BatchDiagGGNMC(3), GGNMiniBlock("output"), gram,
        HesScale(), HesScaleGN(), BatchGrad(), KFACExpand(fisher="type-2"), KFACReduce(fisher="mc"),
        skip=[model[1]],
    )
    for module in (model[0], model[4], model[6]):
        for name, p in module.named_parameters():
            for field in ("diag_ggn_exact", "diag_ggn_mc", "diag_hesscale", "diag_hesscale_gn"):
                assert getattr(p, field).shape == p.shape, field
            for field in ("diag_ggn_exact_batch", "diag_ggn_mc_batch", "grad_batch"):
                assert getattr(p, field).shape == (3, *p.shape), field
            assert p.ggn_mini_block.shape == (p.shape[0], *([1] * (p.dim() - 1)), p[0].numel(), p[0].numel())
            assert p.ggn_gram.shape == (3, 3, 3, 3)
            for field in ("kfac_expand", "kfac_reduce"):
                factors = getattr(p, field)
                assert isinstance(factors, KroneckerFactors)
                out_channels = module.weight.shape[0]
                assert factors.output.shape == (1, out_channels, out_channels)
                d = module.weight[0].numel() if name == "weight" else 1
                assert factors.input.shape == (1, d, d)
            assert set(vars(p)) - {"_is_param"} <= SAVEFIELDS
    for p in model[1].parameters():  # skipped
        assert not set(vars(p)) & SAVEFIELDS
    assert gram.gram.shape == (3, 3, 3, 3)


# ----------------------------------------------------------------------------------------------
# hygiene


HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
)


def hook_count(modules) -> int:
    return sum(len(getattr(m, d, {}) or {}) for m in modules for d in HOOK_DICTS)


def module_state(modules):
    return [(sorted(vars(m)), {d: dict(getattr(m, d, {}) or {}) for d in HOOK_DICTS}) for m in modules]


@pytest.mark.parametrize("model_name", ["cnn", "residual_train", "shared", "sequence"])
def test_context_leaves_no_trace(model_name):
    model, X = make_model(model_name)
    loss_fn, y = make_loss("ce", (X.shape[0], 3))
    modules = list(model.modules()) + [loss_fn]
    before = module_state(modules)
    hesscale = not model_name.startswith("residual")  # BN in train mode: no HesScale
    kfac = model_name != "residual_train"
    with curvlib.curvature(model, loss_fn, *all_extensions(hesscale, kfac)):
        out = model(X)
        loss = loss_fn(out, y)
        loss.backward(retain_graph=True)
    assert module_state(modules) == before, "hooks or attributes left on modules"
    assert not out._backward_hooks and not loss._backward_hooks, "tensor hooks left on the output / loss"
    for p in model.parameters():
        assert set(vars(p)) - {"_is_param"} <= SAVEFIELDS
        for field in SAVEFIELDS:
            if hasattr(p, field):
                delattr(p, field)
    snapshot = {name: set(vars(p)) for name, p in model.named_parameters()}
    # the retained graph, backpropagated again after the context: plain autograd, nothing computed
    model.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    # a plain new forward/backward pass afterwards works and sets nothing either
    model.zero_grad()
    loss_fn(model(X), y).backward()
    assert {name: set(vars(p)) for name, p in model.named_parameters()} == snapshot
    assert module_state(modules) == before
    if not model_name.endswith("train"):
        for name, p in model.named_parameters():
            assert_close(p.grad, grads[name], name=f"{name}.grad")


class _TrackedCall(engine_context.LayerCall):
    """LayerCall that registers weak references to itself and its recorded input and output."""

    alive: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _TrackedCall.alive.append((weakref.ref(self), weakref.ref(self.x), weakref.ref(self.y)))


@pytest.fixture
def tracked_calls(monkeypatch):
    _TrackedCall.alive = []
    monkeypatch.setattr(engine_context, "LayerCall", _TrackedCall)
    return _TrackedCall.alive


def _alive(refs) -> int:
    return sum(ref() is not None for entry in refs for ref in entry)


def _count_tensors() -> int:
    gc.collect()
    return sum(issubclass(type(obj), torch.Tensor) for obj in gc.get_objects())  # type(): no attribute lookups


def test_repeated_use_leaks_neither_hooks_nor_memory(tracked_calls):
    model, X = make_model("cnn")
    loss_fn, y = make_loss("ce", (X.shape[0], 3))
    modules = list(model.modules()) + [loss_fn]
    baseline = hook_count(modules)
    extensions = [DiagGGNExact(), BatchGrad(), KFACExpand(fisher="empirical"), HesScale(), GGNGram()]
    counts = []
    for step in range(100):
        with curvlib.curvature(model, loss_fn, *extensions):
            assert hook_count(modules) > baseline
            loss = loss_fn(model(X), y)
            loss.backward()
        assert hook_count(modules) == baseline, f"step {step}: hooks left"
        assert tracked_calls, "nothing recorded"
        # released by reference counting alone (no cycles): input, output and the call itself
        del loss
        assert _alive(tracked_calls) == 0, f"step {step}: recorded calls still alive after exit"
        tracked_calls.clear()
        if step in (10, 99):
            counts.append(_count_tensors())
    assert counts[1] <= counts[0], f"live tensors grew from {counts[0]} to {counts[1]} over 90 uses"


def test_training_loop_inside_one_context_releases_each_step(tracked_calls):
    """Many steps inside one context: a step's recorded tensors die with its loss (no reference cycles)."""
    model, X = make_model("shared")
    loss_fn, y = make_loss("mse", (X.shape[0], 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with curvlib.curvature(model, loss_fn, DiagGGNExact(), BatchGrad(), KFACReduce(fisher="empirical")):
        for step in range(5):
            optimizer.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            if step < 4:
                optimizer.step()
                del loss
                assert _alive(tracked_calls) == 0, f"step {step}: recorded calls alive inside the context"
                tracked_calls.clear()
    reference_model = copy.deepcopy(model)  # after the context (a deep copy inside would copy its hooks)
    # the results of the last step are those of the parameters at that step
    ref = GGNReference(reference_model, loss_fn, X, y)
    expected = per_sample_gradients(reference_model, loss_fn, X, y)
    for name, p in model.named_parameters():
        assert_close(p.diag_ggn_exact, ref.diag(name), rtol=1e-9, name=f"{name} after 4 steps")
        assert_close(p.grad_batch, expected[name], rtol=1e-9, name=f"{name}.grad_batch after 4 steps")


def test_exception_inside_the_context_removes_hooks():
    model, X = make_model("cnn")
    loss_fn, y = make_loss("ce", (X.shape[0], 3))
    modules = list(model.modules()) + [loss_fn]
    baseline = hook_count(modules)
    with pytest.raises(RuntimeError, match="boom"):
        with curvlib.curvature(model, loss_fn, DiagGGNExact()):
            model(X)
            raise RuntimeError("boom")
    assert hook_count(modules) == baseline


# ----------------------------------------------------------------------------------------------
# memory budget


def _results(model):
    return {
        (name, field): (value.input.clone(), value.output.clone()) if isinstance(value, KroneckerFactors) else value.clone()
        for name, p in model.named_parameters()
        for field, value in vars(p).items()
        if field in SAVEFIELDS
    }


def _assert_same(a, b, label):
    """Equal up to round-off relative to the largest value of the same quantity over the model."""
    assert a.keys() == b.keys()
    as_tuple = lambda v: v if isinstance(v, tuple) else (v,)  # noqa: E731
    scales = {}
    for (name, field), value in b.items():
        for i, t in enumerate(as_tuple(value)):
            scales[(field, i)] = max(scales.get((field, i), 0.0), t.abs().max().item())
    for key in a:
        for i, (u, v) in enumerate(zip(as_tuple(a[key]), as_tuple(b[key]))):
            scale = scales[(key[1], i)]
            assert scale > 0, f"{key[1]} vanishes everywhere"
            assert_close(u, v, rtol=1e-11, atol=1e-12 * scale, allow_zero=True, name=f"{label}: {key}")


BUDGET_EXACT = {  # chunkable extensions on the exact columns (KFAC only where there is no BatchNorm)
    "cnn": lambda: [DiagGGNExact(), BatchDiagGGNExact(), GGNMiniBlock("output"), KFACExpand(fisher="type-2"), KFACReduce(fisher="type-2")],
    "resbn_train": lambda: [DiagGGNExact(), BatchDiagGGNExact(), GGNMiniBlock("full")],
    "shared": lambda: [DiagGGNExact(), BatchDiagGGNExact(), GGNMiniBlock("full"), KFACReduce(fisher="type-2")],
    "mixed_conv": lambda: [DiagGGNExact(), BatchDiagGGNExact(), GGNMiniBlock("diagonal"), KFACExpand(fisher="type-2")],
}


@pytest.mark.parametrize("model_name", sorted(BUDGET_EXACT))
@pytest.mark.parametrize("message", ["exact", "mc"])
def test_memory_budget_chunks_give_identical_results(model_name, message):
    """Budgets from 1 byte up (×1.2) until all columns fit: every chunking gives the unchunked results."""
    model, X = make_model(model_name)
    out_dim = 3  # 3 exact columns; 7 MC samples
    loss_fn, y = make_loss("mse", (X.shape[0], out_dim))
    state = copy.deepcopy(model.state_dict())

    def run(budget, seed=1234):
        model.load_state_dict(state)  # the same BatchNorm statistics in every run
        for p in model.parameters():
            for field in SAVEFIELDS & set(vars(p)):
                delattr(p, field)
        if message == "exact":
            extensions = BUDGET_EXACT[model_name]()
        else:
            extensions = [DiagGGNMC(7), BatchDiagGGNMC(7)]
            if model_name != "resbn_train":
                extensions.append(KFACReduce(fisher="mc", mc_samples=7))
        torch.manual_seed(seed)  # the same MC draws in every run (drawn before chunking)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ctx = run_engine(model, loss_fn, X, y, *extensions, memory_budget=budget)
        return ctx.last_chunk_size, _results(model)

    columns = out_dim if message == "exact" else 7
    whole_chunk, whole = run(None)
    assert whole_chunk == columns
    chunk_sizes = set()
    budget = 1
    while True:  # budgets growing by 1.2× from 1 byte until all columns fit in one chunk
        chunk, chunked = run(budget)
        chunk_sizes.add(chunk)
        _assert_same(chunked, whole, f"budget {budget} (chunk {chunk})")
        if chunk == columns:
            break
        budget = max(int(budget * 1.2), 1000)
        assert budget < 1e12
    assert 1 in chunk_sizes, "no budget forced single columns"
    assert any(1 < c < columns for c in chunk_sizes) or columns <= 2, f"no multi-column chunk: {chunk_sizes}"
    # and a different seed gives different MC results (the comparison above is not vacuous)
    if message == "mc":
        _, other = run(None, seed=99)
        key = next(k for k in whole if k[1] == "diag_ggn_mc")
        assert not torch.equal(other[key], whole[key])


def test_tiny_budget_warns_and_gram_takes_all_columns():
    model, X = make_model("cnn")
    loss_fn, y = make_loss("ce", (X.shape[0], 3))
    with pytest.warns(UserWarning, match="memory_budget=1 bytes is below one column"):
        ctx = run_engine(model, loss_fn, X, y, DiagGGNExact(), memory_budget=1)
    assert ctx.last_chunk_size == 1
    gram = GGNGram()
    ctx = run_engine(model, loss_fn, X, y, gram, memory_budget=1)
    assert ctx.last_chunk_size == 3, "Gram matrices need all columns at once"


@pytest.mark.parametrize("budget", [None, 1])
def test_location_gram_path_for_layers_with_few_locations(monkeypatch, budget):
    """Layers with few output locations and many columns take the GGN diagonal through the columns'
    location Gram (summed over chunks of columns, here also one column at a time): DiagGGNExact and
    BatchDiagGGNExact match the dense-Jacobian reference; the other layers keep the direct path."""
    from curvlib.engine import layers

    monkeypatch.setattr(layers, "LOCATION_GRAM_MIN_CHANNELS", 2)  # small channel counts keep the test fast
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=3),
                          nn.ReLU(), nn.Conv2d(4, 4, 2, groups=2), nn.Flatten(), nn.Linear(4, 20),
                          nn.Tanh(), nn.Linear(20, 30)).to(DT)
    X = torch.randn(3, 2, 6, 6, dtype=DT)
    loss_fn, y = make_loss("ce", (3, 30))  # 30 columns
    taken = []
    prefers = layers.LayerCall.prefers_location_gram
    monkeypatch.setattr(layers.LayerCall, "prefers_location_gram",
                        lambda self, columns: taken.append((self.locations, prefers(self, columns))) or taken[-1][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the 1-byte budget's warning
        run_engine(model, loss_fn, X, y, DiagGGNExact(), BatchDiagGGNExact(), memory_budget=budget)
    # 4·O·(C + D) <= C·D with (O, D) per layer: (36, 18) no, (4, 27) no, (1, 8) yes (grouped conv),
    # Linear (1, 4) no (136 > 120), Linear (1, 20) yes
    assert set(taken) == {(36, False), (4, False), (1, False), (1, True)}
    ref = GGNReference(copy.deepcopy(model), loss_fn, X, y)
    for name, p in model.named_parameters():
        assert_close(p.diag_ggn_exact, ref.diag(name), rtol=1e-10, name=name)
        assert_close(p.diag_ggn_exact_batch, ref.diag_batch(name), rtol=1e-10, name=name)


def test_chunk_memory_estimate_and_the_largest_chunk_that_fits(monkeypatch):
    """The estimate, worked out by hand for a two-layer CNN (batch 4, 9 classes), and the engine's chunk:
    the largest whose estimate fits the budget."""
    from curvlib.engine import context as context_module
    from curvlib.engine import layers

    monkeypatch.setattr(layers, "LOCATION_GRAM_MIN_CHANNELS", 1)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 9, 6), nn.Flatten())
    X = torch.randn(4, 3, 6, 6)
    loss_fn, y = make_loss("ce", (4, 9))
    seen = {}
    chunk_size = context_module.curvature._chunk_size

    def spy(self, groups, num_columns, coupled, whole, location_grams=False, stages=None):
        if stages is None:
            seen["need"] = context_module.ChunkMemory(groups, coupled, location_grams)
        return chunk_size(self, groups, num_columns, coupled, whole, location_grams, stages)

    # autograd's column backward: its stages would hold what one pass does (no handed-off sources), so
    # the chunks are those of the unstaged estimate
    monkeypatch.setattr(context_module.curvature, "_chunk_size", spy)
    run_engine(model, loss_fn, X, y, DiagGGNExact(), memory_budget=10**9, column_backward="autograd")
    need = seen["need"]
    outputs = [4 * 5 * 6 * 6, 4 * 9]  # y of each conv
    assert need.per_column == (sum(outputs) + 2 * max(outputs)) * 4
    # unfolded inputs N·D·O: 4·27·36 and 4·180·1; weight gradients per column N·(weight + bias)
    assert need.layers == [(4 * 27 * 36 * 4, 4 * (135 + 5) * 4), (4 * 180 * 4, 4 * (1620 + 9) * 4)]
    # the second layer (1 location, D = 180, 9 columns: 4·1·189 <= 9·180) keeps its location Gram
    # [N, C_out, 1, 1] across the chunks
    assert need.kept == 4 * 9 * 4
    assert need(3) == 3 * need.per_column + max(4 * 27 * 36 * 4 + 3 * 4 * 140 * 4,
                                                4 * 180 * 4 + 3 * 4 * 1629 * 4) + need.kept
    for budget in (need(2), need(5) - 1, need(9) + 7):
        ctx = run_engine(model, loss_fn, X, y, DiagGGNExact(), memory_budget=budget, column_backward="autograd")
        assert ctx.last_stages is None and need(ctx.last_chunk_size) <= budget
        largest = max(c for c in range(1, 10) if need(c) <= budget)
        assert math.ceil(9 / ctx.last_chunk_size) == math.ceil(9 / largest)  # no more chunks than needed


def test_chunk_memory_with_fused_kernels_and_the_room_left_to_the_pathways(monkeypatch):
    """Where the GGN diagonal runs on fused kernels, a layer's working set is the smaller of the
    per-sample-gradient one and the kernel's (unfolded chunk + float32 result rows), and the pathways
    choose within what the chunk's messages leave of the budget; the diagonals stay exact."""
    from curvlib import pathways
    from curvlib.engine import context as context_module
    from curvlib.kernels._host import UNFOLDED_CHUNK_BYTES, UNFOLDED_CHUNK_SHARE

    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 9, 6), nn.Flatten()).to(DT)
    X = torch.randn(4, 3, 6, 6, dtype=DT)
    loss_fn, y = make_loss("ce", (4, 9))
    calls = [engine_context.LayerCall(model[0], X, model[0](X))]
    calls.append(engine_context.LayerCall(model[2], torch.relu(calls[0].y), model[2](torch.relu(calls[0].y))))
    groups = [engine_context.ModuleCalls(call.module, [call]) for call in calls]
    plain = context_module.ChunkMemory(groups, False)
    for rows in (1, 4):
        fused = context_module.ChunkMemory(groups, False, fused_rows=rows)
        params = [140, 1629]  # weight + bias of each layer
        assert fused.fused == [UNFOLDED_CHUNK_SHARE * min(u, UNFOLDED_CHUNK_BYTES) + rows * p * 4
                               for (u, _), p in zip(plain.layers, params)]
        for columns in (1, 3, 9):
            native = [u + min(plain.gradient_cap, columns * g) for u, g in plain.layers]
            assert fused(columns) == columns * plain.per_column + max(min(n, f) for n, f in zip(native, fused.fused))
    assert context_module.curvature._fused_layer_rows([DiagGGNExact()], torch.device("cpu"), 4) is None

    # the engine as on a device with fused kernels: the pathways' budget while the layers accumulate
    monkeypatch.setattr(context_module.curvature, "_fused_layer_rows", staticmethod(lambda ext, device, batch: 1))
    seen = []
    accumulate = DiagGGNExact.accumulate

    def spying(self, group, messages, state):
        seen.append(pathways.settings().memory_budget)
        return accumulate(self, group, messages, state)

    monkeypatch.setattr(DiagGGNExact, "accumulate", spying)
    reference = GGNReference(copy.deepcopy(model), loss_fn, X, y)
    budget = 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ctx = run_engine(model, loss_fn, X, y, DiagGGNExact(), memory_budget=budget, column_backward="autograd")
    assert 1 < ctx.last_chunk_size < 9 and ctx.last_stages is None
    need = context_module.ChunkMemory(groups, False, True, fused_rows=1)
    assert set(seen) == {budget - ctx.last_chunk_size * need.per_column - need.kept}
    assert pathways.settings().memory_budget is None  # restored
    for name, p in model.named_parameters():
        assert_close(p.diag_ggn_exact, reference.diag(name), rtol=1e-10, name=name)


def test_balanced_chunks_keep_the_chunk_count_and_fit():
    """Equal chunks, as few as the largest fitting chunk needs, multiples of 4 columns where that fits."""
    from curvlib.engine import context as context_module

    for total in range(1, 130):
        for largest in range(1, total + 3):
            chunk = context_module.balanced_chunk(largest, total)
            assert 1 <= chunk <= min(largest, total)
            assert math.ceil(total / chunk) == math.ceil(total / min(largest, total)), (largest, total)
            even = math.ceil(total / math.ceil(total / min(largest, total)))
            assert chunk == even or (chunk % 4 == 0 and even < chunk < even + 4), (largest, total, chunk)
    assert context_module.balanced_chunk(21, 100) == 20


# ----------------------------------------------------------------------------------------------
# engine behaviour


def test_batch_coupled_flag():
    """True on independent samples changes nothing; False on train-mode BatchNorm would be wrong ("auto" detects it)."""
    model, X = make_model("cnn")
    loss_fn, y = make_loss("ce", (X.shape[0], 3))
    run_engine(model, loss_fn, X, y, DiagGGNExact(), BatchDiagGGNExact(), GGNGram(), batch_coupled=False)
    uncoupled = _results(model)
    run_engine(model, loss_fn, X, y, DiagGGNExact(), BatchDiagGGNExact(), GGNGram(), batch_coupled=True)
    _assert_same(_results(model), uncoupled, "batch_coupled=True on independent samples")

    model, X = make_model("resbn_train")
    reference_model = copy.deepcopy(model)
    state = copy.deepcopy(model.state_dict())
    ref = GGNReference(reference_model, loss_fn, X, y)
    run_engine(model, loss_fn, X, y, DiagGGNExact())
    expected = ref.diag("c1.weight")  # c1 feeds the BatchNorm
    assert_close(model.c1.weight.diag_ggn_exact, expected, rtol=1e-9, name="auto")
    model.load_state_dict(state)
    run_engine(model, loss_fn, X, y, DiagGGNExact(), batch_coupled=False)
    error = (model.c1.weight.diag_ggn_exact - expected).abs().max()
    assert error > 1e-6 * expected.abs().max(), "train-mode BN did not couple the samples here"


def test_forward_passes_that_do_not_reach_the_loss_are_ignored():
    """A monitoring forward pass (gradients on, different batch size) before the training pass."""
    model, X = make_model("shared")
    loss_fn, y = make_loss("ce", (X.shape[0], 3))
    reference_model = copy.deepcopy(model)
    with curvlib.curvature(model, loss_fn, DiagGGNExact(), BatchGrad()):
        model(torch.randn(2, 5, dtype=DT)).sum()  # e.g. logging; never backpropagated
        with torch.no_grad():
            model(torch.randn(3, 5, dtype=DT))
        loss_fn(model(X), y).backward()
    ref = GGNReference(reference_model, loss_fn, X, y)
    expected = per_sample_gradients(reference_model, loss_fn, X, y)
    for name, p in model.named_parameters():
        assert_close(p.diag_ggn_exact, ref.diag(name), rtol=1e-9, name=name)
        assert_close(p.grad_batch, expected[name], rtol=1e-9, name=f"{name}.grad_batch")


def test_frozen_parameters_get_no_results():
    model, X = make_model("cnn")
    model[0].weight.requires_grad_(False)
    for p in model[3].parameters():
        p.requires_grad_(False)
    loss_fn, y = make_loss("ce", (X.shape[0], 3))
    reference_model = copy.deepcopy(model)
    run_engine(model, loss_fn, X, y, DiagGGNExact(), GGNMiniBlock("full"), KFACReduce(fisher="type-2"), BatchGrad())
    assert not set(vars(model[0].weight)) & SAVEFIELDS
    assert not any(set(vars(p)) & SAVEFIELDS for p in model[3].parameters())
    ref = GGNReference(reference_model, loss_fn, X, y)
    for name in ("0.bias", "5.weight", "5.bias"):
        p = dict(model.named_parameters())[name]
        assert_close(p.diag_ggn_exact, ref.diag(name), rtol=1e-9, name=name)
        assert_close(p.ggn_mini_block.reshape(p.numel(), -1), ref.block(name), rtol=1e-9, atol=1e-12, name=name)


def test_inplace_activation():
    """In-place activations rewrite a layer's output; the engine differentiates w.r.t. an untouched one."""
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Conv2d(3, 2, 3), nn.ELU(inplace=True), nn.Flatten(), nn.Linear(2 * 4 * 4, 3),
    ).to(DT)
    X = torch.randn(3, 2, 8, 8, dtype=DT)
    loss_fn, y = make_loss("ce", (3, 3))
    reference_model = copy.deepcopy(model)
    run_engine(model, loss_fn, X, y, DiagGGNExact(), BatchGrad(), HesScaleGN())
    ref = GGNReference(reference_model, loss_fn, X, y)
    expected = per_sample_gradients(reference_model, loss_fn, X, y)
    for name, p in model.named_parameters():
        assert_close(p.diag_ggn_exact, ref.diag(name), rtol=1e-9, name=name)
        assert_close(p.grad_batch, expected[name], rtol=1e-9, name=f"{name}.grad_batch")
    # HesScaleGN of the last layer (nothing after it) is its exact GGN diagonal
    assert_close(model[5].weight.diag_hesscale_gn, ref.diag("5.weight"), rtol=1e-9, name="HesScaleGN last layer")


class _InPlaceForward(nn.Module):
    """Layer outputs modified in place by the forward code itself (no ``inplace`` module to detect)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1)
        self.lin = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        h = torch.relu_(self.c1(x))  # rebinds c1's output to the ReLU node
        h = self.bn(h)
        h += x  # and the BatchNorm's output to the addition
        return self.lin(torch.tanh(self.c2(h)).flatten(1))

    def as_layers(self):
        """The same computation as a chain of out-of-place functions (for the HesScale reference)."""
        return [self.c1, torch.relu, self.bn, None, self.c2, torch.tanh, nn.Flatten(), self.lin]


def test_functional_inplace_operations_on_layer_outputs():
    from test_engine_references import hesscale_reference, randomize_batchnorm

    model = randomize_batchnorm(_InPlaceForward()).to(DT).eval()
    X = torch.randn(3, 2, 4, 4, dtype=DT)
    loss_fn, y = make_loss("ce", (3, 3))
    reference_model = copy.deepcopy(model)
    run_engine(model, loss_fn, X, y, DiagGGNExact(), GGNMiniBlock("full"), BatchGrad(), HesScale())
    ref = GGNReference(reference_model, loss_fn, X, y)
    expected = per_sample_gradients(reference_model, loss_fn, X, y)
    for name, p in model.named_parameters():
        assert_close(p.diag_ggn_exact, ref.diag(name), rtol=1e-9, name=name)
        assert_close(p.ggn_mini_block.reshape(p.numel(), -1), ref.block(name), rtol=1e-9, name=f"{name} block")
        assert_close(p.grad_batch, expected[name], rtol=1e-9, name=f"{name}.grad_batch")
    layers = reference_model.as_layers()
    layers[3] = lambda h: h + X  # the residual addition with the (constant) input
    hesscale = hesscale_reference(layers, X, loss_fn, y, gauss_newton=False)
    for module, ref_module in zip((model.c1, model.bn, model.c2, model.lin), layers[:1] + layers[2:3] + layers[4:5] + layers[7:]):
        for name, p in module.named_parameters():
            assert_close(p.diag_hesscale, hesscale[id(ref_module)][name], rtol=1e-9, name=f"HesScale {name}")


class _TransposeWithOutputSize(nn.Module):
    """A ConvTranspose2d called with ``output_size=`` (implies output_padding 1), unless told otherwise."""

    def __init__(self, explicit_padding=False):
        super().__init__()
        self.t = nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1 if explicit_padding else 0)
        self.lin = nn.Linear(2 * 6 * 6, 3)
        self.explicit_padding = explicit_padding

    def forward(self, x):
        h = self.t(x) if self.explicit_padding else self.t(x, output_size=(6, 6))
        return self.lin(torch.sigmoid(h).flatten(1))


def test_conv_transpose_called_with_output_size():
    model = _TransposeWithOutputSize().to(DT)
    twin = _TransposeWithOutputSize(explicit_padding=True).to(DT)
    twin.load_state_dict(model.state_dict())
    X = torch.randn(2, 2, 3, 3, dtype=DT)
    loss_fn, y = make_loss("ce", (2, 3))
    reference_model = copy.deepcopy(model)
    extensions = lambda: [  # noqa: E731
        DiagGGNExact(), BatchDiagGGNExact(), GGNMiniBlock("output"), BatchGrad(), HesScale(), KFACExpand(fisher="type-2"),
        KFACReduce(fisher="empirical"),
    ]
    run_engine(model, loss_fn, X, y, *extensions())
    ref = GGNReference(reference_model, loss_fn, X, y)
    expected = per_sample_gradients(reference_model, loss_fn, X, y)
    for name, p in model.named_parameters():
        assert_close(p.diag_ggn_exact, ref.diag(name), rtol=1e-9, name=name)
        assert_close(p.grad_batch, expected[name], rtol=1e-9, name=f"{name}.grad_batch")
    # the same layer with output_padding=1 set on the module: every quantity identical
    run_engine(twin, loss_fn, X, y, *extensions())
    _assert_same(_results(model), _results(twin), "output_size= vs output_padding=1")


def test_custom_extension_interface():
    """A user extension of the documented interface sees one message per call, chunk by chunk."""

    class ColumnCount(Extension):
        savefield = "column_count"
        message = "ggn_exact"

        def accumulate(self, group, messages, state):
            assert len(messages) == len(group.calls)
            for call, m in zip(group.calls, messages):
                assert m.shape[1:] == call.y.shape
            state["weight"] = state.get("weight", 0) + messages[0].shape[0]

        def finalize(self, group, state):
            return {name: torch.tensor(state["weight"]) for name in group.parameters}

    model, X = make_model("shared")
    loss_fn, y = make_loss("ce", (X.shape[0], 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run_engine(model, loss_fn, X, y, ColumnCount(), memory_budget=1)
    assert model.shared.weight.column_count.item() == 3
    try:
        for p in model.parameters():
            del p.column_count
    except AttributeError:
        pytest.fail("every parameter should have received the custom result")


# ----------------------------------------------------------------------------------------------
# errors


def test_argument_errors():
    model, X = make_model("cnn")
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        curvlib.curvature(lambda x: x, loss_fn)
    with pytest.raises(TypeError, match="curvlib.extensions instances.*str"):
        curvlib.curvature(model, loss_fn, "DiagGGNExact")
    with pytest.raises(TypeError, match="curvlib.extensions instances.*type"):
        curvlib.curvature(model, loss_fn, DiagGGNExact)  # the class, not an instance
    for bad in (0, -5, float("nan"), float("inf"), "1e6", True, [1]):
        with pytest.raises(ValueError, match="memory_budget must be a positive"):
            curvlib.curvature(model, loss_fn, DiagGGNExact(), memory_budget=bad)
    with pytest.raises(ValueError, match="batch_coupled"):
        curvlib.curvature(model, loss_fn, DiagGGNExact(), batch_coupled="yes")
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        with curvlib.curvature(frozen, loss_fn, DiagGGNExact()):
            pass
    with pytest.raises(ValueError, match="no trainable parameters"):
        with curvlib.curvature(model, loss_fn, DiagGGNExact(), skip=list(model.modules())):
            pass


@pytest.mark.parametrize(
    "loss_fn,match",
    [
        (nn.NLLLoss(), "must be one of CrossEntropyLoss, MSELoss, BCEWithLogitsLoss, got NLLLoss"),
        (nn.SmoothL1Loss(), "got SmoothL1Loss"),
        (nn.CrossEntropyLoss(label_smoothing=0.2), "label_smoothing"),
        (nn.CrossEntropyLoss(reduction="none"), "reduction must be 'mean' or 'sum'"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), "pos_weight"),
    ],
)
def test_unsupported_losses_are_refused(loss_fn, match):
    model, _ = make_model("cnn")
    with pytest.raises(ValueError, match=match):
        curvlib.curvature(model, loss_fn, DiagGGNExact())


def test_unsupported_modules_are_refused():
    loss_fn = nn.CrossEntropyLoss()
    reflect = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(2 * 64, 3))
    with pytest.raises(ValueError, match="Conv2d with padding_mode='reflect' is not supported"):
        with curvlib.curvature(reflect, loss_fn, DiagGGNExact()):
            pass
    model, X = make_model("resbn_eval")
    with pytest.raises(ValueError, match="KFACReduce supports Linear and convolution layers, not BatchNorm2d.*skip"):
        with curvlib.curvature(model, loss_fn, KFACReduce()):
            pass
    with curvlib.curvature(model, loss_fn, KFACReduce(), skip=[model.bn]):  # skipping it is fine
        loss_fn(model(X), torch.randint(0, 3, (X.shape[0],))).backward()
    assert model.c2.weight.kfac_reduce.input.shape == (1, 27, 27)


def test_usage_errors_during_the_passes():
    model, X = make_model("cnn")
    loss_fn = nn.CrossEntropyLoss()
    y = torch.randint(0, 3, (X.shape[0],))
    modules = list(model.modules()) + [loss_fn]
    baseline = hook_count(modules)
    # CrossEntropy on [N, K, L] outputs: refused when the loss is recorded
    seq = nn.Conv1d(2, 3, 1).to(DT)
    with pytest.raises(ValueError, match=r"logits \[N, K\]"):
        with curvlib.curvature(seq, loss_fn, DiagGGNExact()):
            loss_fn(seq(torch.randn(2, 2, 4, dtype=DT)), torch.randint(0, 3, (2, 4)))
    # two recorded losses summed into one backward pass
    with pytest.raises(ValueError, match="several recorded losses in one backward pass"):
        with curvlib.curvature(model, loss_fn, DiagGGNExact()):
            (loss_fn(model(X), y) + loss_fn(model(X[:2]), y[:2])).backward()
    assert hook_count(modules) == baseline
    # after the failed pass the engine works again
    reference_model = copy.deepcopy(model)
    run_engine(model, loss_fn, X, y, DiagGGNExact())
    ref = GGNReference(reference_model, loss_fn, X, y)
    assert_close(model[0].weight.diag_ggn_exact, ref.diag("0.weight"), rtol=1e-9, name="after the error")
    # backward twice through a retained graph inside the context is fine (not "two losses")
    with curvlib.curvature(model, loss_fn, DiagGGNExact()):
        loss = loss_fn(model(X), y)
        loss.backward(retain_graph=True)
        loss.backward()
    assert_close(model[0].weight.diag_ggn_exact, ref.diag("0.weight"), rtol=1e-9, name="second backward")


def test_loss_of_another_model_is_ignored(seed):
    """A loss module shared with a second model: its loss depends on no recorded call and is ignored."""
    torch.manual_seed(seed)
    model, other = nn.Sequential(nn.Linear(4, 3)).double(), nn.Sequential(nn.Linear(4, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    with curvlib.curvature(model, loss_fn, DiagGGNExact()):
        output = model(X)
        loss_fn(other(X), y).backward()  # not this context's loss: no crash, no results
        assert not hasattr(model[0].weight, "diag_ggn_exact")
        loss_fn(output, y).backward()
    expected = GGNReference(model, loss_fn, X, y).diag("0.weight")
    assert_close(model[0].weight.diag_ggn_exact, expected, name="diag_ggn_exact")


def test_generator_makes_monte_carlo_reproducible(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(4, 2, 6, 6, dtype=DT), torch.randint(0, 5, (4,))
    results = []
    for generator in (torch.Generator().manual_seed(1), lambda device: torch.Generator(device).manual_seed(1),
                      torch.Generator().manual_seed(2)):
        with curvlib.curvature(model, loss_fn, DiagGGNMC(mc_samples=3), generator=generator):
            model.zero_grad()
            loss_fn(model(X), y).backward()
        results.append(model[0].weight.diag_ggn_mc.clone())
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])
    with pytest.raises(TypeError, match="generator"):
        curvlib.curvature(model, loss_fn, DiagGGNMC(), generator=3)
