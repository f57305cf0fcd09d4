"""KFAC factors for Linear and (grouped, transposed) convolution layers (core paper B.3).

``KFACExpand(fisher=...)`` → ``param.kfac_expand``, ``KFACReduce(fisher=...)`` → ``param.kfac_reduce``,
each a :class:`~curvlib.engine.layers.KroneckerFactors` with

- ``input`` ``[G, D, D]``: ``1/N Σ_n Σ_o u uᵀ`` (expand, :func:`curvlib.functional.kfc`) or ``1/N Σ_n ū ūᵀ``
  with ``ū`` the unfolded input averaged over output locations (reduce, :func:`curvlib.functional.kfac_reduce`);
  for a bias ``[G, 1, 1]`` (the number of output locations for expand, 1 for reduce);
- ``output`` ``[G, E, E]``: ``1/O Σ_{c,n,o} s sᵀ`` (expand) or ``Σ_{c,n} (Σ_o s)(Σ_o s)ᵀ`` (reduce), from the
  backpropagated columns ``s`` selected by ``fisher``: ``"type-2"`` (exact loss-Hessian square root),
  ``"mc"`` (``mc_samples`` sampled targets) or ``"empirical"`` (per-sample gradients).

``output[g] ⊗ input[g]`` approximates the GGN/Fisher of group ``g``'s weight ``W_g`` ``[E, D]``
(``weight.flatten(1)`` rows of group ``g``; for ``ConvTranspose`` layers ``W_g[e, (d, k)] = weight[(g, d), e, k]``).
For a Linear layer both approximations coincide with KFAC. Grouped convolutions get one pair per group.
A layer applied several times sums its factors over the calls.
"""

from __future__ import annotations

from curvlib.engine.extension import Extension
from curvlib.engine.layers import KroneckerFactors, layer_kind

FISHER_TYPES = ("type-2", "mc", "empirical")


class _KFAC(Extension):
    approx = "expand"

    def __init__(self, fisher: str = "mc", mc_samples: int = 1):
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.message = {"type-2": "ggn_exact", "mc": "ggn_mc", "empirical": "empirical"}[fisher]

    @property
    def input_factor(self) -> str:
        return self.approx

    def check(self, module):
        if layer_kind(module) == "generic":
            raise ValueError(
                f"{type(self).__name__} supports Linear and convolution layers, not {type(module).__name__}; "
                "pass it in curvlib.curvature(..., skip=[...]) to leave it out"
            )

    def accumulate(self, group, messages, state):
        output = group.kfac_output(messages, self.approx)
        state["output"] = output if "output" not in state else state["output"] + output

    def finalize(self, group, state):
        inputs = group.kfac_input(self.approx)
        return {name: KroneckerFactors(inputs[name], state["output"]) for name in group.parameters}

    def __repr__(self):
        return f"{type(self).__name__}(fisher={self.fisher!r}, mc_samples={self.mc_samples})"


class KFACExpand(_KFAC):
    """KFAC-expand (KFC) factors (``param.kfac_expand``)."""

    savefield = "kfac_expand"
    approx = "expand"


class KFACReduce(_KFAC):
    """KFAC-reduce factors (``param.kfac_reduce``)."""

    savefield = "kfac_reduce"
    approx = "reduce"
