"""Float32 precision setting: validation, flag handling, what each pathway receives, and (on a GPU)
the accuracy of TF32 against float64."""

import os
import subprocess
import sys
import types

import pytest
import torch

import curvlib.functional as F
from curvlib import pathways, precision
from curvlib.hyperparams import make_geometry

CUDA = torch.cuda.is_available()


def _flags():
    if precision._NEW_API:
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("bad", ["fp16", "TF32", 32, True])
def test_bad_precision_is_rejected_naming_the_value(bad):
    with pytest.raises(ValueError, match="precision must be one of"):
        pathways.configure(precision=bad)
    with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(")):
        precision.check_precision(bad)
    assert pathways.settings().precision is None  # unchanged


def test_bad_environment_value_fails_at_import():
    env = dict(os.environ, CURVLIB_PRECISION="half")
    run = subprocess.run([sys.executable, "-c", "import curvlib"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "precision must be one of" in run.stderr and "'half'" in run.stderr


def test_environment_value_sets_the_default():
    env = dict(os.environ, CURVLIB_PRECISION="tf32")
    code = "import curvlib; print(curvlib.pathways.settings().precision)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "tf32"


@pytest.mark.parametrize("value", ["tf32", "ieee", "bf16"])
def test_context_sets_and_restores_the_cuda_flags(value):
    # setting the flags needs no GPU; only CUDA devices are affected. "bf16": the libraries run TF32
    before = _flags()
    with precision.fp32_precision(value, torch.device("cuda")):
        inside = _flags()
    assert _flags() == before
    flag = "tf32" if value == "bf16" else value
    expected = (flag, flag) if precision._NEW_API else (flag == "tf32", flag == "tf32")
    assert inside == expected
    with pytest.raises(RuntimeError):
        with precision.fp32_precision(value, torch.device("cuda")):
            raise RuntimeError("inside")
    assert _flags() == before


def _global_flags():
    if precision._NEW_API:
        return tuple(owner.fp32_precision for owner in (torch.backends.cuda.matmul, torch.backends.cudnn.conv,
                                                         torch.backends.cudnn.rnn))
    return _flags()


@pytest.mark.parametrize("value", ["ieee", "tf32"])
def test_global_setter_sets_every_backend_and_the_saver_restores_them(value):
    """Benchmark scripts set the flags globally (one API only); ``saved_fp32_flags`` undoes it exactly,
    also after an error — the suite's autouse fixture relies on it (a script run in-process used to leave
    cuDNN convolutions at "ieee", and a later test's ``torch.backends.cudnn.flags`` raised)."""
    other = "ieee" if value == "tf32" else "tf32"
    precision.set_fp32_precision(other)
    before = _global_flags()
    with pytest.raises(RuntimeError, match="inside"):
        with precision.saved_fp32_flags():
            precision.set_fp32_precision(value)
            expected = (value,) * 3 if precision._NEW_API else (value == "tf32",) * 2
            assert _global_flags() == expected
            with precision.fp32_precision(other, torch.device("cuda")):  # the scoped setting nests
                assert _flags()[0] == (other if precision._NEW_API else other == "tf32")
            assert _global_flags() == expected
            raise RuntimeError("inside")
    assert _global_flags() == before


@pytest.mark.parametrize("bad", ["bf16", "highest", None])
def test_global_setter_rejects_other_values(bad):
    with pytest.raises(ValueError, match="precision must be 'ieee' or 'tf32'"):
        precision.set_fp32_precision(bad)


def test_context_leaves_the_flags_alone_on_the_cpu_and_for_none():
    before = _flags()
    with precision.fp32_precision("tf32", torch.device("cpu")):
        assert _flags() == before
    with precision.fp32_precision(None, torch.device("cuda")):
        assert _flags() == before


@pytest.mark.skipif(not precision._NEW_API, reason="torch < 2.9: allow_tf32 flags only")
@pytest.mark.parametrize("matmul, conv, generic", [("tf32", "ieee", "none"), ("none", "tf32", "ieee"),
                                                   ("ieee", "none", "tf32")])
def test_backend_flags_read_what_torch_backends_say(matmul, conv, generic):
    """The flags curvlib reads (PyTorch's C getter where it agrees with ``torch.backends``) follow every
    change, including a generic setting the per-backend ones inherit."""
    saved = (torch.backends.fp32_precision, *_flags())
    try:
        torch.backends.fp32_precision = generic
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
        public = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
                  torch.backends.fp32_precision)
        assert precision.backend_flags() == public
        inherited = public[2] if public[0] == "none" else public[0]
        assert precision.matmul_allows_tf32() == (inherited == "tf32")
    finally:
        torch.backends.fp32_precision = saved[0]
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved[1:]


def test_effective_precision_follows_pytorch_for_none():
    assert precision.effective_precision("ieee") == "ieee"
    assert precision.effective_precision("tf32") == "tf32"
    assert precision.effective_precision("bf16") == "bf16"
    with precision.fp32_precision("tf32", torch.device("cuda")):
        assert precision.matmul_allows_tf32()
        assert precision.effective_precision(None) == "tf32"
    with precision.fp32_precision("ieee", torch.device("cuda")):
        assert precision.effective_precision(None) == "ieee"


def test_fused_pathway_receives_the_precision(monkeypatch):
    """The fused kernels get ``precision=`` from the setting (a stand-in kernels module records it)."""
    seen = []

    def kfc(x, geometry, precision):
        seen.append(precision)
        return F.kfc(x, geometry.kernel_size, padding=1, pathway="tn")

    fake = types.SimpleNamespace(supports=lambda *args, **kwargs: True, kfc=kfc)
    monkeypatch.setattr(F, "_kernels", lambda: fake)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for value, expected in (("tf32", "tf32"), ("ieee", "ieee"), ("bf16", "bf16")):
        with pathways.options(precision=value):
            F.kfc(x, 3, padding=1, pathway="fused")
        assert seen[-1] == expected
    with precision.fp32_precision("ieee", torch.device("cuda")):  # None: PyTorch's matmul flag
        F.kfc(x, 3, padding=1, pathway="fused")
    assert seen[-1] == "ieee"


def test_precision_setting_changes_nothing_on_the_cpu():
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    s = torch.randn(2, 3, 5, 5, 5, dtype=torch.float64)
    reference = F.ggn_diag(x, s, 3, pathway="native")
    for value in ("tf32", "bf16"):
        with pathways.options(precision=value):
            torch.testing.assert_close(F.ggn_diag(x, s, 3), reference, rtol=1e-12, atol=1e-12)
    with pathways.options(precision="tf32"):
        torch.testing.assert_close(F.kfc(x, 3, padding=1, pathway="tn"), F.kfc(x, 3, padding=1, pathway="native"))


@pytest.mark.skipif(not CUDA, reason="TF32 needs a CUDA device")
@pytest.mark.parametrize("pathway", ["native", "tn", "fused"])
def test_tf32_on_the_gpu_is_within_its_stated_tolerance_and_ieee_is_exact(pathway):
    x = torch.randn(8, 32, 16, 16, device="cuda")
    if pathway == "fused" and not F._kernels():
        pytest.skip("no Triton")
    reference = F.kfc(x.double(), 3, padding=1, pathway="native")

    def error(value):
        with pathways.options(precision=value):
            result = F.kfc(x, 3, padding=1, pathway=pathway).double()
        return ((result - reference).norm() / reference.norm()).item()

    ieee, tf32 = error("ieee"), error("tf32")
    assert ieee < 2e-5
    assert tf32 < 2e-3
    assert tf32 > 10 * ieee  # TF32 rounding is visible: the setting took effect


def test_lags_pathway_method_and_precision(monkeypatch):
    """The lags pathway passes the setting's precision on CUDA (the Triton lag products take it as an
    argument); without Triton, under TF32 it requests the convolution (its Winograd error is below
    TF32's); exact float32 otherwise. Checked through what the pathway requests (no GPU needed)."""
    from curvlib import lag_gram

    seen = []
    original = lag_gram.kfc_by_lags

    chunks = []

    def recording(x, g, lag_method="auto", precision="ieee", chunk_bytes=None):
        seen.append((lag_method, precision))
        chunks.append(chunk_bytes)
        return original(x, g, lag_method=lag_method) if not isinstance(x, types.SimpleNamespace) else None

    monkeypatch.setattr(lag_gram, "kfc_by_lags", recording)
    x = torch.randn(2, 3, 6, 6)
    with pathways.options(precision="tf32"):
        F.kfc(x, 3, padding=1, pathway="lags")  # CPU: no TF32, the method stays automatic
    assert seen == [("auto", "ieee")] and chunks == [None]  # no memory limit: no chunks
    with pathways.options(memory_fraction=0.5):  # under a limit: the chunks lag_gram picks for it
        F.kfc(x, 3, padding=1, pathway="lags")
        geometry = make_geometry(3, 3, (6, 6), kernel_size=3, padding=1)
        assert chunks[-1] == lag_gram.kfc_chunk_bytes(geometry, 2, 4) is not None
    seen.clear()
    cuda_like = types.SimpleNamespace(is_cuda=True, dtype=torch.float32, device=torch.device("cuda"),
                                      numel=lambda: 10, shape=(2, 3, 6, 6), element_size=lambda: 4)
    for usable, setting, expected in [(True, "tf32", ("auto", "tf32")), (True, "ieee", ("auto", "ieee")),
                                      (False, "tf32", ("conv", "ieee")), (False, "ieee", ("auto", "ieee")),
                                      (True, "bf16", ("auto", "bf16")), (False, "bf16", ("conv", "ieee"))]:
        monkeypatch.setattr(lag_gram, "triton_usable", lambda *args, usable=usable: usable)
        seen.clear()
        with pathways.options(precision=setting):
            F._kfc_by_lags(cuda_like, None)
        assert seen == [expected], (usable, setting)
