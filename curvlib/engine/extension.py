"""The interface every curvature quantity implements (see ``examples/custom_extension.py``).

An extension declares

- ``savefield``: the attribute its per-parameter result is stored under (``param.<savefield>``);
- ``message``: what it consumes at each layer output —
  ``"ggn_exact"`` (columns of the exact loss-Hessian square root, ``[C, *y.shape]``),
  ``"ggn_mc"`` (``mc_samples`` Monte-Carlo columns), ``"empirical"`` (per-sample gradients, one
  column), ``"grad_output"`` (the plain gradient w.r.t. the layer output, ``[1, *y.shape]``),
  ``"hessian_diagonal"`` / ``"hessian_diagonal_gn"`` (HesScale's diagonal, shaped like ``y``),
  or ``None`` (only the layer input is needed);
- ``accumulate(group, messages, state)``: add one chunk's contribution for a parameter-sharing
  group of calls (:class:`~curvlib.engine.layers.ModuleCalls`) to ``state`` (a dict per module,
  kept across chunks; ``messages`` holds one tensor per call);
- ``finalize(group, state) -> {param_name: result}``: the per-parameter results;
- optionally ``check(module)`` to refuse modules it does not support with a clear error;
- optionally ``low_precision_messages = True`` if ``accumulate`` handles messages carried in a lower
  precision than the layer outputs' (bfloat16 columns of a float32 model, see
  :class:`~curvlib.engine.context.curvature`); results must still be in the parameters' dtype;
- optionally ``fused_layer_memory = "summed"`` / ``"per_sample"`` if ``accumulate`` runs on fused kernels
  where the device has them (GGN diagonals): the engine sizes chunks of columns for their working set;
- optionally ``replayable = True`` if ``accumulate`` only adds its chunk's results into ``state`` with
  :func:`add_into` (and does the same device work for every chunk of one size, with no host
  synchronisation): the engine may then capture one chunk's column pass as a CUDA graph and replay it
  for the later chunks (:mod:`curvlib.engine.chunk_replay`);
- optionally ``input_factor``: ``"expand"``/``"reduce"`` if ``finalize`` reads the group's KFAC input
  factors (:meth:`~curvlib.engine.layers.ModuleCalls.kfac_input`); the engine then starts them when the
  backward pass starts, on a side CUDA stream (:mod:`curvlib.engine.side_stream`), and ``finalize``
  gets the same tensors back.

Columns may arrive in chunks (memory budget), so ``accumulate`` must be additive over columns;
extensions that need all columns at once set ``needs_all_columns = True``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from torch import Tensor, nn

from . import chunk_replay as _chunk_replay

MESSAGES = (None, "ggn_exact", "ggn_mc", "empirical", "grad_output", "hessian_diagonal", "hessian_diagonal_gn")


class Extension:
    """Base class of curvature quantities; subclasses set ``savefield`` and ``message``."""

    savefield: str = ""
    message: Optional[str] = None
    mc_samples: int = 1
    needs_all_columns: bool = False
    #: keeps a location Gram per eligible layer across the chunks of columns (GGN diagonals; the engine
    #: counts it against ``memory_budget``)
    keeps_location_gram: bool = False
    input_factor: Optional[str] = None
    #: accepts messages in a lower precision than the layer outputs (the engine then may carry them so)
    low_precision_messages: bool = False
    #: its layer quantities have fused kernels (:mod:`curvlib.kernels`) that need only an unfolded chunk
    #: and ``"summed"`` or ``"per_sample"`` float32 results: under a memory budget on a device that runs
    #: them, the engine sizes the chunks of columns for that working set (and keeps the pathway choice
    #: within the room the messages leave); ``None``: per-sample weight gradients may be materialised
    fused_layer_memory: Optional[str] = None
    #: ``accumulate`` only adds into ``state`` with :func:`add_into`: chunks may be replayed (module docstring)
    replayable: bool = False

    def check(self, module: nn.Module) -> None:
        """Raise ``ValueError`` if ``module`` (a module with parameters) is not supported."""

    def message_key(self):
        """Extensions with equal keys share one backpropagated message."""
        if self.message == "ggn_mc":
            return ("ggn_mc", self.mc_samples)
        return self.message

    def accumulate(self, group, messages: List[Tensor], state: Dict) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement accumulate")

    def finalize(self, group, state: Dict) -> Dict[str, Tensor]:
        return dict(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def add_into(state: Dict, results: Dict[str, Tensor]) -> None:
    """``state[name] += result`` for each entry (first entry stored as is). While a chunk is captured
    for replay (:func:`curvlib.engine.chunk_replay.capturing`) the addition is in place, so each replay
    adds into the same tensor (the engine made the states its own copies before the capture)."""
    in_place = _chunk_replay.capturing()
    for name, value in results.items():
        if name not in state:
            state[name] = value
        elif in_place:
            state[name].add_(value)
        else:
            state[name] = state[name] + value


def owned(state: Dict) -> None:
    """Replace the tensors of ``state`` by copies (before in-place accumulation: a first entry stored as
    is may be a tensor its producer still holds)."""
    for name, value in state.items():
        if isinstance(value, Tensor):
            state[name] = value.clone()
