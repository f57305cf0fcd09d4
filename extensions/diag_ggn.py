"""GGN / Fisher diagonals: exact and Monte-Carlo, summed and per sample.

==========================  =========================  ==================================
extension                   attribute                  shape
==========================  =========================  ==================================
``DiagGGNExact()``          ``diag_ggn_exact``         parameter shape
``DiagGGNMC(mc_samples)``   ``diag_ggn_mc``            parameter shape
``BatchDiagGGNExact()``     ``diag_ggn_exact_batch``   ``[N, *param]``
``BatchDiagGGNMC(...)``     ``diag_ggn_mc_batch``      ``[N, *param]``
==========================  =========================  ==================================

The GGN is that of the loss as reduced (``mean`` includes its ``1/N``); per-sample versions hold
each sample's contribution, so they sum to the full diagonal.
"""

from __future__ import annotations

from curvlib.engine.extension import Extension, add_into


def _check_samples(mc_samples) -> int:
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
    return mc_samples


class _DiagGGN(Extension):
    per_sample = False
    keeps_location_gram = True
    low_precision_messages = True  # the weight diagonals square in float32 (ModuleCalls.ggn_diag_terms)
    replayable = True  # accumulate only adds ggn_diag_terms into the state

    @property
    def fused_layer_memory(self):  # the fused GGN-diagonal kernel (curvlib.kernels.ggn_unfolded)
        return "per_sample" if self.per_sample else "summed"

    def accumulate(self, group, messages, state):
        add_into(state, group.ggn_diag_terms(messages, per_sample=self.per_sample))

    def finalize(self, group, state):
        return group.finish_ggn_diag(state, per_sample=self.per_sample)


class DiagGGNExact(_DiagGGN):
    """Exact GGN diagonal (``param.diag_ggn_exact``)."""

    savefield = "diag_ggn_exact"
    message = "ggn_exact"


class DiagGGNMC(_DiagGGN):
    """Monte-Carlo GGN (Fisher) diagonal with ``mc_samples`` sampled targets (``param.diag_ggn_mc``)."""

    savefield = "diag_ggn_mc"
    message = "ggn_mc"

    def __init__(self, mc_samples: int = 1):
        self.mc_samples = _check_samples(mc_samples)

    def __repr__(self):
        return f"DiagGGNMC(mc_samples={self.mc_samples})"


class BatchDiagGGNExact(DiagGGNExact):
    """Per-sample exact GGN diagonal (``param.diag_ggn_exact_batch``, ``[N, *param]``)."""

    savefield = "diag_ggn_exact_batch"
    per_sample = True


class BatchDiagGGNMC(DiagGGNMC):
    """Per-sample Monte-Carlo GGN diagonal (``param.diag_ggn_mc_batch``, ``[N, *param]``)."""

    savefield = "diag_ggn_mc_batch"
    per_sample = True
