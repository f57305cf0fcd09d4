"""The ``"unfold"`` pathway (overlapping windows viewed as the unfolded input) against independent references."""

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
