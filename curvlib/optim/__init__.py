"""Second-order optimizers built on :mod:`curvlib.extensions`.

================================  =================================================================
optimizer                         what it does
================================  =================================================================
``KFAC(model, loss_fn, base)``    Kronecker-factored preconditioning (expand/reduce; type-2/MC/
                                  empirical) of any ``torch.optim`` optimizer; other parameters:
                                  the base optimizer's plain update
``DiagGGNNaturalGradient``        ``g / (diag GGN + damping)`` (exact or MC), then the base optimizer
``AdaHesScale``                   Adam with the HesScale diagonal squared in place of ``g²``
``AdaHesScaleGN``                 the same with HesScale's Gauss–Newton variant
``CurvatureOptimizer``            their shared base: hooks on curvature steps only, state, DDP
================================  =================================================================

All are ``torch.optim.Optimizer`` objects that share the wrapped optimizer's ``param_groups``
(learning-rate schedulers, ``GradScaler``) and need no change to the training loop::

    opt = KFAC(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
               approx="reduce", fisher="mc", damping=1e-3, factor_update_every=10, inverse_update_every=50)
    for X, y in loader:
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()          # hooks collect curvature, on curvature steps only
        opt.step()               # precondition, then the base optimizer's step

Hooks are installed only while the next step collects curvature; ``state_dict()`` holds the
statistics, inverses and the Monte-Carlo generator, so a resumed run continues bit for bit.
Under ``torch.distributed`` the statistics are averaged over ranks (:mod:`curvlib.optim.distributed`).
"""

from ._wrapper import CurvatureOptimizer
from .diagonal import AdaHesScale, AdaHesScaleGN, DiagGGNNaturalGradient
from .kfac import KFAC

__all__ = ["CurvatureOptimizer", "KFAC", "DiagGGNNaturalGradient", "AdaHesScale", "AdaHesScaleGN"]
