"""Record the layers of a model: one forward pass with forward hooks on every convolution and Linear.

Each call of a ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d`` or ``Linear`` module becomes a
:class:`LayerRecord`: its input and weight in the layout of :mod:`curvlib.functional` and its
hyper-parameters. A ``Linear`` is a point-wise ``Conv1d`` over all leading dimensions but the batch
(as the engine treats it): input ``[N, *T, D_in]`` → ``[N, D_in, ∏T]``, weight ``[D_out, D_in]`` →
``[D_out, D_in, 1]``.

The forward pass runs without gradients; buffers the model changes (BatchNorm running statistics)
are restored afterwards, so recording leaves the model as it was.

>>> import torch
>>> from torch import nn
>>> from curvlib.profile.layers import record_layers
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
>>> [(r.name, r.kind, tuple(r.x.shape)) for r in record_layers(model, torch.randn(5, 3, 8, 8))]
[('0', 'conv', (5, 3, 8, 8)), ('2', 'linear', (5, 144, 1))]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..hyperparams import ConvGeometry, make_geometry

__all__ = ["LayerRecord", "record_layers", "CONV_TYPES", "CONV_TRANSPOSE_TYPES"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class LayerRecord:
    """One recorded layer call, in the layout of :mod:`curvlib.functional`.

    Attributes:
        name: module name in ``model.named_modules()`` (``"name#2"`` for its second call, …).
        module_type: class name (``"Conv2d"``, ``"Linear"`` …).
        kind: ``"conv"``, ``"conv_transpose"`` or ``"linear"``.
        input_shape, output_shape: shapes the module saw and produced.
        x: layer input ``[N, C_in, *I]`` (Linear: ``[N, D_in, ∏T]``), detached.
        weight: ``[C_out, C_in // G, *K]`` (transposed: ``[C_in, C_out // G, *K]``; Linear ``[D_out, D_in, 1]``).
        out_shape: the layer output as the functional operations see it ``[N, C_out, *O]``.
        kernel_size, stride, padding, dilation, groups, output_padding: hyper-parameters
            (``padding`` may be ``'same'``/``'valid'``; ``output_padding`` is the effective one).
    """

    name: str
    module_type: str
    kind: str
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    x: Tensor
    weight: Tensor
    out_shape: Tuple[int, ...]
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: object
    dilation: Tuple[int, ...]
    groups: int
    output_padding: Tuple[int, ...]

    @property
    def transposed(self) -> bool:
        return self.kind == "conv_transpose"

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def hyper(self) -> dict:
        """Keyword arguments of the weight-side functional operations (``transposed`` ones included when set)."""
        kwargs = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        if self.transposed:
            kwargs.update(transposed=True, output_padding=self.output_padding)
        return kwargs

    def geometry(self) -> ConvGeometry:
        """The layer's :class:`~curvlib.hyperparams.ConvGeometry` (for the cost model)."""
        return make_geometry(
            layer_input_channels=self.x.shape[1],
            layer_output_channels=self.out_shape[1],
            layer_input_size=tuple(self.x.shape[2:]),
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            transposed=self.transposed,
            output_padding=self.output_padding if self.transposed else 0,
        )

    def describe(self) -> dict:
        """JSON-friendly summary (shapes and hyper-parameters, no tensors)."""
        return dict(
            layer=self.name,
            module=self.module_type,
            kind=self.kind,
            input_shape=list(self.input_shape),
            output_shape=list(self.output_shape),
            weight_shape=list(self.weight.shape),
            kernel_size=list(self.kernel_size),
            stride=list(self.stride),
            padding=self.padding if isinstance(self.padding, str) else list(self.padding),
            dilation=list(self.dilation),
            groups=self.groups,
            output_padding=list(self.output_padding),
        )


def _effective_output_padding(module: nn.Module, x: Tensor, y: Tensor) -> Tuple[int, ...]:
    """Output padding of a transposed convolution read off its output size (covers ``output_size=``):
    ``A = O − ((I − 1)·S − 2P + D·(K − 1) + 1)`` per spatial dimension."""
    return tuple(
        y.shape[2 + j]
        - ((x.shape[2 + j] - 1) * module.stride[j] - 2 * module.padding[j]
           + module.dilation[j] * (module.kernel_size[j] - 1) + 1)
        for j in range(len(module.kernel_size))
    )


def _record(name: str, module: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> LayerRecord:
    x, y = x.detach(), y.detach()
    weight = module.weight.detach()
    if isinstance(module, nn.Linear):
        n = x.shape[0]
        # point-wise Conv1d over all leading dims but the batch (the engine's view of a Linear)
        conv_x = x.reshape(n, -1, x.shape[-1]).transpose(1, 2)
        out_shape = (n, y.shape[-1], conv_x.shape[-1])
        return LayerRecord(
            name, type(module).__name__, "linear", tuple(x.shape), tuple(y.shape), conv_x.to(device),
            weight.unsqueeze(-1).to(device), out_shape, (1,), (1,), (0,), (1,), 1, (0,),
        )
    transposed = isinstance(module, CONV_TRANSPOSE_TYPES)
    return LayerRecord(
        name=name,
        module_type=type(module).__name__,
        kind="conv_transpose" if transposed else "conv",
        input_shape=tuple(x.shape),
        output_shape=tuple(y.shape),
        x=x.to(device),
        weight=weight.to(device),
        out_shape=tuple(y.shape),
        kernel_size=tuple(module.kernel_size),
        stride=tuple(module.stride),
        padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
        dilation=tuple(module.dilation),
        groups=module.groups,
        output_padding=_effective_output_padding(module, x, y) if transposed else (0,) * len(module.kernel_size),
    )


def _call(model: nn.Module, inputs):
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    raise TypeError(
        f"inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword inputs, "
        f"got {type(inputs).__name__}"
    )


def record_layers(
    model: nn.Module,
    inputs,
    device=None,
    layers: Optional[Sequence[str]] = None,
    skipped: Optional[List[Tuple[str, str]]] = None,
) -> List[LayerRecord]:
    """One forward pass of ``model`` on ``inputs``; a :class:`LayerRecord` per call of each profiled layer.

    Args:
        model: any ``nn.Module``.
        inputs: a tensor (``model(inputs)``), a tuple/list (``model(*inputs)``) or a dict (``model(**inputs)``).
        device: where the recorded tensors are moved (``None``: where the layer saw them); the model
            itself is not moved.
        layers: names (from ``model.named_modules()``) to record; ``None``: every Conv/ConvTranspose/Linear.
        skipped: if given, ``(name, reason)`` is appended for each layer that cannot be profiled
            (non-zero ``padding_mode``).

    Returns:
        Records in call order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = {
        module: name for name, module in model.named_modules()
        if isinstance(module, CONV_TYPES + CONV_TRANSPOSE_TYPES + (nn.Linear,))
    }
    if layers is not None:
        if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
            raise TypeError(f"layers must be None or a sequence of module names, got {layers!r}")
        known = set(named.values())
        unknown = [n for n in layers if n not in known]
        if unknown:
            raise ValueError(f"layers {unknown} are not Conv/ConvTranspose/Linear modules of the model; known: {sorted(known)}")
        wanted = set(layers)
        named = {m: n for m, n in named.items() if n in wanted}
    records: List[LayerRecord] = []
    calls: Dict[str, int] = {}

    def hook(module, args, kwargs, output):
        name = named[module]
        if getattr(module, "padding_mode", "zeros") != "zeros":
            if skipped is not None and name not in calls:
                skipped.append((name, f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"))
            calls[name] = calls.get(name, 0) + 1
            return
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or not isinstance(output, Tensor):
            if skipped is not None:
                skipped.append((name, "input or output is not a single tensor"))
            return
        calls[name] = calls.get(name, 0) + 1
        label = name if calls[name] == 1 else f"{name}#{calls[name]}"
        records.append(_record(label or type(module).__name__, module, x, output, torch.device(device) if device else x.device))

    handles = [module.register_forward_hook(hook, with_kwargs=True) for module in named]
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with torch.no_grad():
            _call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():  # BatchNorm in train mode updated its running statistics: undo
            for name, b in model.named_buffers():
                if name in saved:
                    b.copy_(saved[name])
    return records

