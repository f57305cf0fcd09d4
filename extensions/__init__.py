"""Curvature quantities computed by :class:`curvlib.curvature` (installed as ``curvlib.extensions``).

==========================  ==========================  =========================================
extension                   parameter attribute         shape
==========================  ==========================  =========================================
``DiagGGNExact()``          ``diag_ggn_exact``          parameter
``DiagGGNMC(mc_samples)``   ``diag_ggn_mc``             parameter
``BatchDiagGGNExact()``     ``diag_ggn_exact_batch``    ``[N, *param]``
``BatchDiagGGNMC()``        ``diag_ggn_mc_batch``       ``[N, *param]``
``GGNMiniBlock(blocks)``    ``ggn_mini_block``          ``[*blocks, d, d]``
``GGNGram()``               ``ggn_gram``                ``[C, N, C, N]`` (network: ``ext.gram``)
``HesScale()``              ``diag_hesscale``           parameter
``HesScaleGN()``            ``diag_hesscale_gn``        parameter
``KFACExpand(fisher)``      ``kfac_expand``             ``KroneckerFactors(input, output)``
``KFACReduce(fisher)``      ``kfac_reduce``             ``KroneckerFactors(input, output)``
``BatchGrad()``             ``grad_batch``              ``[N, *param]``
==========================  ==========================  =========================================

Write your own by subclassing :class:`curvlib.engine.extension.Extension` (see ``examples/custom_extension.py``).
"""

from curvlib.engine.extension import Extension
from curvlib.engine.layers import KroneckerFactors

from .batch_grad import BatchGrad
from .diag_ggn import BatchDiagGGNExact, BatchDiagGGNMC, DiagGGNExact, DiagGGNMC
from .gram import GGNGram
from .hesscale import HesScale, HesScaleGN
from .kfac import KFACExpand, KFACReduce
from .mini_block import GGNMiniBlock

__all__ = [
    "Extension",
    "KroneckerFactors",
    "BatchGrad",
    "DiagGGNExact",
    "DiagGGNMC",
    "BatchDiagGGNExact",
    "BatchDiagGGNMC",
    "GGNMiniBlock",
    "GGNGram",
    "HesScale",
    "HesScaleGN",
    "KFACExpand",
    "KFACReduce",
]
