"""Per-sample gradients: ``BatchGrad()`` → ``param.grad_batch`` ``[N, *param]``.

Computed from the gradient w.r.t. each layer output during the ordinary backward pass (per-sample
weight VJP), so it costs no extra backward pass. Entries sum to ``param.grad`` (they include the
loss reduction's ``1/N``).
"""

from __future__ import annotations

from curvlib.engine.extension import Extension


class BatchGrad(Extension):
    """Per-sample gradients (``param.grad_batch``)."""

    savefield = "grad_batch"
    message = "grad_output"

    def accumulate(self, group, messages, state):
        state.update(group.batch_grad([m[0] for m in messages]))
