"""The ``"unfold"`` pathway (overlapping windows viewed as the unfolded input) against independent references."""

import math

import pytest
import torch
import torch.nn.functional as tf
from torch.func import jacrev

from curvlib import functional as F

HYPER = [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
]


@pytest.mark.parametrize("hyper", HYPER)
def test_unfold_pathway(seed, hyper):
    torch.manual_seed(seed)
    dt = torch.float64
    x = torch.randn(3, 4, 7, 6, dtype=dt)
    w = torch.randn(6, 4 // hyper["groups"], 3, 2, dtype=dt)
    conv = lambda w: tf.conv2d(x, w, **hyper)  # noqa: E731
    y = conv(w)
    s = torch.randn(5, *y.shape, dtype=dt)
    d = torch.rand_like(y)
    jac = jacrev(conv)(w).reshape(3, -1, w.numel())  # [N, out, |w|]
    per_column = torch.einsum("cnp,npw->cnw", s.reshape(5, 3, -1), jac)
    kw = dict(hyper, pathway="unfold")
    assert torch.allclose(F.ggn_diag(x, s, (3, 2), **kw), (per_column**2).sum((0, 1)).reshape(w.shape))
    assert torch.allclose(F.ggn_gram(x, s, (3, 2), **kw), torch.einsum("cnw,dmw->cndm", per_column, per_column))
    full = torch.einsum("cnw,cnv->wv", per_column, per_column)
    assert torch.allclose(F.ggn(x, s, (3, 2), **kw), full)
    assert torch.allclose(F.hesscale_weight_diag(x, d, (3, 2), **kw),
                          torch.einsum("npw,np->w", jac**2, d.reshape(3, -1)).reshape(w.shape))
    v = s[0]
    assert torch.allclose(F.weight_vjp(x, v, (3, 2), **kw), torch.einsum("np,npw->w", v.reshape(3, -1), jac).reshape(w.shape))
    unfolded = tf.unfold(x, (3, 2), dilation=hyper["dilation"], padding=hyper["padding"], stride=hyper["stride"])
    unfolded = unfolded.reshape(3, hyper["groups"], -1, unfolded.shape[-1])
    kfc = torch.einsum("ngdo,ngeo->gde", unfolded, unfolded) / 3
    assert torch.allclose(F.kfc(x, (3, 2), **kw), kfc)
    mean = unfolded.mean(-1)
    assert torch.allclose(F.kfac_reduce(x, (3, 2), **kw), torch.einsum("ngd,nge->gde", mean, mean) / 3)


def test_unknown_pathway():
    with pytest.raises(ValueError, match="pathway"):
        F.ggn_diag(torch.randn(2, 3, 5, 5), torch.randn(4, 2, 2, 3, 3), 3, pathway="fast")


# ----------------------------------------------------------------------------------------------
# pathway choice (curvlib.pathways) and the native pathway (curvlib.native)

import json  # noqa: E402

import curvlib.pathways as pathways  # noqa: E402
from curvlib import cost  # noqa: E402
from curvlib.hyperparams import make_geometry  # noqa: E402


@pytest.fixture
def fresh_decisions():
    pathways.clear()
    yield
    pathways.clear()


def _kfc_inputs(seed):
    torch.manual_seed(seed)
    return torch.randn(3, 4, 9, 8, dtype=torch.float64)


def test_forced_pathway_that_does_not_apply_names_the_alternatives():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"pathway='native' is not available for kfc.*\['tn', 'unfold'\]"):
        F.kfc(x, 3, stride=2, transposed=True, pathway="native")
    with pytest.raises(ValueError, match="pathway='native' is not available for weight_vjp"):
        F.weight_vjp(x, torch.randn(2, 6, 3, 3), 3, per_sample=True, pathway="native")
    with pytest.raises(TypeError, match="simplify must be a bool"):
        F.kfc(x, 3, simplify="yes")


def test_fused_pathway_on_cpu_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="pathway='fused' is not available for kfc"):
        F.kfc(torch.randn(2, 4, 5, 5), 3, pathway="fused")


def test_every_pathway_leaves_its_inputs_untouched(seed):
    """Unfolded inputs may be views of ``x`` (kernel 1, no padding): no pathway may write into them."""
    torch.manual_seed(seed)
    x, d = torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.rand(2, 6, 5, 4, dtype=torch.float64)
    s = torch.randn(2, 2, 6, 5, 4, dtype=torch.float64)
    x0, d0, s0 = x.clone(), d.clone(), s.clone()
    for pathway in ("native", "tn", "unfold", "auto"):
        F.hesscale_weight_diag(x, d, 1, pathway=pathway)
        F.ggn_diag(x, s, 1, pathway=pathway)
        F.kfc(x, 1, pathway=pathway)
        F.kfac_reduce(x, 1, pathway=pathway)
    assert torch.equal(x, x0) and torch.equal(d, d0) and torch.equal(s, s0)


def test_autotune_measures_every_candidate_and_takes_the_fastest(fresh_decisions, seed):
    x = _kfc_inputs(seed)
    with pathways.options(autotune=True, repeats=2):
        result = F.kfc(x, 3, padding=1)
        again = F.kfc(x, 3, padding=1)  # cached: no second measurement
    (decision,) = pathways.decisions()
    assert decision.how == "measured" and decision.op == "kfc"
    assert set(decision.measurements) == {"native", "tn", "tn+simplify", "unfold", "lags"}  # stride 1: lags too
    times = {name: m["time_s"] for name, m in decision.measurements.items()}
    assert decision.choice == min(times, key=times.get)
    expected = F.kfc(x, 3, padding=1, pathway="tn", simplify=False)
    assert torch.allclose(result, expected) and torch.allclose(again, expected)


def test_memory_budget_excludes_candidates_that_do_not_fit(fresh_decisions, seed):
    x = _kfc_inputs(seed)
    with pathways.options(autotune=False, memory_budget=0):
        F.kfc(x, 3, padding=1)
    (decision,) = pathways.decisions()
    assert decision.how == "cost model"
    extra = {name: m["extra_bytes"] for name, m in decision.measurements.items()}
    assert all(v > 0 for v in extra.values())  # nothing fits 0 bytes: the leanest is taken
    assert decision.choice == min(extra, key=extra.get)
    pathways.clear()
    lean = min(extra.values())
    with pathways.options(memory_budget=lean):
        F.kfc(x, 3, padding=1)
    (decision,) = pathways.decisions()
    fitting = {n: m["time_s"] for n, m in decision.measurements.items() if m["extra_bytes"] <= lean}
    assert decision.choice == min(fitting, key=fitting.get)


@pytest.mark.parametrize("fraction", [0.01, 0.3, 2.0])
def test_memory_fraction_limits_candidates_relative_to_the_unfold_pathway(fresh_decisions, fraction, seed):
    """``memory_fraction``: the fastest candidate within that fraction of the unfold pathway's analytic
    extra memory (the unfolded input and its permuted copy for the KFC), the leanest if none fits; the
    smaller of it and ``memory_budget`` holds; decisions are cached per fraction."""
    x = _kfc_inputs(seed)
    geometry = make_geometry(x.shape[1], 5, x.shape[2:], 3, padding=1)
    unfolded = x.shape[0] * x.shape[1] * 9 * x.shape[2] * x.shape[3] * x.element_size()
    reference = cost.operation_cost("kfc", "unfold", geometry, x.shape[0], element_size=x.element_size())
    assert reference.extra_bytes == 2 * unfolded
    for budget in (None, 0.5 * fraction * reference.extra_bytes):
        pathways.clear()
        with pathways.options(autotune=False, memory_fraction=fraction, memory_budget=budget):
            F.kfc(x, 3, padding=1)
        (decision,) = pathways.decisions()
        limit = fraction * reference.extra_bytes if budget is None else budget
        extra = {name: m["extra_bytes"] for name, m in decision.measurements.items()}
        fitting = {n: m["time_s"] for n, m in decision.measurements.items() if m["extra_bytes"] <= limit}
        expected = min(fitting, key=fitting.get) if fitting else min(extra, key=extra.get)
        assert decision.choice == expected, (fraction, budget, decision.measurements)
    pathways.clear()
    with pathways.options(memory_fraction=fraction):
        F.kfc(x, 3, padding=1)
    with pathways.options(memory_fraction=fraction / 2):
        F.kfc(x, 3, padding=1)
    assert len({d.key for d in pathways.decisions()}) == 2  # the fraction is part of the key


def test_exclude_and_settings_are_part_of_the_cache_key(fresh_decisions, seed):
    x = _kfc_inputs(seed)
    with pathways.options(exclude=("native", "unfold", "tn+simplify")):
        F.kfc(x, 3, padding=1)
    assert pathways.decisions()[-1].choice == "tn"
    F.kfc(x, 3, padding=1)  # default settings: a new decision
    assert len(pathways.decisions()) == 2


def test_decisions_persist_on_disk(fresh_decisions, tmp_path, seed):
    x = _kfc_inputs(seed)
    path = tmp_path / "choices.json"
    with pathways.options(autotune=True, repeats=1, cache_file=str(path)):
        F.kfc(x, 3, padding=1)
        measured = pathways.decisions()[0]
        stored = json.loads(path.read_text())
        assert list(stored.values())[0]["choice"] == measured.choice
        pathways.clear()  # a new process: memory empty, file kept
        F.kfc(x, 3, padding=1)
        (reloaded,) = pathways.decisions()
        assert reloaded.how == "disk cache" and reloaded.choice == measured.choice
        pathways.clear(disk=True)
        assert not path.exists()


def test_damaged_cache_file_is_ignored(fresh_decisions, tmp_path, seed):
    path = tmp_path / "choices.json"
    path.write_text("{not json")
    with pathways.options(autotune=True, repeats=1, cache_file=str(path)):
        F.kfac_reduce(_kfc_inputs(seed), 3)
    assert pathways.decisions()[0].how == "measured"
    assert json.loads(path.read_text())  # rewritten


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(autotune="yes"), TypeError, "autotune"),
    (dict(memory_budget=-1), ValueError, "memory_budget"),
    (dict(memory_budget=float("nan")), ValueError, "memory_budget"),
    (dict(memory_fraction=-0.1), ValueError, "memory_fraction"),
    (dict(memory_fraction="5%"), ValueError, "memory_fraction must be None or a non-negative number, got '5%'"),
    (dict(memory_fraction=True), ValueError, "memory_fraction"),
    (dict(repeats=0), ValueError, "repeats"),
    (dict(exclude=("fast",)), ValueError, "exclude"),
    (dict(exclude="native"), ValueError, "exclude"),
    (dict(cache_file=3), TypeError, "cache_file"),
])
def test_configure_rejects_bad_settings(kwargs, error, match):
    before = pathways.settings()
    with pytest.raises(error, match=match):
        pathways.configure(**kwargs)
    assert pathways.settings() == before


def test_cost_model_counts(seed):
    g = make_geometry(6, 8, (10, 9), (3, 2), stride=(2, 1), padding=1, groups=2)
    n, c = 4, 3
    o = math.prod(g.output_size)
    d, e = 3 * 3 * 2, 4
    assert cost.minimum("kfc", g, n)[0] == 2 * n * o * 2 * d * d
    assert cost.minimum("weight_vjp", g, n)[0] == 2 * n * o * 2 * e * d
    assert cost.minimum("ggn_diag", g, n, columns=c)[0] == c * 2 * n * o * 2 * e * d + 2 * c * n * 2 * e * d
    native = cost.operation_cost("kfc", "native", g, n)
    # unfolded in chunks of a quarter of the samples (one here), each cut from the padded input (12x11)
    assert native.largest_intermediate_bytes == native.extra_bytes == (2 * d * o + 6 * 12 * 11) * 4
    with pathways.options(memory_budget=3 * (2 * d * o + 6 * 12 * 11) * 4):  # the budget bounds the chunk
        assert cost.operation_cost("kfc", "native", g, 16).extra_bytes == 3 * (2 * d * o + 6 * 12 * 11) * 4
    # and so does a fraction of the unfold pathway's memory (2 unfolded inputs: 2·16 samples' worth)
    with pathways.options(memory_fraction=2 * (2 * d * o + 6 * 12 * 11) / (2 * 16 * 2 * d * o) + 1e-9):
        assert cost.operation_cost("kfc", "native", g, 16).extra_bytes == 2 * (2 * d * o + 6 * 12 * 11) * 4
    fused = cost.operation_cost("kfc", "fused", g, n)
    assert fused.extra_bytes == 0 and fused.flops == native.flops
    roof = cost.ceilings("cpu")
    assert native.ideal_time("cpu") == max(native.flops / roof.flops_per_s, native.min_bytes / roof.bytes_per_s)
    with pytest.raises(ValueError, match="op must be"):
        cost.minimum("nonsense", g, n)
    with pytest.raises(TypeError, match="Ceilings"):
        cost.set_ceilings("cuda", 3.0)


def test_cost_model_prices_tf32_where_calibrated():
    """Under ``precision="tf32"`` the GGN diagonal's native and fused products run at their TF32 rates
    (the H100 measurement: All-CNN-C's conv6, 64 locations, 10 columns, is faster fused, conv2 with 1024
    locations native — float32 prices native first on both); 16-bit inputs on a GPU are priced on the
    matrix units too; other pairs and devices without TF32 units keep their float32 price."""
    conv2 = make_geometry(96, 96, (34, 34), 3)
    conv6 = make_geometry(192, 192, (17, 17), 3, stride=2)
    batch, columns = 128, 10

    def seconds(op, pathway, geometry, precision, element_size=4, device="cuda"):
        return cost.operation_cost(op, pathway, geometry, batch, columns, element_size,
                                   precision=precision).estimated_time(device)

    for precision in (None, "ieee"):
        assert seconds("ggn_diag", "native", conv6, precision) < seconds("ggn_diag", "fused", conv6, precision)
    assert seconds("ggn_diag", "fused", conv6, "tf32") < seconds("ggn_diag", "native", conv6, "tf32")
    assert seconds("ggn_diag", "native", conv2, "tf32") < seconds("ggn_diag", "fused", conv2, "tf32")
    # the fused kernel is compute-bound here: its time scales with the rate
    roof = cost.ceilings("cuda")
    efficiency = cost.tf32_flop_efficiency("ggn_diag", "fused", conv6, 4)  # with TMA where this device has it
    ratio = (roof.tf32_flops_per_s * efficiency) / (roof.flops_per_s * cost.flop_efficiency("ggn_diag", "fused"))
    fused_ieee, fused_tf32 = (cost.operation_cost("ggn_diag", "fused", conv6, batch, columns, precision=p)
                              for p in ("ieee", "tf32"))
    assert fused_tf32.tf32_flop_efficiency == efficiency
    overhead = fused_ieee.overhead_s + roof.call_overhead_s
    assert math.isclose(fused_ieee.estimated_time("cuda") - overhead,
                        ratio * (fused_tf32.estimated_time("cuda") - overhead), rel_tol=1e-9)
    # uncalibrated pairs and a device without TF32 units: unchanged
    assert seconds("kfc", "native", conv2, "tf32") == seconds("kfc", "native", conv2, "ieee")
    # "bf16" (library calls on float32 run TF32) prices float32 products like "tf32"
    assert seconds("ggn_diag", "fused", conv6, "bf16") == seconds("ggn_diag", "fused", conv6, "tf32")
    # bfloat16 inputs run on the matrix units whatever the setting (a GPU: precision not None), at least
    # at the TF32 rate; precision None (the CPU) keeps the float32 price
    assert seconds("ggn_diag", "fused", conv6, "tf32", 2) == seconds("ggn_diag", "fused", conv6, "ieee", 2)
    for pathway in ("fused", "native"):
        half = cost.operation_cost("ggn_diag", pathway, conv6, batch, columns, 2, precision="ieee")
        assert half.tf32_flop_efficiency == cost.tf32_flop_efficiency("ggn_diag", pathway, conv6, 2) is not None
        assert cost.operation_cost("ggn_diag", pathway, conv6, batch, columns, 2).tf32_flop_efficiency is None
    assert seconds("ggn_diag", "fused", conv6, "ieee", 2) < seconds("ggn_diag", "fused", conv6, None, 2)
    assert seconds("ggn_diag", "fused", conv6, "tf32", device="cpu") == \
        seconds("ggn_diag", "fused", conv6, "ieee", device="cpu")
    assert cost.ceilings("cpu").tf32_flops_per_s is None


@pytest.mark.parametrize("tma", [False, True])
def test_cost_model_prices_the_tma_kernel_where_it_runs(monkeypatch, tma):
    """The fused GGN diagonal's TF32 rate is the TMA kernel's on devices that run it, for layers whose
    output locations fill 16-byte rows (64 here), and the pointer kernel's otherwise (49 locations)."""
    monkeypatch.setattr(cost, "_tma_device", lambda: tma)
    even = make_geometry(192, 192, (17, 17), 3, stride=2)  # 8 x 8 locations
    odd = make_geometry(192, 192, (9, 9), 3)  # 7 x 7
    fused, native = cost.TF32_FLOP_EFFICIENCY_TMA[("fused", "ggn_diag")], cost.TF32_FLOP_EFFICIENCY[("fused", "ggn_diag")]
    assert fused > native
    assert cost.tf32_flop_efficiency("ggn_diag", "fused", even, 4) == (fused if tma else native)
    assert cost.tf32_flop_efficiency("ggn_diag", "fused", odd, 4) == native
    assert cost.tf32_flop_efficiency("ggn_diag", "fused", make_geometry(3, 4, (7, 7), 3), 2) == native  # 25 locations
    assert cost.tf32_flop_efficiency("ggn_diag", "native", even, 4) == cost.TF32_FLOP_EFFICIENCY[("native", "ggn_diag")]
    assert cost.tf32_flop_efficiency("kfc", "fused", even, 4) is None
    priced = cost.operation_cost("ggn_diag", "fused", even, 128, 10, precision="tf32")
    assert priced.tf32_flop_efficiency == (fused if tma else native)


def test_cost_model_prices_sixteen_bit_ggn_products(monkeypatch):
    """bf16 columns (21 per chunk, All-CNN-C's 3×3 layers): the fused kernel's TMA form is priced at its
    measured 16-bit rate and chosen over the native pathway, whose batched products run near the bf16 peak
    but whose copies and norms run one after another (H100, seventeenth session: conv2 1.57 against 2.0 ms).
    Float32 operands keep the TF32 prices; without the TMA form the fused price is the pointer kernel's."""
    monkeypatch.setattr(cost, "_tma_device", lambda: True)
    sixteen = cost.SIXTEEN_BIT_FLOP_EFFICIENCY
    for ci, co, size, stride in ((96, 96, 34, 1), (96, 96, 33, 2), (96, 192, 18, 1), (192, 192, 18, 1)):
        geometry = make_geometry(ci, co, (size, size), 3, stride=stride)
        priced = {p: cost.operation_cost("ggn_diag", p, geometry, 128, 21, 2, chunk_bytes=1e9, precision="bf16")
                  for p in ("native", "fused")}
        assert priced["native"].tf32_flop_efficiency == sixteen[("native", "ggn_diag")]
        assert priced["fused"].tf32_flop_efficiency == sixteen[("fused", "ggn_diag")]
        assert priced["fused"].estimated_time("cuda") < priced["native"].estimated_time("cuda"), geometry
        as_float32 = cost.operation_cost("ggn_diag", "fused", geometry, 128, 21, 4, precision="tf32")
        assert as_float32.tf32_flop_efficiency == cost.TF32_FLOP_EFFICIENCY_TMA[("fused", "ggn_diag")]
    monkeypatch.setattr(cost, "_tma_device", lambda: False)
    geometry = make_geometry(96, 96, (34, 34), 3)
    assert cost.tf32_flop_efficiency("ggn_diag", "fused", geometry, 2) == cost.TF32_FLOP_EFFICIENCY[("fused", "ggn_diag")]
    assert cost.tf32_flop_efficiency("ggn_diag", "native", geometry, 2) == sixteen[("native", "ggn_diag")]


def test_native_ggn_cost_counts_the_permuted_messages(monkeypatch):
    """The native GGN diagonal copies ``s`` sample-major before its batched product: on a layer with few
    weight columns and many locations (All-CNN-C's first layer, 10 columns of batch 128) that copy
    outweighs the product, so the fused kernel is the cheaper choice there (H100, fourteenth session:
    0.39 ms fused against ~0.7 ms native, 0.42 ms of it the copy)."""
    monkeypatch.setattr(cost, "_tma_device", lambda: True)
    first = make_geometry(3, 96, (34, 34), 3)  # D = 27, 32 x 32 locations
    native = cost.operation_cost("ggn_diag", "native", first, 128, 10, precision="tf32")
    fused = cost.operation_cost("ggn_diag", "fused", first, 128, 10, precision="tf32")
    messages = 10 * 128 * 96 * 32 * 32 * 4
    assert native.bytes_moved >= native.min_bytes + 2 * messages
    assert fused.estimated_time("cuda") < native.estimated_time("cuda")


def test_native_unfold_matches_torch_unfold(seed):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    expected = tf.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 0), stride=(2, 1))
    result = F.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 0), stride=(2, 1), pathway="native")
    assert torch.equal(result, expected)


def test_shortcut_of_repeated_calls_follows_settings(fresh_decisions, seed):
    """Repeated forward/VJP calls skip validation once resolved to native; a settings change ends that."""
    torch.manual_seed(seed)
    x, w, b = torch.randn(2, 3, 6, 5), torch.randn(4, 3, 3, 2), torch.randn(4)
    expected = tf.conv2d(x, w, b, padding=1)
    for _ in range(3):
        assert torch.allclose(F.conv(x, w, b, padding=1), expected, atol=1e-5)
    assert [d.choice for d in pathways.decisions()] == ["native"]
    with pathways.options(exclude=("native",)):
        assert torch.allclose(F.conv(x, w, b, padding=1), expected, atol=1e-5)
        assert pathways.decisions()[-1].choice != "native"
    v = torch.randn(2, 4, 6, 6)
    for _ in range(2):  # same shapes, other values: the shortcut computes with the new tensors
        v = torch.randn_like(v)
        assert torch.allclose(F.input_vjp(w, v, (6, 5), padding=1), torch.nn.grad.conv2d_input(x.shape, w, v, padding=1),
                              atol=1e-5)
        assert torch.allclose(F.weight_vjp(x, v, (3, 2), padding=1),
                              torch.nn.grad.conv2d_weight(x, w.shape, v, padding=1), atol=1e-5)
    with pytest.raises(ValueError, match="weight"):  # a new (invalid) configuration is validated
        F.conv(x, torch.randn(4, 2, 3, 2), padding=1)


@pytest.mark.parametrize("padding", [1, "same"])
def test_shortcut_of_transposed_and_asymmetric_layers(fresh_decisions, seed, padding):
    """The prepared ATen calls of repeated calls agree with torch for transposed layers and 'same' padding."""
    torch.manual_seed(seed)
    dt = torch.float64
    x, w, b = torch.randn(2, 4, 5, 6, dtype=dt), torch.randn(4, 3, 2, 3, dtype=dt), torch.randn(6, dtype=dt)
    for _ in range(3):
        x = torch.randn_like(x)
        if padding == 1:  # transposed layer: weight [C_in, C_out // G, *K], groups 2
            y = tf.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1, groups=2)
            assert torch.allclose(F.conv_transpose(x, w, b, stride=2, padding=1, output_padding=1, groups=2), y)
            v = torch.randn_like(y)
            kw = dict(stride=2, padding=1, output_padding=1, groups=2, transposed=True)
            xg = x.clone().requires_grad_()
            wg = w.clone().requires_grad_()
            gx, gw = torch.autograd.grad(tf.conv_transpose2d(xg, wg, None, 2, 1, 1, 2), (xg, wg), v)
            assert torch.allclose(F.input_vjp(w, v, (5, 6), **kw), gx)
            assert torch.allclose(F.weight_vjp(x, v, (2, 3), **kw), gw)
        else:  # 'same' with an even kernel: asymmetric padding
            wc = torch.randn(6, 4, 2, 3, dtype=dt)
            y = tf.conv2d(x, wc, b, padding="same")
            assert torch.allclose(F.conv(x, wc, b, padding="same"), y)
            v = torch.randn_like(y)
            xg, wg = x.clone().requires_grad_(), wc.clone().requires_grad_()
            gx, gw = torch.autograd.grad(tf.conv2d(xg, wg, None, padding="same"), (xg, wg), v)
            assert torch.allclose(F.input_vjp(wc, v, (5, 6), padding="same"), gx)
            assert torch.allclose(F.weight_vjp(x, v, (2, 3), padding="same"), gw)


def test_generation_follows_the_settings_values(fresh_decisions, monkeypatch, seed):
    """Settings restored or re-entered with the same values give the same generation (the engine enters
    options(memory_budget=...) every step: its shortcuts must survive); a new value or a clear changes it.
    A shortcut made in one options block is taken in the next with the same values."""
    from curvlib import native

    start = pathways.generation()
    with pathways.options(memory_budget=10**6):
        inside = pathways.generation()
    assert pathways.generation() == start and inside != start
    with pathways.options(memory_budget=10**6):
        assert pathways.generation() == inside
    with pathways.options(memory_budget=2 * 10**6):
        assert pathways.generation() not in (start, inside)
    pathways.clear()
    assert pathways.generation() != start
    checks = []
    original = native.supports
    monkeypatch.setattr(native, "supports", lambda *a, **k: checks.append(a[0]) or original(*a, **k))
    monkeypatch.setattr(F, "_SHORTCUTS", {})
    torch.manual_seed(seed)
    for _ in range(2):
        with pathways.options(memory_budget=10**9):
            x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
            patches = tf.unfold(x, 3, padding=1)
            expected = torch.einsum("ndl,nel->de", patches, patches) / 3
            assert torch.allclose(F.kfc(x, 3, padding=1)[0], expected, rtol=1e-10, atol=1e-12)
    assert len(checks) == 1, "the second block did not take the shortcut of the first"


def _ggn_diag_by_loops(x, s, weight_shape, per_sample, **hyper):
    """Σ_c (Σ_n) of squared per-(column, sample) weight gradients (torch.nn.grad), with the bias's diagonal."""
    weight, bias = [], []
    for n in range(x.shape[0]):
        grads = torch.stack([torch.nn.grad.conv2d_weight(x[n:n + 1], weight_shape, s[c, n:n + 1], **hyper)
                             for c in range(s.shape[0])])
        weight.append((grads ** 2).sum(0))
        bias.append((s[:, n].sum((2, 3)) ** 2).sum(0))
    weight, bias = torch.stack(weight), torch.stack(bias)
    return (weight, bias) if per_sample else (weight.sum(0), bias.sum(0))


@pytest.mark.parametrize("per_sample", [False, True], ids=["summed", "per-sample"])
@pytest.mark.parametrize("precision", [None, "ieee"], ids=["no-precision", "precision"])
def test_shortcut_of_repeated_ggn_diagonals(fresh_decisions, monkeypatch, seed, per_sample, precision):
    """Repeated GGN diagonals with and without the bias's take the shortcut (without a precision setting:
    a precision is passed to cuBLAS only by the dispatch) and compute with the new tensors: against
    squared per-(column, sample) weight gradients from torch.nn.grad, in float64."""
    monkeypatch.setattr(F, "_SHORTCUTS", {})
    torch.manual_seed(seed)
    hyper = dict(stride=2, padding=1, dilation=1)
    with pathways.options(precision=precision):
        for _ in range(3):
            x = torch.randn(3, 4, 7, 6, dtype=torch.float64)
            s = torch.randn(5, 3, 6, 4, 4, dtype=torch.float64)
            weight, bias = _ggn_diag_by_loops(x, s, (6, 4, 3, 2), per_sample, **hyper)
            got = F.ggn_diag(x, s, (3, 2), per_sample=per_sample, **hyper)
            torch.testing.assert_close(got, weight)
            got_weight, got_bias = F.ggn_diag(x, s, (3, 2), per_sample=per_sample, bias=True, **hyper)
            torch.testing.assert_close(got_weight, weight)
            torch.testing.assert_close(got_bias, bias)
        keys = [key for key in F._SHORTCUTS if key[0] == "ggn_diag"]
        assert len(keys) == (2 if precision is None else 0)  # with and without the bias
        if precision is None:  # a channels-last s is another configuration (the choice depends on the layout)
            s_cl = s.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, s.shape[:2])
            torch.testing.assert_close(F.ggn_diag(x, s_cl, (3, 2), per_sample=per_sample, **hyper), weight)
            assert len([key for key in F._SHORTCUTS if key[0] == "ggn_diag"]) == 3
    with pytest.raises(ValueError):  # a new (invalid) configuration is validated
        F.ggn_diag(x, torch.randn(5, 3, 6, 9, 9, dtype=torch.float64), (3, 2), **hyper)


def test_ggn_diag_result_dtype(fresh_decisions, monkeypatch, seed):
    """``dtype=`` gives the result (weight and bias) in that dtype on the first call and on the shortcut of
    repeated calls, with the values of the computation in the operands' dtype; calls without it keep
    their own shortcut; a dtype that is not one raises a TypeError naming the argument."""
    monkeypatch.setattr(F, "_SHORTCUTS", {})
    torch.manual_seed(seed)
    hyper = dict(stride=2, padding=1)
    for _ in range(2):
        x, s = torch.randn(3, 4, 7, 6), torch.randn(5, 3, 6, 4, 4)
        weight, bias = _ggn_diag_by_loops(x.double(), s.double(), (6, 4, 3, 2), False, **hyper)
        got_weight, got_bias = F.ggn_diag(x, s, (3, 2), bias=True, dtype=torch.float64, **hyper)
        assert got_weight.dtype == got_bias.dtype == torch.float64
        torch.testing.assert_close(got_weight, weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_bias, bias, rtol=1e-5, atol=1e-6)
        plain = F.ggn_diag(x, s, (3, 2), **hyper)
        assert plain.dtype == torch.float32
        torch.testing.assert_close(plain, got_weight.float())
    assert len([key for key in F._SHORTCUTS if key[0] == "ggn_diag"]) == 2
    with pytest.raises(TypeError, match="dtype"):
        F.ggn_diag(x, s, (3, 2), dtype="float64", **hyper)


def test_prepared_ggn_diag_falls_back_without_kernels(seed):
    """``kernels.prepare_ggn_diag`` on the CPU: the fallback (tensor network) as a function of new
    operands, with the bias's diagonal and the result dtype, against torch.nn.grad loops in float64; bad
    arguments are rejected when preparing."""
    from curvlib import kernels

    torch.manual_seed(seed)
    geometry = make_geometry(4, 6, (7, 6), (3, 2), stride=2, padding=1)
    run = kernels.prepare_ggn_diag(torch.randn(3, 4, 7, 6), torch.randn(5, 3, 6, 4, 4), geometry, bias=True,
                                   per_sample=True, dtype=torch.float64)
    for _ in range(2):
        x, s = torch.randn(3, 4, 7, 6), torch.randn(5, 3, 6, 4, 4)
        weight, bias = _ggn_diag_by_loops(x.double(), s.double(), (6, 4, 3, 2), True, stride=2, padding=1)
        got_weight, got_bias = run(x, s)
        assert got_weight.dtype == got_bias.dtype == torch.float64
        torch.testing.assert_close(got_weight, weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_bias, bias, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="s"):
        kernels.prepare_ggn_diag(x, torch.randn(5, 3, 6, 5, 4), geometry)
    with pytest.raises(TypeError, match="dtype"):
        kernels.prepare_ggn_diag(x, s, geometry, dtype=64)


@pytest.mark.parametrize("chunk_bytes", [1, 3000, None])
def test_native_ggn_chunks_give_identical_results(seed, chunk_bytes):
    """Chunks of single channels, of several channels and whole groups (and the budget-derived default)."""
    from curvlib import native

    torch.manual_seed(seed)
    dt = torch.float64
    x, s = torch.randn(3, 4, 6, 5, dtype=dt), torch.randn(2, 3, 6, 3, 4, dtype=dt)
    g = make_geometry(4, 6, (6, 5), (3, 2), stride=(2, 1), padding=(1, 0), groups=2)
    with pathways.options(memory_budget=None if chunk_bytes else 6000):
        diag = native.ggn_diag(x, s, g, chunk_bytes=chunk_bytes)
        per_sample = native.ggn_diag(x, s, g, per_sample=True, chunk_bytes=chunk_bytes)
        gram = native.ggn_gram(x, s, g, chunk_bytes=chunk_bytes)
    kw = dict(stride=(2, 1), padding=(1, 0), groups=2, pathway="tn", simplify=False)
    assert torch.allclose(diag, F.ggn_diag(x, s, (3, 2), **kw))
    assert torch.allclose(per_sample, F.ggn_diag(x, s, (3, 2), per_sample=True, **kw))
    assert torch.allclose(gram, F.ggn_gram(x, s, (3, 2), **kw))


@pytest.mark.parametrize(
    "shape, hyper",
    [
        ((3, 4, 9, 8), dict(kernel_size=3, padding=1)),
        ((2, 6, 11), dict(kernel_size=5, padding=3, dilation=2, groups=3)),
        ((2, 4, 5, 6, 4), dict(kernel_size=(3, 1, 2), padding="same", groups=4)),
    ],
)
def test_lags_pathway_computes_the_kfc_of_stride_one_layers(shape, hyper):
    """``pathway="lags"`` (lag products + border corrections) against the tensor network as built."""
    x = torch.randn(shape, dtype=torch.float64)
    expected = F.kfc(x, pathway="tn", simplify=False, **hyper)
    torch.testing.assert_close(F.kfc(x, pathway="lags", **hyper), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("call", [
    lambda x: F.kfc(x, 3, stride=2, pathway="lags"),                   # stride 2: no lag structure
    lambda x: F.kfc(x, 3, transposed=True, pathway="lags"),            # transposed layer
    lambda x: F.kfac_reduce(x, 3, pathway="lags"),                     # lags only compute the KFC
])
def test_lags_pathway_where_it_does_not_apply_names_the_alternatives(call):
    with pytest.raises(ValueError, match=r"pathway='lags' is not available .*available here"):
        call(torch.randn(2, 4, 7, 7))


@pytest.mark.parametrize("rows,blocks", [(600, 4), (513, 3), (1000, 2), (700, 1), (520, 8), (30, 4)])
def test_native_gram_by_blocks_equals_the_product(rows, blocks, seed):
    """native.gram: the upper triangle of blocks, mirrored, equals u uᵀ (every entry written: NaN-free)."""
    from curvlib import native

    u = torch.randn(2, rows, 37, dtype=torch.float64)
    result = native.gram(u, blocks)
    assert not result.isnan().any()
    torch.testing.assert_close(result, torch.einsum("gdm,gem->gde", u, u))
    # the default takes the blocks from GRAM_BLOCK_MIN_ROWS rows on and one product below
    torch.testing.assert_close(native.gram(u), u @ u.transpose(1, 2))


def _kfc_by_torch_unfold(x, kernel_size, stride, padding, dilation, groups):
    """Reference KFC of a 2-d layer (float64): ``torch.nn.functional.unfold``, per group ``1/N Σ u uᵀ``."""
    n, c = x.shape[:2]
    u = tf.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # [N, C·K, O]
    u = u.view(n, groups, -1, u.shape[-1])
    return torch.einsum("ngdo,ngeo->gde", u, u) / n


@pytest.mark.parametrize("shape, hyper, samples", [
    ((7, 3, 12, 10), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=1, groups=1), 3),
    ((5, 6, 9, 9), dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(2, 1), groups=3), 2),
    ((4, 8, 1, 17), dict(kernel_size=(1, 5), stride=(1, 3), padding=(0, 2), dilation=1, groups=2), 1),
    ((3, 4, 8, 8), dict(kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=1, groups=1), 5),
])
def test_native_kfc_in_chunks_of_samples_equals_the_unfold_gram(shape, hyper, samples, seed):
    """native.kfc with ``chunk_bytes`` (the samples in chunks, products added, uneven last chunk) and
    unfold_columns against torch.nn.functional.unfold, float64; NaN-free (every entry written)."""
    from curvlib import native
    from curvlib.hyperparams import make_geometry

    x = torch.randn(shape, dtype=torch.float64)
    geometry = make_geometry(shape[1], 2 * hyper["groups"], shape[2:], **hyper)
    expected = _kfc_by_torch_unfold(x, **hyper)
    per_sample = native.unfolded_bytes(geometry, 1, x.element_size())
    for chunk_bytes in (samples * per_sample, samples * per_sample + per_sample // 2, 1, None):
        result = native.kfc(x, geometry, chunk_bytes=chunk_bytes)
        assert not result.isnan().any()
        torch.testing.assert_close(result, expected)
    u = tf.unfold(x, hyper["kernel_size"], dilation=hyper["dilation"], padding=hyper["padding"], stride=hyper["stride"])
    columns = u.view(shape[0], hyper["groups"], -1, u.shape[-1]).permute(1, 2, 0, 3).flatten(2)
    assert torch.equal(native.unfold_columns(x, geometry), columns)


def test_native_gram_upper_accumulates_into_the_upper_blocks(seed):
    """gram_upper(accumulate=True) adds the upper blocks of u uᵀ; mirror_upper then fills the lower ones."""
    from curvlib import native

    u, v = torch.randn(2, 2, 700, 19, dtype=torch.float64)
    out = torch.full((2, 700, 700), float("nan"), dtype=torch.float64)
    native.gram_upper(u, out, blocks=3)
    native.gram_upper(v, out, blocks=3, accumulate=True)
    native.mirror_upper(out, blocks=3)
    assert not out.isnan().any()
    torch.testing.assert_close(out, u @ u.transpose(1, 2) + v @ v.transpose(1, 2))


@pytest.mark.parametrize("precision", [None, "ieee"], ids=["shortcut", "cached-choice"])
def test_cached_choice_runs_without_the_availability_checks(fresh_decisions, monkeypatch, seed, precision):
    """A configuration seen before runs its automatic choice directly: the candidates' checks ran on the
    first call only, and the result is the one of new values (compared with a float64 unfold). Without a
    precision setting the call takes the shortcut of repeated calls; with one, the cached choice."""
    from curvlib import native

    checks = []
    original = native.supports
    monkeypatch.setattr(native, "supports", lambda *a, **k: checks.append(a[0]) or original(*a, **k))
    monkeypatch.setattr(F, "_SHORTCUTS", {})
    torch.manual_seed(seed)
    with pathways.options(precision=precision):
        _repeated_kfc_calls(checks, precision)


def _repeated_kfc_calls(checks, precision):
    for repeat in range(3):
        x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
        patches = tf.unfold(x, 3, padding=1)
        expected = torch.einsum("ndl,nel->de", patches, patches) / 3
        assert torch.allclose(F.kfc(x, 3, padding=1)[0], expected, rtol=1e-10, atol=1e-12)
        assert len(checks) == 1, f"call {repeat}: the checks ran {len(checks)} times"
    assert bool(F._SHORTCUTS) == (precision is None)
    with pytest.raises(ValueError, match="x must have at least 3 dimensions"):  # a new configuration: validated
        F.kfc(torch.randn(3, 4, dtype=torch.float64), 3, padding=1)
    with pathways.options(exclude=("native",)):  # new settings: a new choice among the available candidates
        F.kfc(torch.randn(3, 4, 9, 8, dtype=torch.float64), 3, padding=1)
    assert len(checks) == 2


def test_fused_ggn_cost_counts_padded_rows_and_unfolded_reads(monkeypatch):
    """The fused GGN diagonal computes whole tiles of (column, channel) rows and reads the unfolded input once
    per channel block after writing it: with 4 columns of a 96-channel layer (All-CNN-C conv2) its traffic,
    not its products, sets the price, and the native pathway wins, as measured on an H100; with 100 columns
    and 64 channels no row is padded."""
    conv2 = make_geometry(96, 96, (34, 34), 3)
    unfolded = 128 * 864 * 1024 * 4
    assert cost._ggn_tile_rows(4, 96) == (4 * 96, 3)
    assert cost._ggn_tile_rows(10, 96) == (12 * 96, 3)  # 4 columns per block: 12 rows per channel
    assert cost._ggn_tile_rows(100, 64) == (100 * 64, 2)
    assert cost._ggn_tile_rows(3, 5) == (4 * 8, 1)  # 8 channels (a power of two) by 4 columns: 16 rows at least
    few = cost.operation_cost("ggn_diag", "fused", conv2, 128, 4)
    flops, min_bytes = cost.minimum("ggn_diag", conv2, 128, 4)
    assert few.flops == flops and few.bytes_moved == min_bytes + 4 * unfolded
    assert few.extra_bytes < unfolded / 4  # one chunk of samples
    ten = cost.operation_cost("ggn_diag", "fused", conv2, 128, 10)
    assert ten.flops == cost.minimum("ggn_diag", conv2, 128, 10)[0] * 12 / 10
    with_tma = lambda c: cost.operation_cost("ggn_diag", "fused", conv2, 128, c, precision="tf32")  # noqa: E731
    native = lambda c: cost.operation_cost("ggn_diag", "native", conv2, 128, c, precision="tf32")  # noqa: E731
    monkeypatch.setattr(cost, "_tma_device", lambda: True)
    assert native(4).estimated_time("cuda") < with_tma(4).estimated_time("cuda")
