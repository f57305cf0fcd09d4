"""The per-operation benchmark: Table E3 data, PT reference implementations, and a --quick run."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
ANCHORS = os.path.join(ROOT, "..", "shared", "anchors", "anchor_ops.jsonl")


def _import(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    return importlib.import_module(name)


table_e3 = _import("table_e3")


def _conv_output_shape(layer):
    x = torch.empty(1, *layer.input_shape, device="meta")
    w = torch.empty(layer.output_shape[0], layer.input_shape[0] // layer.groups, *layer.kernel, device="meta")
    return tuple(tf.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups).shape[1:])


def test_table_e3_rows():
    layers = table_e3.LAYERS
    assert len(layers) == 132
    assert [net for net in table_e3.NETS if any(lay.net == net for lay in layers)] == table_e3.NETS
    counts = {net: sum(lay.net == net for lay in layers) for net in table_e3.NETS}
    assert counts == {"3c3d": 3, "2c2d": 2, "allcnnc": 9, "alexnet": 5, "resnet18": 11, "resnext101": 19,
                      "convnext": 8, "inceptionv3": 45, "mobilenetv2": 30}
    assert len({lay.key for lay in layers}) == len(layers)
    for lay in layers:
        assert lay.type in table_e3.TYPES
        assert lay.input_shape[0] % lay.groups == 0 and lay.output_shape[0] % lay.groups == 0
        assert lay.batch_size == (128 if lay.net in ("3c3d", "2c2d", "allcnnc") else 32)


@pytest.mark.parametrize("layer", table_e3.LAYERS, ids=lambda lay: f"{lay.net}/{lay.name}")
def test_table_e3_output_shape(layer):
    """torch's conv output shape for the table's input and hyper-parameters is the table's output shape."""
    assert _conv_output_shape(layer) == layer.output_shape


def test_table_e3_types_match_hyperparameters():
    """The paper's classification, checked per spatial axis: dense axis = (K = S, P = 0)."""
    for lay in table_e3.LAYERS:
        dense_axes = [k == s and p == 0 for k, s, p in zip(lay.kernel, lay.stride, lay.padding)]
        if lay.type == "Dense":
            assert all(dense_axes), lay
        elif lay.type == "Dense mix":
            assert sum(dense_axes) == 1 and 1 in lay.kernel, lay
        elif lay.type == "Down":
            assert lay.kernel == (1, 1) and min(lay.stride) > 1 and lay.padding == (0, 0), lay
        else:
            assert not all(dense_axes), lay


def test_anchor_layers():
    assert len(table_e3.ANCHOR_NAMES) == 66 and len(table_e3.ANCHOR_LAYERS) == 66
    assert len(table_e3.layers(subset="all")) == 132 and len(table_e3.layers()) == 66
    assert [lay.net for lay in table_e3.layers(["resnet18"])] == ["resnet18"] * 11
    if not os.path.exists(ANCHORS):
        pytest.skip("shared/anchors not present")
    seen = {}
    for line in open(ANCHORS):
        r = json.loads(line)
        seen.setdefault((r["net"], r["layer"]), (r["count"], r["type"], r["N"]))
    ours = {(lay.net, lay.anchor_name): (lay.count, lay.type, lay.batch_size) for lay in table_e3.ANCHOR_LAYERS}
    assert ours == seen


def _reference_jacobian(x, w, hyper):
    """``J[n, out..., weight...]``: the conv output's Jacobian w.r.t. the weight, per sample (autograd)."""
    def out(weight):
        return tf.conv2d(x, weight, None, **hyper)

    return torch.autograd.functional.jacobian(out, w)  # [N, C_out, *O, C_out, C_in/G, *K]


def test_pt_references_against_autograd():
    ops = _import("ops")
    torch.manual_seed(0)
    layer = ops.QUICK_LAYERS[0]  # grouped, strided, dilated, padded
    case = ops.Case(layer, 3, 4, ops.OPS, torch.device("cpu"))
    for name in ("x", "w", "v", "s", "d"):
        setattr(case, name, getattr(case, name).double())
    J = _reference_jacobian(case.x, case.w, case.hyper)
    Jf = J.reshape(case.N, -1, case.w.numel())  # [N, out, |w|]
    per_sample = torch.einsum("cnk,nkw->cnw", case.s.reshape(case.C, case.N, -1), Jf)  # [C, N, |w|]
    close = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ops.pt_ggn_diag(case).reshape(-1), per_sample.square().sum((0, 1)), **close)
    gram = torch.einsum("cnw,dmw->cndm", per_sample, per_sample)
    torch.testing.assert_close(ops.pt_ggn_gram(case), gram, **close)
    # tiny chunk budget: several blocks of output channels give the same results
    torch.testing.assert_close(ops.pt_ggn_diag(case, budget_bytes=1), per_sample.square().sum((0, 1))
                               .reshape(case.w.shape), **close)
    torch.testing.assert_close(ops.pt_ggn_gram(case, budget_bytes=1), gram, **close)
    hess = torch.einsum("nk,nkw->w", case.d.reshape(case.N, -1), Jf.square())
    torch.testing.assert_close(ops.pt_hesscale_weight_diag(case).reshape(-1), hess, **close)
    torch.testing.assert_close(ops.pt_weight_vjp(case).reshape(-1),
                               torch.einsum("nk,nkw->w", case.v.reshape(case.N, -1), Jf), **close)
    # KFC / KFAC-reduce from the definition: unfolded patches, per group
    u = tf.unfold(case.x, layer.kernel, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    u = u.reshape(case.N, case.G, case.D, case.O)
    kfc = torch.stack([sum(u[n, g] @ u[n, g].T for n in range(case.N)) / case.N for g in range(case.G)])
    torch.testing.assert_close(ops.pt_kfc(case), kfc, **close)
    ubar = u.mean(-1)
    reduce = torch.stack([sum(torch.outer(ubar[n, g], ubar[n, g]) for n in range(case.N)) / case.N
                          for g in range(case.G)])
    torch.testing.assert_close(ops.pt_kfac_reduce(case), reduce, **close)


def test_quick_run(tmp_path):
    """``ops.py --quick`` runs, writes its outputs, and every implementation agrees with PT."""
    out = tmp_path / "quick"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "ops.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "ops.jsonl").exists() and (out / "summary.md").exists()
    records = [json.loads(line) for line in (out / "ops.jsonl").read_text().splitlines()]
    ops = _import("ops")
    impls = {r["impl"] for r in records}
    always = ("PT", "curvlib-TN", "curvlib-TN+opt", "curvlib-unfold", "curvlib-native", "curvlib-auto")
    assert set(always) <= impls
    for impl in always:
        got = {(r["layer"], r["op"]) for r in records if r["impl"] == impl}
        assert got == {(lay.name, op) for lay in ops.QUICK_LAYERS for op in ops.OPS}, impl
    for r in records:
        if r["status"] == "n/a":  # no fused kernels on the CPU; lags only for KFC of stride-1 layers
            assert r["impl"] in ("curvlib-fused", "curvlib-lags") and "not available" in r["reason"], r
            assert r["impl"] == "curvlib-fused" or r["op"] != "kfc" or r["layer"] in ("general", "down"), r
            continue
        assert r["status"] == "ok", r
        assert r["time_s"] > 0 and r["min_s"] <= r["time_s"] and r["repeats"] >= 1
        assert r["relerr"] is not None and r["relerr"] < 1e-4, r
        assert r["device"] and r["torch"] == torch.__version__ and r["date"]
    summary = (out / "summary.md").read_text()
    assert "## Median ratio to PT per operation and convolution type" in summary and "## Targets" in summary
    auto = [r for r in records if r["impl"] == "curvlib-auto"]
    # on the CPU no fused kernels; the lags pathway (KFC, stride 1) wins where measured faster
    assert all(r["auto_choice"] in ("native", "tn", "tn+simplify", "unfold") + (("lags",) if r["op"] == "kfc" else ())
               for r in auto), [(r["layer"], r["op"], r["auto_choice"]) for r in auto]
    assert all(op in summary for op in ops.OPS)
    assert math.isfinite(max(r["time_s"] for r in records if r["status"] == "ok"))
    # the summary can be rebuilt from ops.jsonl alone
    (out / "summary.md").unlink()
    assert ops.main(["--summarize", str(out)]) == 0
    assert (out / "summary.md").read_text() == summary


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # BackPACK's own hooks
def test_end_to_end_quick_run(tmp_path):
    """``end_to_end.py --quick`` runs every extension (and BackPACK's equivalents when importable),
    writes its table, and the GGN Gram agrees with the torch.func empirical NTK."""
    end_to_end = _import("end_to_end")
    end_to_end.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    records = [json.loads(line) for line in (tmp_path / "end_to_end.jsonl").read_text().splitlines()]
    names = {(r["net"], r["ext"]) for r in records}
    for net in ("3c3d", "all_cnn_c"):
        for ext in ("plain", "DiagGGNExact", "DiagGGNMC", "KFACExpand(mc)", "KFACReduce(type-2)", "HesScale"):
            assert (net, ext) in names, (net, ext)
    for r in records:
        if "s" in r:
            assert r["s"] > 0 and math.isfinite(r["s"])
    assert records[0]["gram_relerr"] < 1e-4
    table = (tmp_path / "end_to_end.md").read_text()
    assert "| 3c3d | DiagGGNExact |" in table
    try:
        import backpack  # noqa: F401
    except ImportError:
        return
    assert ("3c3d", "BackPACK DiagGGNExact") in names


def test_kfac_reduce_floor_row_counts_the_largest_inputs():
    """The issue-5 bandwidth row: auto's time over ``x bytes / copy bandwidth`` on the largest inputs only."""
    ops = _import("ops")
    bandwidth = 2e12
    entries = {}
    for i, (x_mib, multiple) in enumerate([(1, 9.0)] + [(100 + j, 2.0 + j / 10) for j in range(10)]):
        x_bytes = x_mib * 2**20
        auto = dict(status="ok", time_s=multiple * x_bytes / bandwidth, x_bytes=x_bytes, copy_bytes_per_s=bandwidth)
        entries[("net", f"layer{i}", "kfac_reduce")] = {"curvlib-auto": auto, "PT": dict(status="ok")}
    ratios = ops.floor_ratios(entries)
    assert [name for name, _ in ratios] == [f"net/layer{i}" for i in range(10, 0, -1)]  # the small one left out
    assert all(math.isclose(r, 2.0 + (i - 1) / 10) for (_, r), i in zip(ratios, range(10, 0, -1)))
    assert "10 of 10 within" in ops._floor_line(entries)
    slow = entries[("net", "layer5", "kfac_reduce")]["curvlib-auto"]
    slow["time_s"] *= 3
    line = ops._floor_line(entries)
    assert "9 of 10 within" in line and "net/layer5" in line and "**no**" in line
