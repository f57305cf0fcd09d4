"""Staged column backpropagation (:mod:`curvlib.engine.staging`).

References: the VJPs of the model output w.r.t. each recorded layer output, one column at a time with
``torch.autograd.grad`` on the output *tensors* (not the gradient edges the stages use), in float64;
and the engine's results with and without stages (dense-Jacobian GGN references where they apply).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge

from conftest import assert_close
from curvlib.engine.layers import batched_vjp
from curvlib.engine.staging import Stage, backpropagate, merge_stages, plan_stages, stage_numels
from curvlib.extensions import BatchDiagGGNExact, DiagGGNExact, KFACExpand
from test_engine_references import DT, GGNReference, MODELS, make_loss, make_model, run_engine


class Chain(nn.Module):
    """Conv → ReLU → Conv → Tanh → strided Conv → Linear → Tanh → Linear: every layer's node is a gate."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        self.c3 = nn.Conv2d(5, 3, 3, stride=2)
        self.l1, self.l2 = nn.Linear(27, 7), nn.Linear(7, 4)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.relu(self.c1(x))))
        return self.l2(torch.tanh(self.l1(self.c3(h).flatten(1))))


class ResidualChain(nn.Module):
    """Two residual blocks (their sums are gates that are no layer's output) and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 7 * 7, 4)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        h = torch.relu(h + self.a2(torch.tanh(self.a1(h))))
        h = torch.relu(h + self.b2(torch.tanh(self.b1(h))))
        return self.head(h.flatten(1))


class Branches(nn.Module):
    """Two parallel convolutions concatenated; an activation split in two halves; an unused layer;
    the last layer's output is the model output itself."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 1)
        self.mix = nn.Conv2d(6, 4, 3, stride=2)
        self.unused = nn.Linear(2, 4)
        self.head = nn.Linear(2 * 9, 4)

    def forward(self, x):
        h = torch.cat([torch.relu(self.left(x)), torch.tanh(self.right(x))], 1)
        top, bottom = torch.tanh(self.mix(h)).chunk(2, dim=1)
        self.unused(top.mean((2, 3)))  # computed, never used
        return self.head((top * bottom).flatten(1))


def _recorded(model: nn.Module, X):
    """Model output and the outputs of every module with parameters (forward hooks)."""
    outputs, handles = [], []
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(lambda m, i, o: outputs.append(o)))
    try:
        out = model(X)
    finally:
        for h in handles:
            h.remove()
    return out, outputs


def _reference_messages(out, ys, vectors):
    """VJPs ``[J, *y.shape]`` of ``out`` w.r.t. each ``y``, one column at a time (zeros where not reached)."""
    per_column = [torch.autograd.grad(out, ys, v, retain_graph=True, allow_unused=True) for v in vectors]
    return [torch.stack([g[i] if g[i] is not None else torch.zeros_like(y) for g in per_column])
            for i, y in enumerate(ys)]


NETS = {"chain": (Chain, (3, 2, 8, 8)), "residual": (ResidualChain, (2, 2, 7, 7)), "branches": (Branches, (3, 2, 7, 7))}


@pytest.mark.parametrize("net", sorted(NETS) + ["shared", "resbn_train", "mixed_conv"])
@pytest.mark.parametrize("merge", [False, True])
def test_staged_messages_equal_per_column_vjps(net, merge):
    """Every recorded output gets, stage by stage, the VJP of its columns; each exactly once."""
    if net in NETS:
        factory, shape = NETS[net]
        model, X = factory().to(DT), torch.randn(*shape, dtype=DT)
    else:
        model, X = make_model(net)
    out, ys = _recorded(model, X)
    edges = [get_gradient_edge(y) for y in ys]
    stages = plan_stages(out, edges)
    groups = [[i] for i in range(len(ys))]
    if merge:
        stages = merge_stages(stages, [y.numel() for y in ys], list(range(len(ys))))
    returned = [i for stage in stages for i in stage.calls + stage.gate_calls]
    assert len(returned) == len(set(returned)), "a layer's message is returned twice"
    vectors = torch.randn(3, *out.shape, dtype=DT)
    expected = _reference_messages(out, ys, vectors)
    seen = {}
    for g, (message,) in backpropagate(out, edges, [y.shape for y in ys], vectors, stages, groups,
                                       lambda o, i, v, like: batched_vjp(o, i, v, like=like)):
        assert g not in seen
        seen[g] = message
    assert sorted(seen) == list(range(len(ys)))
    for i, message in seen.items():
        if expected[i].abs().sum() == 0:  # a layer the output does not depend on
            assert torch.equal(message, expected[i]), f"{net} output {i}"
        else:
            assert_close(message, expected[i], rtol=1e-12, atol=1e-14, name=f"{net} output {i}")
    assert sum(bool(e.abs().sum() > 0) for e in expected) >= len(ys) - 1


def test_stage_structure():
    """A chain takes one stage per layer, each starting from the previous layer's own message; residual
    blocks close at their sums (gates of their own); an unused layer is in no stage."""
    model, X = Chain().to(DT), torch.randn(2, 2, 8, 8, dtype=DT)
    out, ys = _recorded(model, X)
    edges = [get_gradient_edge(y) for y in ys]
    stages = plan_stages(out, edges)
    # l2's output is the model output (stage 0 returns the columns there) and closes at the tanh
    # before it (a gate of its own, 2·7 entries); then l1, c3, c2, c1, each from its successor's message
    assert [(s.calls, s.gate_calls) for s in stages] == [([4], []), ([], [3]), ([], [2]), ([], [1]), ([0], [])]
    assert stages[0].gate_numel == 2 * 7 and stages[1].source.node.name() == "TanhBackward0"
    assert [s.source for s in stages[2:]] == [edges[3], edges[2], edges[1]]

    model, X = ResidualChain().to(DT), torch.randn(2, 2, 7, 7, dtype=DT)
    out, ys = _recorded(model, X)
    stages = plan_stages(out, [get_gradient_edge(y) for y in ys])
    foreign = [s for s in stages if s.gate is not None and not s.gate_calls]
    assert foreign, "no gate of its own (a residual sum) was found"
    assert all(s.gate_numel == 2 * 3 * 7 * 7 for s in foreign)  # the block outputs [N, 3, 7, 7]

    model, X = Branches().to(DT), torch.randn(2, 2, 7, 7, dtype=DT)
    out, ys = _recorded(model, X)
    stages = plan_stages(out, [get_gradient_edge(y) for y in ys])
    returned = {i for s in stages for i in s.calls + s.gate_calls}
    unused = 3  # modules in registration order: left, right, mix, unused, head
    assert unused not in returned and returned == {0, 1, 2, 4}


def test_stage_numels_by_hand():
    """Chain of sizes (outputs) 10, 20, 30, each layer a gate: the widest stage, worked out by hand."""
    numels, groups = [10, 20, 30], [0, 1, 2]
    stages = [Stage(gate="g2", gate_calls=[2]), Stage(source="g2", gate="g1", gate_calls=[1]), Stage(source="g1", calls=[0])]
    # stage 0: returns y2 (30) + transient 2·30; stage 1: source 30 + y1 20 + 2·20; stage 2: 20 + 10 + 2·10
    assert stage_numels(stages, numels, groups) == [90, 90, 50]
    # layers 0 and 2 one module (shared): y2's message is held until y0's is done
    assert stage_numels(stages, numels, [0, 1, 0]) == [90, 120, 80]
    # merging the first two stages holds 0 + (30 + 20) + 2·30 = 110 > 90; the last two: 30 + 30 + 40 = 100
    assert merge_stages(stages, numels, groups) == stages
    # handed-off sources: stage 0 returns 30 + transient 30; stage 1 max(source 30, y1 20) + 20; stage 2
    # max(20, 10) + 10; shared: y2's 30 held through stages 1 and 2
    assert stage_numels(stages, numels, groups, hand_off=True) == [60, 50, 30]
    assert stage_numels(stages, numels, [0, 1, 0], hand_off=True) == [60, 80, 60]
    # sizes 10, 200, 30: the middle stage is widest (30 + 200 + 2·200 = 630); the first two merged hold
    # 0 + (30 + 200) + 2·200 = 630 too, all three 240 + 2·200 = 640
    merged = merge_stages(stages, [10, 200, 30], groups)
    assert [(s.calls, s.gate_calls) for s in merged] == [([2], [1]), ([0], [])]


def _fresh(model):
    for p in model.parameters():
        for name in ("diag_ggn_exact", "diag_ggn_exact_batch", "kfac"):
            if hasattr(p, name):
                delattr(p, name)


@pytest.mark.parametrize("net", ["chain", "residual"])
def test_engine_stages_under_a_memory_budget(net):
    """Budgets that chunk the columns make the engine backpropagate in stages; the GGN diagonals match the
    dense-Jacobian reference and the KFAC factors those of the unstaged run."""
    factory, shape = NETS[net]
    model, X = factory().to(DT), torch.randn(*shape, dtype=DT)
    loss_fn, y = make_loss("ce", (X.shape[0], 4))
    whole = run_engine(model, loss_fn, X, y, KFACExpand(fisher="type-2"))
    kfac = {name: [f.clone() for f in p.kfac] for name, p in model.named_parameters() if hasattr(p, "kfac")}
    ref = GGNReference(copy.deepcopy(model), loss_fn, X, y)
    staged = set()
    budget = 20_000
    while budget < 10**6:  # ×1.15 until the 4 columns fit one chunk (unfolded inputs: up to 55 kB)
        budget = int(budget * 1.15)
        _fresh(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ctx = run_engine(model, loss_fn, X, y, DiagGGNExact(), BatchDiagGGNExact(), KFACExpand(fisher="type-2"),
                             memory_budget=budget)
        if ctx.last_stages is not None:
            staged.add(ctx.last_chunk_size)
            assert len(ctx.last_stages) > 1
        for name, p in model.named_parameters():
            assert_close(p.diag_ggn_exact, ref.diag(name), rtol=1e-10, name=f"{name} at {budget}")
            assert_close(p.diag_ggn_exact_batch, ref.diag_batch(name), rtol=1e-10, name=f"{name} at {budget}")
            if name in kfac:
                for actual, expected in zip(p.kfac, kfac[name]):
                    assert_close(actual, expected, rtol=1e-10, name=f"{name} KFAC at {budget}")
        if ctx.last_chunk_size == 4:
            break
    assert staged, "no budget made the engine backpropagate in stages"
    assert whole.last_stages is None  # no budget: one backward pass


def test_stages_only_where_they_fit_more_columns():
    """Without a budget, or where every column fits one backward pass, there are no stages."""
    model, X = make_model("cnn")
    loss_fn, y = make_loss("ce", (X.shape[0], 3))
    assert run_engine(model, loss_fn, X, y, DiagGGNExact()).last_stages is None
    assert run_engine(model, loss_fn, X, y, DiagGGNExact(), memory_budget=10**12).last_stages is None


def test_handoff_is_released_after_the_source_node(monkeypatch):
    """A :class:`Handoff` source leaves the walk holding the only reference: by the second node the
    vectors are gone; the messages still equal the per-column VJPs."""
    import weakref

    from curvlib.engine import batched_rules
    from curvlib.engine.graph_vjp import GraphVJP
    from curvlib.engine.staging import Handoff

    lin1, lin2 = nn.Linear(3, 5).to(DT), nn.Linear(5, 4).to(DT)
    h = lin1(torch.randn(6, 3, dtype=DT))
    out = lin2(torch.tanh(h))
    seen = []
    tanh_rule = batched_rules._RULES["TanhBackward0"]

    def watching(node, g, need, cache, options):
        seen.append(source_ref() is None)
        return tanh_rule(node, g, need, cache, options)

    monkeypatch.setitem(batched_rules._RULES, "TanhBackward0", watching)
    plan = GraphVJP.build(out, [get_gradient_edge(h)])
    vectors = torch.randn(3, *out.shape, dtype=DT)
    expected = _reference_messages(out, [h], vectors)[0]
    source_ref = weakref.ref(vectors)
    handoff = Handoff(vectors, recompute=lambda: pytest.fail("recomputed without a failure"))
    del vectors
    (message,) = plan.run(handoff, [h.shape])
    assert seen == [True], "the walk still held the source at the tanh node"
    assert_close(message, expected, rtol=1e-12, atol=1e-14, name="message")
    assert handoff.shape == (3, *out.shape)


def test_handoff_taken_twice_recomputes():
    from curvlib.engine.staging import Handoff, taken

    message = torch.randn(2, 3)
    calls = []
    handoff = Handoff(message, recompute=lambda: calls.append(1) or message * 2)
    assert taken(handoff) is message and not calls
    assert torch.equal(handoff.take(), message * 2) and calls == [1]
    assert taken(message) is message


class BatchNormBelowAGate(nn.Module):
    """Conv → BatchNorm (training mode) → leaky ReLU → four Conv → leaky ReLU → strided Conv → leaky ReLU →
    Linear: the batch norm, which the graph walk finds it cannot batch only while running, lies in a stage
    whose source is handed off (deep enough for stages to fit more columns per chunk). Leaky: a ReLU
    chain this narrow leaves the first layer without gradient for some initialisations."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.body = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.c2, self.lin = nn.Conv2d(4, 3, 3, stride=2), nn.Linear(27, 6)

    def forward(self, x):
        h = F.leaky_relu(self.bn(self.c1(x)), 0.1)
        for conv in self.body:
            h = F.leaky_relu(conv(h), 0.1)
        return self.lin(F.leaky_relu(self.c2(h), 0.1).flatten(1))


def test_handed_off_source_is_recomputed_where_the_walk_fails(monkeypatch):
    """A later stage's walk fails after taking its source: the source is recomputed from the columns and
    autograd runs the stage; the results equal those of autograd throughout."""
    from curvlib.engine import staging

    recomputed = []
    original = staging._recompute

    def counting(*args):
        again = original(*args)
        return lambda: recomputed.append(1) or again()

    monkeypatch.setattr(staging, "_recompute", counting)
    model, X = BatchNormBelowAGate().to(DT), torch.randn(3, 2, 7, 7, dtype=DT)
    loss_fn, y = make_loss("ce", (X.shape[0], 6))
    results = {}
    for mode in ("auto", "autograd"):
        _fresh(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ctx = run_engine(model, loss_fn, X, y, DiagGGNExact(), memory_budget=100_000, column_backward=mode,
                             batch_coupled=False)
        assert ctx.last_stages is not None and len(ctx.last_stages) > 1 and 1 < ctx.last_chunk_size < 6
        results[mode] = {name: p.diag_ggn_exact.clone() for name, p in model.named_parameters()}
    assert recomputed, "no handed-off source was recomputed"
    for name, expected in results["autograd"].items():
        assert_close(results["auto"][name], expected, rtol=1e-10, name=name)


def test_engine_releases_each_stage_source_after_its_node(monkeypatch):
    """In the engine's staged passes, no one keeps a stage's source once the walk has applied the
    source's node (neither the stage loop, nor the engine's generator that hands out the gate's message
    as a layer's)."""
    import weakref

    from curvlib.engine import batched_rules, staging

    sources, released = [], []
    take = staging.Handoff.take

    def recording_take(self):
        message = take(self)
        sources.append([weakref.ref(message), 0])
        return message

    def watching(rule):
        def watched(node, g, need, cache, options):
            if sources:
                sources[-1][1] += 1
                if sources[-1][1] == 2:  # the node after the source's
                    released.append(sources[-1][0]() is None)
            return rule(node, g, need, cache, options)
        return watched

    monkeypatch.setattr(staging.Handoff, "take", recording_take)
    for name, rule in list(batched_rules._RULES.items()):
        monkeypatch.setitem(batched_rules._RULES, name, watching(rule))
    factory, shape = NETS["chain"]
    model, X = factory().to(DT), torch.randn(*shape, dtype=DT)
    loss_fn, y = make_loss("ce", (X.shape[0], 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ctx = run_engine(model, loss_fn, X, y, DiagGGNExact(), memory_budget=100_000)
    assert ctx.last_stages is not None and len(ctx.last_stages) > 2 and ctx.last_column_backward == "graph"
    assert len(released) >= len(ctx.last_stages) - 1 and all(released), released


class Switchable(nn.Module):
    """Conv → activation → strided Conv → activation → Linear, the activation chosen per step: graphs of
    different structure with the same layer calls."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, stride=2)
        self.head = nn.Linear(27, 4)
        self.act = torch.tanh

    def forward(self, x):
        return self.head(self.act(self.c2(self.act(self.c1(x)))).flatten(1))


@pytest.mark.parametrize("net", ["chain", "residual", "switchable"])
def test_plans_carry_over_to_steps_of_the_same_structure(monkeypatch, net):
    """A later step whose graph has the same structure takes the stages, the chunk size and the graph walks
    from the plan cache (no new planning), with new data and parameters: GGN diagonals against the
    dense-Jacobian reference; a step of another structure (a different activation node, another batch
    size) plans anew and is right too."""
    from curvlib.engine import context, graph_vjp, plan_cache

    plans, builds = [], []
    stages = context.curvature._stages
    monkeypatch.setattr(context.curvature, "_stages", lambda self, *a: plans.append(1) or stages(self, *a))
    build = graph_vjp.GraphVJP.build.__func__
    monkeypatch.setattr(graph_vjp.GraphVJP, "build", classmethod(lambda cls, *a, **k: builds.append(1) or build(cls, *a, **k)))
    factory, shape = NETS[net] if net in NETS else (Switchable, (5, 2, 7, 7))
    model = factory().to(DT)
    loss_fn, _ = make_loss("ce", (shape[0], 4))

    def step(batch=shape[0]):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        X = torch.randn(batch, *shape[1:], dtype=DT)
        _, y = make_loss("ce", (batch, 4))
        _fresh(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ctx = run_engine(model, loss_fn, X, y, DiagGGNExact(), BatchDiagGGNExact(), memory_budget=budget)
        ref = GGNReference(copy.deepcopy(model), loss_fn, X, y)
        for name, p in model.named_parameters():
            assert_close(p.diag_ggn_exact, ref.diag(name), rtol=1e-10, name=name)
            assert_close(p.diag_ggn_exact_batch, ref.diag_batch(name), rtol=1e-10, name=name)
        return ctx

    budget = 20_000
    while budget < 10**6:  # the smallest budget (×1.15) at which the graph walk runs in stages
        budget = int(budget * 1.15)
        ctx = step()
        if ctx.last_stages is not None and ctx.last_column_backward == "graph":
            break
    plan_cache.clear()
    plans.clear()
    builds.clear()
    first = step()
    assert first.last_stages is not None and len(first.last_stages) > 1
    planned, built = len(plans), len(builds)
    assert planned == 1 and built == len(first.last_stages)
    again = step()
    assert (len(plans), len(builds)) == (planned, built), "a step of the same structure planned anew"
    assert [(s.calls, s.gate_calls) for s in again.last_stages] == [(s.calls, s.gate_calls) for s in first.last_stages]
    assert again.last_chunk_size == first.last_chunk_size
    if net == "switchable":
        model.act = torch.sigmoid  # same layers, another node type between them
        other = step()
    else:
        other = step(batch=shape[0] + 1)  # other shapes: another key
    assert len(plans) == planned + 1
    assert len(builds) > built or other.last_column_backward == "autograd"
