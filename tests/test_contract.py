"""Cached contraction plans: planned once per equation/shapes/dtype/device, inspectable, verbose."""

from __future__ import annotations

import opt_einsum
import pytest
import torch

import curvlib.functional as F
from curvlib import contract as C
from curvlib.expressions import kfac
from curvlib.hyperparams import make_geometry
from conftest import DTYPE, assert_close


@pytest.fixture
def count_path_searches(monkeypatch):
    """Counts calls of opt_einsum.contract_path made by curvlib.contract."""
    calls = []
    original = opt_einsum.contract_path

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(C.opt_einsum, "contract_path", counting)
    return calls


@pytest.fixture
def fresh_cache():
    C.clear_cache()
    assert C.cache_size() == 0
    yield
    C.clear_cache()


def _kfc_network(x, kernel=3, **kwargs):
    geometry = make_geometry(x.shape[1], x.shape[1], x.shape[2:], kernel, **kwargs)
    return kfac.kfc(x, geometry)


def test_second_call_does_no_path_search(fresh_cache, count_path_searches, seed):
    x = torch.randn(2, 3, 6, 5, dtype=DTYPE)
    network = _kfc_network(x, padding=1)
    first = C.contract(network)
    assert C.cache_size() == 1 and len(count_path_searches) == 1
    plan = C.plan(network)
    assert plan.calls == 1
    # new data, same equation and shapes: the plan is reused, no search
    network2 = _kfc_network(torch.randn_like(x), padding=1)
    second = C.contract(network2)
    assert C.cache_size() == 1 and len(count_path_searches) == 1
    assert C.plan(network2) is plan and plan.calls == 2
    assert not torch.equal(first, second)
    assert_close(C.contract(network), first, name="same network contracted twice")
    assert plan.calls == 3 and len(count_path_searches) == 1


def test_new_shapes_or_dtype_plan_again(fresh_cache, count_path_searches, seed):
    x = torch.randn(2, 3, 6, 5, dtype=DTYPE)
    C.contract(_kfc_network(x, padding=1))
    C.contract(_kfc_network(torch.randn(2, 3, 7, 5, dtype=DTYPE), padding=1))  # new shapes
    assert C.cache_size() == 2 and len(count_path_searches) == 2
    C.contract(_kfc_network(x.float(), padding=1))  # new dtype
    assert C.cache_size() == 3 and len(count_path_searches) == 3
    C.contract(_kfc_network(x.float(), padding=1))
    assert C.cache_size() == 3 and len(count_path_searches) == 3


def test_functional_calls_reuse_plans(fresh_cache, count_path_searches, seed):
    x = torch.randn(2, 3, 6, 6, dtype=DTYPE)
    s = torch.randn(2, 2, 4, 6, 6, dtype=DTYPE)
    F.ggn_diag(x, s, 3, padding=1, simplify=False, pathway="tn")
    F.kfc(x, 3, padding=1, pathway="tn")
    searches, size = len(count_path_searches), C.cache_size()
    assert searches == size == 2
    for _ in range(3):
        F.ggn_diag(torch.randn_like(x), torch.randn_like(s), 3, padding=1, simplify=False, pathway="tn")
        F.kfc(torch.randn_like(x), 3, padding=1, pathway="tn")
    assert len(count_path_searches) == searches and C.cache_size() == size


def test_inspect_plans(fresh_cache, seed):
    x = torch.randn(2, 3, 6, 6, dtype=DTYPE)
    network = _kfc_network(x, padding=1)
    with C.inspect_plans() as plans:
        C.contract(network)
        C.contract(network)
    assert len(plans) == 2 and plans[0] is plans[1]
    plan = plans[0]
    assert plan.equation == network.equation and "->" in plan.equation
    assert plan.named_equation == network.named_equation
    assert plan.shapes == tuple(network.operand_shape(op) for op in network.operands)
    assert len(plan.path) == len(network.operands) - 1 and all(len(step) == 2 for step in plan.path)
    assert plan.flops > 0 and plan.largest_intermediate > 0
    assert plan.calls == 2
    text = str(plan)
    for part in (plan.named_equation, plan.equation, str(plan.path), "flops", "largest intermediate"):
        assert part in text
    # outside the block nothing more is recorded
    C.contract(network)
    assert len(plans) == 2


def test_inspect_plans_of_functional(fresh_cache, seed):
    x = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    with C.inspect_plans() as plans:
        F.kfc(x, 3, pathway="tn")
    assert len(plans) == 1 and plans[0].flops > 0
    with C.inspect_plans() as outer:
        with C.inspect_plans() as inner:
            F.kfc(x, 3, pathway="tn")
        F.kfc(x, 2, stride=2, pathway="tn")
    # nested blocks: each records what ran inside it (regression: the inner block's exit stopped
    # the outer recorder, whose list compared equal)
    assert len(inner) == 1 and len(outer) == 2 and outer[0] is inner[0]
    assert outer[1].shapes != inner[0].shapes
    F.kfc(x, 3, pathway="tn")
    assert len(inner) == 1 and len(outer) == 2


def test_largest_intermediate_matches_opt_einsum(fresh_cache, seed):
    x = torch.randn(2, 3, 6, 5, dtype=DTYPE)
    network = _kfc_network(x, padding=1)
    plan = C.plan(network)
    _, info = opt_einsum.contract_path(network.equation, *plan.shapes, shapes=True, optimize=plan.path)
    assert plan.largest_intermediate == info.largest_intermediate
    assert plan.flops == int(info.opt_cost)


def test_set_verbose_prints_new_plans(fresh_cache, capsys, seed):
    x = torch.randn(2, 3, 6, 5, dtype=DTYPE)
    network = _kfc_network(x, padding=1)
    C.set_verbose(True)
    try:
        C.contract(network)
        printed = capsys.readouterr().out
        assert "[curvlib] new plan for kfc" in printed
        assert network.named_equation in printed and "flops" in printed
        C.contract(network)  # cached: nothing printed
        assert capsys.readouterr().out == ""
    finally:
        C.set_verbose(False)
    C.clear_cache()
    C.contract(network)
    assert capsys.readouterr().out == ""


def test_single_operand_network(fresh_cache, seed):
    """A network reduced to one operand is contracted by torch.einsum directly."""
    x = torch.randn(2, 3, 6, 4, dtype=DTYPE)
    with C.inspect_plans() as plans:
        result = F.unfold(x, 2, stride=2, pathway="tn")
    assert len(plans[0].shapes) == 1 and plans[0].path == [(0,)]
    assert_close(result, torch.nn.functional.unfold(x, 2, stride=2), name="unfold via a single operand")
