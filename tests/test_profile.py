"""curvlib.profile: ceilings, memory and time meters, per-layer profile of a model, reports.

References are independent: FLOP counts written out from the layer shapes, allocations of known
size, a copy and a matrix product timed here with ``perf_counter``, hand-made rows for the hot-layer
ordering.
"""

import json
import math
import statistics
import time

import pytest
import torch
from torch import nn

import curvlib.pathways as pathways
from curvlib import cost
from curvlib.profile import (
    Profile,
    ProfileRow,
    ideal_time,
    measure_ceilings,
    measure_memory,
    profile_model,
    record_layers,
    time_call,
)
from curvlib.profile import memory as memory_module
from curvlib.profile import operations as operations_module

MIB = 2**20
CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------
# ceilings


def _median_time(fn, repeats=7):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_ceilings_positive_and_consistent_with_timed_copy_and_matmul(seed):
    # an independent copy of the same size and a product, timed here: bandwidth and rate within a factor
    # of 3. Shared cores are noisy (other test workers): up to 3 attempts, each measuring both anew
    src = torch.randn(32 * MIB // 4)
    dst = torch.empty_like(src)
    a, b = torch.randn(384, 384), torch.randn(384, 384)
    for _ in range(3):
        c = measure_ceilings("cpu", quick=True, refresh=True)
        assert c.measured and c.flops_per_s > 0 and c.bytes_per_s > 0 and c.call_overhead_s > 0
        assert c.tf32_flops_per_s is None  # no TF32 matrix units
        bandwidth = 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src))
        rate = 2 * 384**3 / _median_time(lambda: a @ b)
        if 1 / 3 < c.bytes_per_s / bandwidth < 3 and 1 / 3 < c.flops_per_s / rate < 3:
            break
    assert 1 / 3 < c.bytes_per_s / bandwidth < 3, (c.bytes_per_s, bandwidth)
    assert 1 / 3 < c.flops_per_s / rate < 3, (c.flops_per_s, rate)
    # cached per device and sizes; the roofline
    assert measure_ceilings("cpu", quick=True) is c
    flops, nbytes = torch.randint(1, 10**9, (2,)).tolist()
    assert ideal_time(flops, nbytes, c) == max(flops / c.flops_per_s, nbytes / c.bytes_per_s)


def test_ceilings_register_and_errors():
    saved = cost.ceilings("cpu")
    try:
        c = measure_ceilings("cpu", quick=True, register=True)
        assert cost.ceilings("cpu") is c
    finally:
        cost.set_ceilings("cpu", saved)
    with pytest.raises(ValueError, match="repeats"):
        measure_ceilings("cpu", quick=True, repeats=0)
    with pytest.raises(TypeError, match="dtype"):
        measure_ceilings("cpu", dtype=torch.int32)
    with pytest.raises(TypeError, match="ceilings"):
        ideal_time(1.0, 1.0, (1.0, 1.0))


# ----------------------------------------------------------------------------------------------
# memory and time meters


def test_memory_detects_known_allocation_on_cpu(seed):
    if memory_module.cpu_method() != "rss":
        pytest.skip("peak RSS cannot be read and reset here (/proc/self/clear_refs missing or not writable)")
    size_mib = int(torch.randint(48, 96, ()).item())
    numel = size_mib * MIB // 4
    # a temporary of size_mib MiB: the whole of it is extra memory (the scalar result is nothing)
    m = measure_memory(lambda: torch.randn(numel).sum())
    assert m.method == "rss" and m.exact
    assert abs(m.extra_bytes - size_mib * MIB) < 3 * MIB, (m.extra_bytes / MIB, size_mib)
    # the same tensor returned is the result, not extra memory
    m, result = measure_memory(lambda: torch.randn(numel), keep_result=True)
    assert result.numel() == numel and m.result_bytes == numel * 4
    assert m.extra_bytes < 3 * MIB, m.extra_bytes / MIB


def test_memory_bounds_without_reset_or_proc(monkeypatch, seed):
    numel = int(torch.randint(40, 60, ()).item()) * MIB // 4
    if memory_module._read_status() is not None:
        # /proc readable but the peak not resettable: VmHWM after − VmRSS before, an upper bound
        monkeypatch.setattr(memory_module, "_reset_peak", lambda: False)
        m = measure_memory(lambda: torch.randn(numel).sum())
        assert m.method == "rss-upper" and not m.exact
        assert m.extra_bytes >= numel * 4 - 3 * MIB
        monkeypatch.undo()
    monkeypatch.setattr(memory_module, "_read_status", lambda: None)
    m = measure_memory(lambda: torch.randn(numel).sum())
    assert m.method == "rusage-lower" and not m.exact and m.extra_bytes >= 0
    with pytest.raises(TypeError, match="fn must be callable"):
        measure_memory(42)
    with pytest.raises(ValueError, match="device"):
        measure_memory(lambda: None, device="no-such-device")


def test_time_call_counts_calls_and_measures_sleep():
    calls = []
    t = time_call(lambda: (calls.append(1), time.sleep(0.002)), repeats=3, warmup=2)
    assert len(calls) == 5 and t.repeats == 3 and t.warmup == 2 and len(t.times_s) == 3
    assert 0.002 <= t.min_s <= t.median_s < 1.0
    # a time limit well below one call: a single timed call
    t = time_call(lambda: time.sleep(0.003), repeats=10, warmup=0, time_limit_s=0.001)
    assert t.repeats == 1
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)
    with pytest.raises(TypeError, match="repeats"):
        time_call(lambda: None, repeats=2.0)
    with pytest.raises(ValueError, match="warmup"):
        time_call(lambda: None, warmup=-1)
    with pytest.raises(ValueError, match="time_limit_s"):
        time_call(lambda: None, time_limit_s=0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_meters(seed):
    device = torch.device("cuda")
    size_mib = int(torch.randint(32, 96, ()).item())
    m = measure_memory(lambda: torch.randn(size_mib * MIB // 4, device=device).sum(), device)
    # the caching allocator rounds large blocks up to multiples of 2 MiB
    assert m.method == "cuda" and 0 <= m.extra_bytes - size_mib * MIB < 2 * MIB + 1024, (m.extra_bytes, size_mib)
    t = time_call(lambda: torch.randn(2048, 2048, device=device).square_(), device, repeats=3, warmup=1)
    assert t.median_s > 0
    c = measure_ceilings(device, quick=True)
    assert c.flops_per_s > 1e11 and c.bytes_per_s > 1e10
    if torch.cuda.get_device_capability(device)[0] >= 8:  # TF32 matrix units: faster than float32 FMA
        assert c.tf32_flops_per_s > c.flops_per_s


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_profile_memory_and_time(seed):
    """On the GPU: events time every entry; native kfc's extra memory holds the unfolded chunk of samples it
    materialises (:func:`curvlib.native.kfc_chunk_bytes`), and its largest intermediate is the cost model's."""
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4))
    x = torch.randn(16, 8, 32, 32)
    profile = profile_model(model, x, operations=("forward", "kfc", "ggn_diag"), pathways=("auto", "native"),
                            device="cuda", repeats=3, warmup=1, ceilings="quick")
    assert profile.device.startswith("cuda") and profile.settings["memory_method"] == "cuda"
    assert all(r.status == "ok" and r.time_s > 0 and r.memory_method == "cuda" for r in profile.rows)
    kfc = next(r for r in profile.rows if (r.layer, r.op, r.pathway) == ("0", "kfc", "native"))
    from curvlib.hyperparams import make_geometry
    from curvlib.native import kfc_chunk_bytes

    geometry = make_geometry(8, 16, (32, 32), 3, padding=1)
    per_sample = 8 * 9 * 32 * 32 * 4  # [C_in·K·K, O] float32
    samples = max(1, int(kfc_chunk_bytes(geometry, 16, 4) // per_sample))
    assert kfc.extra_bytes >= samples * per_sample
    assert kfc.largest_intermediate_bytes == cost.operation_cost("kfc", "native", geometry, 16).largest_intermediate_bytes


# ----------------------------------------------------------------------------------------------
# a tiny CNN with every kind of layer


class TinyNet(nn.Module):
    """Conv2d, grouped Conv2d, ConvTranspose2d, Conv3d and Conv1d, Linear on [N, T, D]."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.grouped = nn.Conv2d(c, 2 * c, 3, stride=2, groups=2)
        self.up = nn.ConvTranspose2d(2 * c, c, 3, stride=2, output_padding=1, groups=2)
        self.conv3d = nn.Conv3d(1, 2, (2, 3, 3), padding=(0, 1, 0))
        self.conv1d = nn.Conv1d(c, 3, 3, dilation=2)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x))  # [N, c, 8, 8]
        y = self.grouped(y)  # [N, 2c, 3, 3]
        y = self.up(y)  # [N, c, 8, 8]
        z = self.conv3d(y[:, None, :2])  # [N, 2, 1, 8, 6]
        t = self.conv1d(y.flatten(2)[:, :, :12] + z.flatten(2).mean())  # [N, 3, 8]
        return self.fc(t.transpose(1, 2))  # Linear on [N, 8, 3]


def _flop_counts(n, c, columns):
    """Independent FLOP counts (a multiply-add is 2) of forward, kfc and ggn_diag per layer."""
    out = {}

    def conv(name, c_in, c_out, groups, kernel, out_size):
        d = c_in // groups * math.prod(kernel)
        forward = 2 * n * c_out * math.prod(out_size) * d
        out[name] = dict(
            forward=forward,
            kfc=2 * n * math.prod(out_size) * groups * d * d,
            ggn_diag=columns * forward + 2 * columns * n * c_out * d,
        )

    conv("conv", 3, c, 1, (3, 3), (8, 8))
    conv("grouped", c, 2 * c, 2, (3, 3), (3, 3))
    conv("conv3d", 1, 2, 1, (2, 3, 3), (1, 8, 6))
    conv("conv1d", c, 3, 1, (3,), (8,))
    conv("fc", 3, 5, 1, (1,), (8,))  # Linear on [N, T=8, 3]: point-wise conv over T
    # ConvTranspose2d(2c → c, groups 2) on a 3×3 input: every input pixel meets every kernel entry
    out["up"] = dict(forward=2 * n * (2 * c) * 9 * (c // 2) * 9)
    return out


SHAPES = dict(conv=(3, 8, 8), grouped=(4, 8, 8), up=(8, 3, 3), conv3d=(1, 2, 8, 8), conv1d=(4, 12), fc=(8, 3))
#: weight-side operations without a native implementation on transposed layers (they need the unfolded input)
NATIVE_NOT_TRANSPOSED = {"kfc", "kfac_reduce", "ggn_diag", "ggn_gram", "hesscale_weight_diag"}
PATHWAYS = ("auto", "native", "tn+simplify", "fused")


@pytest.fixture(scope="module")
def tiny_profile():
    torch.manual_seed(0)  # the model only; the profile's random tensors are drawn fresh inside
    model = TinyNet()
    n = 3
    x = torch.randn(n, 3, 8, 8)
    ceilings = cost.Ceilings(flops_per_s=3.0e10, bytes_per_s=7.0e9)
    with pathways.options(autotune=False):
        profile = profile_model(model, x, pathways=PATHWAYS, columns=2, repeats=2, warmup=1, ceilings=ceilings)
    return profile, n, ceilings


def test_profile_rows_statuses_and_shapes(tiny_profile):
    profile, n, _ = tiny_profile
    ops = operations_module.DEFAULT_OPERATIONS
    assert profile.layers() == ["conv", "grouped", "up", "conv3d", "conv1d", "fc"]
    keys = [(r.layer, r.op, r.pathway) for r in profile.rows]
    assert len(keys) == len(set(keys)) == 6 * len(ops) * len(PATHWAYS)
    rows = dict(zip(keys, profile.rows))
    for r in profile.rows:
        assert tuple(r.input_shape) == (n, *SHAPES[r.layer]), r
        if r.pathway == "fused":  # Triton kernels: CUDA only
            expected = "ok" if CUDA and r.status == "ok" else "n/a"
        elif r.pathway == "native" and r.layer == "up" and r.op in NATIVE_NOT_TRANSPOSED:
            expected = "n/a"
        else:
            expected = "ok"
        assert r.status == expected, r
        if r.status == "n/a":
            assert "not available" in r.message and r.time_s is None
            continue
        assert r.time_s > 0 and 0 < r.min_s <= r.time_s and r.repeats == 2
        assert r.extra_bytes >= 0 and r.memory_method in ("rss", "rss-upper", "rusage-lower", "cuda")
        assert r.flops > 0 and r.min_bytes > 0 and r.pathway_flops > 0
        if r.pathway == "auto":  # a real candidate, and one that applies where it was profiled too
            assert r.chosen in pathways.CANDIDATES, r
            if r.chosen in PATHWAYS:
                assert rows[(r.layer, r.op, r.chosen)].status == "ok", r
        else:
            assert r.chosen == r.pathway


def test_profile_flops_match_independent_counts(tiny_profile):
    profile, n, ceilings = tiny_profile
    counts = _flop_counts(n, 4, columns=2)
    rows = {(r.layer, r.op, r.pathway): r for r in profile.rows}
    compared = 0
    for layer, ops in counts.items():
        for op, flops in ops.items():
            for pathway in ("auto", "native", "tn+simplify"):
                r = rows[(layer, op, pathway)]
                assert r.status == "ok" and r.flops == flops, (layer, op, pathway, r.flops, flops)
                compared += 1
    assert compared == (5 * 3 + 1) * 3
    # native kfc unfolds [C_in·∏K, ∏O] per sample in chunks of a quarter of the samples (of 3: one), each
    # cut from the zero-padded input (10x10): its largest intermediate
    r = rows[("conv", "kfc", "native")]
    assert n == 3 and r.largest_intermediate_bytes == (3 * 9 * 64 + 3 * 10 * 10) * 4
    # the roofline and the derived rates
    for r in profile.rows:
        if r.status != "ok":
            continue
        ideal = max(r.flops / ceilings.flops_per_s, r.min_bytes / ceilings.bytes_per_s)
        assert r.ideal_s == pytest.approx(ideal, rel=1e-12)
        assert r.efficiency == pytest.approx(ideal / r.time_s, rel=1e-12)
        own = max(r.pathway_flops / ceilings.flops_per_s, r.min_bytes / ceilings.bytes_per_s)
        assert r.pathway_efficiency == pytest.approx(own / r.time_s, rel=1e-12)
        assert r.flops_per_s == pytest.approx(r.flops / r.time_s, rel=1e-12)
        assert r.bytes_per_s == pytest.approx(r.min_bytes / r.time_s, rel=1e-12)


def test_profile_plan_costs_for_tensor_networks(seed):
    """TN rows take FLOPs and the largest intermediate from the contraction actually planned."""
    from curvlib import functional as F
    from curvlib.contract import inspect_plans

    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2))
    x = torch.randn(2, 2, 9, 9)
    profile = profile_model(model, x, operations=("kfc", "ggn_diag"), pathways=("tn", "unfold"), columns=3,
                            repeats=1, warmup=0, ceilings="nominal", memory=False)
    s = torch.randn(3, 2, 3, 4, 4)
    for r in profile.rows:
        simplify = r.pathway != "tn"
        with inspect_plans() as plans:
            if r.op == "kfc":
                F.kfc(x, 3, stride=2, pathway="tn" if r.pathway == "tn" else "unfold", simplify=simplify)
            else:
                F.ggn_diag(x, s, 3, stride=2, pathway="tn" if r.pathway == "tn" else "unfold", simplify=simplify)
        assert r.status == "ok" and r.extra_bytes is None
        assert r.pathway_flops == sum(p.flops for p in plans)
        assert r.largest_intermediate_bytes == max(p.largest_intermediate for p in plans) * 4


def test_auto_choice_is_recorded(seed):
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 25, 4))
    x = torch.randn(2, 2, 7, 7)
    others = tuple(c for c in pathways.CANDIDATES if c != "tn+simplify")
    with pathways.options(exclude=others):  # a single candidate left: auto must run it
        profile = profile_model(model, x, operations=("forward", "kfc"), pathways=("auto",), repeats=1,
                                warmup=1, ceilings="nominal", memory=False)
    assert {r.chosen for r in profile.rows} == {"tn+simplify"}
    with pathways.options(exclude=tuple(c for c in pathways.CANDIDATES if c != "native")):
        first = profile_model(model, x, operations=("forward", "kfc"), pathways=("auto",), repeats=1, warmup=1,
                              ceilings="nominal", memory=False)
        # the decisions are cached now: the second profile finds them among the earlier ones
        second = profile_model(model, x, operations=("forward", "kfc"), pathways=("auto",), repeats=1, warmup=0,
                               ceilings="nominal", memory=False)
    assert {r.chosen for r in first.rows} == {r.chosen for r in second.rows} == {"native"}


def test_failures_become_rows(monkeypatch, seed):
    def out_of_memory(record, tensors, kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 1 TiB")

    def broken(record, tensors, kwargs):
        raise ValueError("something else went wrong")

    monkeypatch.setitem(operations_module.OPERATIONS, "kfc", operations_module.Operation("kfc", (), False, out_of_memory))
    monkeypatch.setitem(operations_module.OPERATIONS, "kfac_reduce",
                        operations_module.Operation("kfac_reduce", (), False, broken))
    finished = []
    profile = profile_model(nn.Conv1d(2, 2, 3), torch.randn(2, 2, 6), operations=("kfc", "kfac_reduce", "forward"),
                            pathways=("native",), repeats=1, warmup=0, ceilings="nominal", memory=False,
                            progress=finished.append)
    assert finished == profile.rows
    status = {r.op: r.status for r in profile.rows}
    assert status == {"kfc": "oom", "kfac_reduce": "error", "forward": "ok"}
    assert "out of memory" in profile.rows[0].message and "went wrong" in profile.rows[1].message


# ----------------------------------------------------------------------------------------------
# layer recording


def test_record_layers_linear_repeated_transposed_and_buffers(seed):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)
            self.up = nn.ConvTranspose1d(4, 2, 3, stride=2)
            self.reflect = nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect")

        def forward(self, x):  # x [N, T, 4]
            y = self.fc(self.fc(x))  # called twice
            y = self.bn(y.transpose(1, 2))
            y = self.up(y, output_size=[2 * y.shape[-1] + 2])  # output_size= sets the effective output padding
            return self.reflect(y)

    net = Net().train()
    x = torch.randn(3, 5, 4)
    running = net.bn.running_mean.clone()
    skipped = []
    records = record_layers(net, x, skipped=skipped)
    assert [r.name for r in records] == ["fc", "fc#2", "up"]
    assert tuple(records[0].x.shape) == (3, 4, 5) and records[0].out_shape == (3, 4, 5)
    assert tuple(records[0].weight.shape) == (4, 4, 1)
    up = records[2]
    assert up.kind == "conv_transpose" and up.output_padding == (1,) and up.out_shape == (3, 2, 12)
    assert skipped == [("reflect", "padding_mode='reflect' (only 'zeros' is supported)")]
    assert torch.equal(net.bn.running_mean, running), "recording changed BatchNorm running statistics"
    assert record_layers(net, x, layers=["up"])[0].name == "up"
    # the transposed layer with its effective output padding profiles on the TN pathway
    profile = profile_model(net, x, operations=("kfc", "forward"), pathways=("tn+simplify",), layers=["up"],
                            repeats=1, warmup=0, ceilings="nominal", memory=False)
    assert [r.status for r in profile.rows] == ["ok", "ok"] and profile.skipped == []


# ----------------------------------------------------------------------------------------------
# reports


def _row(layer, op, t, mem, pathway="auto", module="Conv2d"):
    return ProfileRow(layer=layer, module=module, op=op, function=op, pathway=pathway, chosen="native",
                      time_s=t, min_s=t, repeats=1, extra_bytes=mem, flops=1e6, min_bytes=1e3)


def test_hot_layers_ordering_and_shares(seed):
    times = torch.rand(4).add(0.1).tolist()
    mems = torch.rand(4).mul(MIB).add(1).tolist()
    rows = [_row("a", "kfc", times[0], mems[0]), _row("a", "ggn_diag", times[1], mems[1]),
            _row("b", "kfc", times[2], mems[2]), _row("b", "ggn_diag", times[3], mems[3]),
            _row("b", "kfc", 1e-9, 0.0, pathway="native"),
            ProfileRow(layer="b", module="Conv2d", op="ggn_gram", function="ggn_gram", pathway="auto", status="n/a")]
    profile = Profile(rows, "cpu", {"flops_per_s": 1.0, "bytes_per_s": 1.0})
    hot = profile.hot_layers(k=None)
    expected = sorted(zip(times, ["a", "a", "b", "b"], ["kfc", "ggn_diag", "kfc", "ggn_diag"]), reverse=True)
    assert [(h.layer, h.op) for h in hot] == [(layer, op) for _, layer, op in expected]
    assert sum(h.time_share for h in hot) == pytest.approx(1.0)
    assert hot[0].time_share == pytest.approx(expected[0][0] / sum(times))
    by_memory = profile.hot_layers(k=2, by="memory")
    assert [h.extra_bytes for h in by_memory] == sorted(mems, reverse=True)[:2]
    per_layer = profile.hot_layers(per="layer", k=None)
    totals = {"a": times[0] + times[1], "b": times[2] + times[3]}
    assert [h.layer for h in per_layer] == sorted(totals, key=totals.get, reverse=True)
    layer_b = next(h for h in per_layer if h.layer == "b")
    assert layer_b.op is None and layer_b.time_s == pytest.approx(totals["b"]) and layer_b.extra_bytes == max(mems[2:])
    # "best": the fastest pathway of each (layer, operation)
    best = {(h.layer, h.op): h for h in profile.hot_layers(k=None, pathway="best")}
    assert best[("b", "kfc")].time_s == 1e-9
    with pytest.raises(ValueError, match="by"):
        profile.hot_layers(by="speed")
    with pytest.raises(ValueError, match="per"):
        profile.hot_layers(per="module")
    with pytest.raises(ValueError, match="k"):
        profile.hot_layers(k=0)
    with pytest.raises(ValueError, match="pathway"):
        profile.table(pathway="tn")


def test_dominant_layer_is_hottest(seed):
    """A layer with ~90× the work of the others (forward, weight VJP and KFC together) tops the per-layer
    time ranking: 92 MFLOP against 0.2 (layer 0) and 1 (layer 2: 1×1, stride 4, 8x8 outputs) — a margin
    wide enough for a CPU shared with other test workers."""
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 32, 5, padding=2), nn.Conv2d(32, 2, 1, stride=4))
    x = torch.randn(8, 2, 32, 32)
    profile = profile_model(model, x, operations=("forward", "weight_vjp", "kfc"), pathways=("native",), repeats=3,
                            warmup=1, ceilings="nominal", memory=False)
    assert profile.hot_layers(1, pathway="native", per="layer")[0].layer == "1"
    # without "auto" the reports default to the fastest pathway of each entry
    assert profile.resolve_pathway() == "best" and profile.hot_layers(1, per="layer")[0].layer == "1"
    assert "pathway 'best'" in profile.summary()


def test_table_json_plot(tiny_profile, tmp_path):
    profile, _, _ = tiny_profile
    table = profile.table(k=8)
    lines = table.splitlines()
    assert lines[0].startswith("| layer | module | op | ran | time [ms]") and len(lines) == 2 + 8
    times = [float(line.split("|")[5]) for line in lines[2:]]
    assert times == sorted(times, reverse=True)
    full = profile.table()
    assert len(full.splitlines()) == 2 + 6 * len(operations_module.DEFAULT_OPERATIONS)
    compare = profile.compare()
    assert "auto chose" in compare.splitlines()[0] and "n/a" in compare
    assert "device cpu" in profile.summary() or CUDA
    path = profile.save(tmp_path / "sub" / "profile.json")
    data = json.loads(open(path).read())
    assert len(data["rows"]) == len(profile.rows) and data["ceilings"]["flops_per_s"] == 3.0e10
    loaded = Profile.load(path)
    assert [vars(r) for r in loaded.rows] == [vars(r) for r in profile.rows]
    assert loaded.table(k=8) == table
    with pytest.raises(ValueError, match="rows"):
        Profile.from_dict({"device": "cpu"})
    pytest.importorskip("matplotlib")
    png = profile.plot(tmp_path / "hot.png", k=6)
    with open(png, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# argument checks


def test_bad_arguments():
    model, x = nn.Conv2d(2, 2, 3), torch.randn(1, 2, 5, 5)
    fast = dict(repeats=1, warmup=0, ceilings="nominal", memory=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        profile_model(lambda t: t, x)
    with pytest.raises(ValueError, match=r"operations .*'backward'"):
        profile_model(model, x, operations=("forward", "backward"), **fast)
    with pytest.raises(ValueError, match=r"pathways .*'fastest'"):
        profile_model(model, x, pathways=("auto", "fastest"), **fast)
    with pytest.raises(ValueError, match="operations must name at least one"):
        profile_model(model, x, operations=(), **fast)
    with pytest.raises(ValueError, match="repeats must be an int >= 1, got 0"):
        profile_model(model, x, repeats=0)
    with pytest.raises(TypeError, match="repeats"):
        profile_model(model, x, repeats=2.5)
    with pytest.raises(ValueError, match="warmup"):
        profile_model(model, x, warmup=-1)
    with pytest.raises(ValueError, match="columns"):
        profile_model(model, x, columns=0)
    with pytest.raises(ValueError, match="ceilings"):
        profile_model(model, x, ceilings="fast")
    with pytest.raises(ValueError, match="device"):
        profile_model(model, x, device="no-such-device")
    with pytest.raises(ValueError, match="time_limit_s"):
        profile_model(model, x, time_limit_s=-1.0)
    with pytest.raises(TypeError, match="progress"):
        profile_model(model, x, progress="print")
    with pytest.raises(TypeError, match="memory"):
        profile_model(model, x, memory="yes")
    with pytest.raises(ValueError, match=r"layers \['nope'\]"):
        profile_model(model, x, layers=["nope"], **fast)
    with pytest.raises(TypeError, match="inputs"):
        profile_model(model, 3.0, **fast)
    with pytest.raises(ValueError, match="no Conv/ConvTranspose/Linear"):
        profile_model(nn.ReLU(), x, **fast)
