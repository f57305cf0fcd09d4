"""GGN mini-block diagonal (core paper B.2): ``GGNMiniBlock(blocks=...)`` → ``param.ggn_mini_block``.

``blocks`` says how each parameter is cut: a callable ``blocks(name, param) -> tuple`` or one of

- ``"full"`` — the whole layer parameter as one block: ``[1, …, 1, |p|, |p|]``;
- ``"output"`` — one block per output channel (per row of ``weight.flatten(1)``);
- ``"diagonal"`` — every element its own block (the GGN diagonal, ``[*param.shape, 1, 1]``).

The result of a parameter is ``[*blocks, d, d]`` with ``d = |p| / ∏blocks``; block ``b`` is the GGN
of ``p[b_0·z_0:(b_0+1)·z_0, …]`` (``z = shape / blocks``), flattened row-major.
"""

from __future__ import annotations

from typing import Callable, Union

from curvlib.engine.extension import Extension, add_into

PRESETS = ("full", "output", "diagonal")


def preset_blocks(preset: str, shape) -> tuple:
    if preset == "full":
        return (1,) * len(shape)
    if preset == "diagonal":
        return tuple(shape)
    return (shape[0],) + (1,) * (len(shape) - 1)


class GGNMiniBlock(Extension):
    """Exact GGN mini-blocks of every parameter (``param.ggn_mini_block``)."""

    savefield = "ggn_mini_block"
    message = "ggn_exact"

    def __init__(self, blocks: Union[str, Callable] = "output"):
        if not callable(blocks) and blocks not in PRESETS:
            raise ValueError(f"blocks must be one of {PRESETS} or a callable (name, param) -> tuple, got {blocks!r}")
        self.blocks = blocks

    def _blocks(self, group) -> dict:
        result = {}
        for name, param in group.parameters.items():
            if callable(self.blocks):
                result[name] = tuple(self.blocks(name, param))
            else:
                result[name] = preset_blocks(self.blocks, param.shape)
            if len(result[name]) != param.dim() or any(s % b for s, b in zip(param.shape, result[name])):
                raise ValueError(
                    f"blocks for parameter {name!r} of shape {tuple(param.shape)} must be one divisor per axis, "
                    f"got {result[name]}"
                )
        return result

    def accumulate(self, group, messages, state):
        add_into(state, group.ggn_mini_block(messages, self._blocks(group)))

    def __repr__(self):
        return f"GGNMiniBlock(blocks={self.blocks!r})"
