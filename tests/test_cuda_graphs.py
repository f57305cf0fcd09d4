"""curvlib.cuda_graphs: eager on CPUs and when off; on CUDA, replays that see new data at a captured
address, a graph per address up to the limit, and kfc_by_lags through it against the unfolded Gram."""

from __future__ import annotations

import os

import pytest
import torch

from curvlib import cuda_graphs, lag_gram, native
from curvlib.cuda_graphs import GraphCache
from curvlib.hyperparams import make_geometry

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ADDRESSES = cuda_graphs.ADDRESSES_PER_KEY


def several_ops(t: torch.Tensor) -> torch.Tensor:
    """A few dependent kernels with temporaries, like the functions the cache wraps."""
    u = torch.tanh(t) * t
    return (u @ u.transpose(-1, -2)).sum(0) + t.mean()


def test_cpu_and_off_run_eagerly(seed, monkeypatch):
    cache = GraphCache("test-cpu")
    calls = []

    def fn(t):
        calls.append(1)
        return several_ops(t)

    x = torch.randn(3, 4, 5)
    for _ in range(3):
        torch.testing.assert_close(cache(("k",), fn, x), several_ops(x))
    assert len(calls) == 3 and cache.replays == 0
    monkeypatch.setenv("CURVLIB_CUDA_GRAPHS", "0")
    assert not cuda_graphs.enabled()


@cuda
def test_replay_reads_new_data_at_the_address(seed):
    cache = GraphCache("test-replay")
    x = torch.randn(4, 8, 16, device="cuda")
    first = cache(("k",), several_ops, x)  # eager
    assert cache.replays == 0
    torch.testing.assert_close(first, several_ops(x))
    for _ in range(3):
        x.copy_(torch.randn_like(x))  # new data, same address
        expected = several_ops(x.clone())
        result = cache(("k",), several_ops, x)
        torch.testing.assert_close(result, expected)
    assert cache.replays == 3
    held = result.clone()
    cache(("k",), several_ops, x)  # the next replay must not overwrite a returned result
    torch.testing.assert_close(result, held)


@cuda
def test_graph_per_address_seen_twice_up_to_the_limit(seed):
    cache = GraphCache("test-addresses")
    tensors = [torch.randn(4, 8, 16, device="cuda") for _ in range(cuda_graphs.ADDRESSES_PER_KEY + 1)]
    for x in tensors:  # first sight of every address: eager
        torch.testing.assert_close(cache(("k",), several_ops, x), several_ops(x))
    assert cache.replays == 0
    for sweep in (1, 2):  # seen before: captured (then replayed), except beyond the limit
        for x in tensors:
            x.copy_(torch.randn_like(x))
            torch.testing.assert_close(cache(("k",), several_ops, x), several_ops(x))
        assert cache.replays == sweep * cuda_graphs.ADDRESSES_PER_KEY
    # another shape is another key: eager at first sight again
    y = torch.randn(2, 8, 16, device="cuda")
    torch.testing.assert_close(cache(("k",), several_ops, y), several_ops(y))
    assert cache.replays == 2 * cuda_graphs.ADDRESSES_PER_KEY


@cuda
def test_moving_inputs_replay_the_keys_own_buffer(seed):
    """``copy_moving_inputs``: once a key has seen more addresses than it may capture, calls at addresses
    without a graph copy ``x`` into the key's own buffer and replay (correct for every new input; the
    returned results are not overwritten; the buffer and result are held bytes); without it they run
    eagerly."""
    moving, plain = GraphCache("test-moving", copy_moving_inputs=True), GraphCache("test-not-moving")
    results, inputs = [], []
    for step in range(ADDRESSES + 4):
        x = torch.randn(4, 8, 16, device="cuda") + step  # a new tensor per step, all kept: addresses move
        inputs.append(x)
        for cache in (moving, plain):
            result = cache(("k",), several_ops, x)
            torch.testing.assert_close(result, several_ops(x.clone()))
            if cache is moving:
                results.append((result, several_ops(x.clone())))
    assert plain.replays == 0 and moving.replays == 4  # from the third address on (the first captures, then replays)
    (entry,) = moving._entries.values()
    assert entry.moving is not None
    assert moving.held_bytes == sum(g.held_bytes for g in entry.graphs.values()) + 256 + 4 * 8 * 16 * 4
    for result, expected in results:  # later replays did not overwrite earlier results
        torch.testing.assert_close(result, expected)
    channels_last = torch.randn(2, 3, 5, 4, device="cuda").contiguous(memory_format=torch.channels_last)
    cache = GraphCache("test-moving-strides", copy_moving_inputs=True)
    for _ in range(ADDRESSES + 3):
        x = torch.randn_like(channels_last)  # keeps the channels-last strides: the buffer takes them
        inputs.append(x)
        torch.testing.assert_close(cache(("k",), several_ops, x), several_ops(x.clone()))
    (entry,) = cache._entries.values()
    assert entry.moving is not None and entry.moving.input.stride() == channels_last.stride()


@cuda
def test_result_bytes_cap(seed, monkeypatch):
    """Graphs hold their result buffers: beyond MAX_HELD_BYTES per cache, new addresses run eagerly."""
    monkeypatch.setattr(cuda_graphs, "MAX_HELD_BYTES", 300)  # several_ops' result: [8, 8] float32, 256 bytes
    cache = GraphCache("test-cap")
    a, b = (torch.randn(4, 8, 16, device="cuda") for _ in range(2))
    for sweep in range(3):
        for x in (a, b):
            torch.testing.assert_close(cache(("k",), several_ops, x), several_ops(x))
    assert cache.held_bytes == 256 and cache.replays == 2  # a captured at its second sight; b never


@cuda
@pytest.mark.parametrize("method", ["gemm", "triton", "auto"])
def test_kfc_by_lags_replayed_matches_unfold(method, seed):
    if method != "gemm" and not lag_gram.triton_usable(torch.float32, "cuda"):
        pytest.skip("needs Triton")
    geometry = make_geometry(24, 8, (12, 10), kernel_size=3, padding=1, dilation=(1, 2))
    x = torch.randn(6, 24, 12, 10, device="cuda")
    before = lag_gram._GRAPHS.replays
    for step in range(4):
        x.copy_(torch.randn_like(x))
        expected = native.kfc(x.double(), geometry)
        result = lag_gram.kfc_by_lags(x, geometry, lag_method=method)
        error = ((result.double() - expected).norm() / expected.norm()).item()
        assert error < 2e-5, (step, error)
    assert lag_gram._GRAPHS.replays - before >= 3  # more if another test captured this key first


@cuda
@pytest.mark.parametrize("name", ["kfc", "kfac_reduce"])
def test_fused_factors_replayed_match_native(name, seed):
    from curvlib import kernels

    if not kernels.available():
        pytest.skip("needs Triton")
    geometry = make_geometry(6, 8, (11, 9), kernel_size=3, padding=1, stride=2)
    x = torch.randn(5, 6, 11, 9, device="cuda")
    before = kernels._GRAPHS.replays
    for step in range(4):
        x.copy_(torch.randn_like(x))
        expected = getattr(native, name)(x.double(), geometry)
        result = getattr(kernels, name)(x, geometry)
        error = ((result.double() - expected).norm() / expected.norm()).item()
        assert error < 2e-5, (step, error)
    assert kernels._GRAPHS.replays - before >= 3


@cuda
def test_native_kfc_in_chunks_replayed_matches_unfold(seed):
    """native.kfc in chunks of samples on CUDA replays a graph per input address; fresh data each step,
    against torch.nn.functional.unfold in float64 (stride 2, padding, groups, an uneven last chunk)."""
    geometry = make_geometry(6, 4, (11, 9), kernel_size=3, padding=1, stride=2, groups=2)
    x = torch.randn(7, 6, 11, 9, device="cuda")
    chunk = 2 * native.unfolded_bytes(geometry, 1, 4)
    before = native._KFC_GRAPHS.replays
    for step in range(4):
        x.copy_(torch.randn_like(x))
        u = torch.nn.functional.unfold(x.double(), 3, padding=1, stride=2).view(7, 2, 27, -1)
        expected = torch.einsum("ngdo,ngeo->gde", u, u) / 7
        result = native.kfc(x, geometry, chunk_bytes=chunk)
        error = ((result.double() - expected).norm() / expected.norm()).item()
        assert error < 2e-6, (step, error)
    assert native._KFC_GRAPHS.replays - before >= 2


def test_eager_block_runs_without_graphs(seed, monkeypatch):
    """Inside ``eager()`` nothing is replayed or captured (also nested), and ``enabled()`` says so."""
    assert cuda_graphs.enabled() or os.environ.get("CURVLIB_CUDA_GRAPHS") == "0"
    with cuda_graphs.eager():
        assert not cuda_graphs.enabled()
        with cuda_graphs.eager():
            assert not cuda_graphs.enabled()
        assert not cuda_graphs.enabled()
    monkeypatch.setenv("CURVLIB_CUDA_GRAPHS", "1")
    assert cuda_graphs.enabled()
    if torch.cuda.is_available():
        cache = cuda_graphs.GraphCache("test-eager")
        x = torch.randn(5, device="cuda")
        with cuda_graphs.eager():
            for _ in range(3):
                torch.testing.assert_close(cache(("twice",), lambda t: 2 * t, x), 2 * x)
        assert cache.replays == 0 and not cache._entries
