"""GGN Gram matrix / empirical NTK: ``GGNGram()``.

Per parameter ``param.ggn_gram`` ``[C, N, C, N]``: entry ``(c, n, c', n')`` is
``⟨J_{c,n}, J_{c',n'}⟩`` with ``J_{c,n}`` the parameter gradient of column ``c`` of the
loss-Hessian square root for sample ``n``. The whole network's Gram matrix (the sum over all
parameters) is ``extension.gram`` after the backward pass. Its non-zero eigenvalues are those of
the GGN; for ``MSELoss(reduction='sum')`` it is twice the empirical NTK.
"""

from __future__ import annotations

from curvlib.engine.extension import Extension, add_into


class GGNGram(Extension):
    """Exact GGN Gram matrix per parameter (``param.ggn_gram``) and of the network (``.gram``)."""

    savefield = "ggn_gram"
    message = "ggn_exact"
    needs_all_columns = True  # pairs of columns: cannot be split into column chunks

    def __init__(self):
        self.gram = None
        self._seen = set()

    def accumulate(self, group, messages, state):
        add_into(state, group.ggn_gram(messages))

    def finalize(self, group, state):
        if group.module in self._seen or self.gram is None:
            self._seen, self.gram = set(), None  # a new backward pass
        self._seen.add(group.module)
        for value in state.values():
            self.gram = value if self.gram is None else self.gram + value
        return dict(state)
