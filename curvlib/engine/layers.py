"""Per-layer curvature from a backpropagated message: one recorded module call, all quantities.

A :class:`LayerCall` is one call of a module with parameters during the forward pass: its input
``x`` and output ``y``. Given ``s`` — vectors backpropagated to ``y``, ``[C, *y.shape]`` — it
computes each quantity for each of the module's parameters, returned as ``{name: tensor}``.

Three kinds of layer:

- convolutions (``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d``) through :mod:`curvlib.functional`;
- ``Linear`` as a point-wise ``Conv1d`` over all leading dimensions but the batch (so a Linear on
  ``[N, T, D]`` sums over the ``T`` "locations" like a convolution over its output locations);
- any other module with parameters (BatchNorm, LayerNorm, Embedding …) through autograd: its
  per-column parameter gradients are VJPs of the recorded output.

*Column gradients* ``[C, N, *param]`` are the per-(column, sample) parameter gradients. For a
network whose samples do not interact they are per-sample VJPs of column ``c``; when they do
(BatchNorm in train mode), the engine backpropagates one column per (c, n) pair and ``N`` indexes
those columns (see :mod:`curvlib.engine.context`). Every exact quantity is a function of them;
convolutions compute the common ones (GGN diagonal, mini-blocks, Gram) directly as tensor
networks without materialising them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import functional as F
from .diagonal_backprop import _transposed_output_padding

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


#: Pathway of :mod:`curvlib.functional` for the column-heavy quantities (GGN diagonal, mini-blocks,
#: Gram matrix, column gradients): many columns share one unfolded input, so viewing overlapping
#: windows as the unfolded input (batched matrix products) beats contracting index patterns.
GGN_PATHWAY = "unfold"

#: Bytes of per-column weight gradients the GGN diagonal holds at once (chunks over columns).
GGN_CHUNK_BYTES = 2**29

#: Largest location Gram ``[N, C_out, O, O]`` a layer keeps across the chunks of columns (see
#: :meth:`LayerCall.prefers_location_gram`).
LOCATION_GRAM_BYTES = 2**29

#: Fewest output channels per group for which :meth:`LayerCall.prefers_location_gram` may choose the Gram.
LOCATION_GRAM_MIN_CHANNELS = 16

#: Key of the location-Gram term in a GGN-diagonal state (:meth:`ModuleCalls.ggn_diag_terms`).
LOCATION_GRAM_KEY = "weight:location_gram"


def layer_kind(module: nn.Module) -> str:
    """``"conv"`` (incl. transposed), ``"linear"`` or ``"generic"`` (autograd)."""
    if isinstance(module, CONV_TYPES + CONV_TRANSPOSE_TYPES):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return "generic"


def check_module(module: nn.Module) -> None:
    """Refuse module configurations we cannot represent (non-zero padding modes)."""
    if layer_kind(module) == "conv" and module.padding_mode != "zeros":
        raise ValueError(
            f"{type(module).__name__} with padding_mode={module.padding_mode!r} is not supported: "
            "use padding_mode='zeros' (or pad explicitly with torch.nn.functional.pad before the layer)"
        )


def direct_parameters(module: nn.Module) -> Dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}


@dataclass
class KroneckerFactors:
    """KFAC factors of one parameter: ``input`` ``[G, D, D]`` and ``output`` ``[G, E, E]``.

    The curvature of group ``g``'s weight block ``W_g`` (``[E, D]`` when flattened as
    ``weight.flatten(1)`` restricted to the group) is approximated by ``output[g] ⊗ input[g]`` in
    the row-major ``vec(W_g)`` order, i.e. ``W_g ↦ output[g] @ W_g @ input[g]``. For a bias the
    input factor is ``[G, 1, 1]``.
    """

    input: Tensor
    output: Tensor

    def __add__(self, other: "KroneckerFactors") -> "KroneckerFactors":
        return KroneckerFactors(self.input + other.input, self.output + other.output)


class LayerCall:
    """One call of a module with parameters: input ``x``, output ``y``, and its quantities."""

    def __init__(self, module: nn.Module, x: Tensor, y: Tensor):
        self.module = module
        self.kind = layer_kind(module)
        self.x = x
        self.y = y
        # the autograd node and edge of the output as the layer produced it: an in-place operation
        # later in the forward pass (torch.relu_(y), y += r) rebinds y to a new node, but
        # differentiating w.r.t. this edge still gives the gradient w.r.t. the layer's own output
        self.node = y.grad_fn
        self.edge = _gradient_edge(y)
        self.parameters = direct_parameters(module)
        self._x_as: Optional[Tuple[torch.dtype, Tensor]] = None  # the input in a message dtype (conv_input_as)
        if self.kind == "conv":
            transposed = isinstance(module, CONV_TRANSPOSE_TYPES)
            self.hyper = dict(
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
                transposed=transposed,
                # the effective output padding (a forward call with output_size=... sets its own)
                output_padding=_transposed_output_padding(module, x, y) if transposed else 0,
            )
            self.kernel_size = module.kernel_size
            self.groups = module.groups
        elif self.kind == "linear":
            self.hyper = dict(stride=1, padding=0, dilation=1, groups=1, transposed=False, output_padding=0)
            self.kernel_size = (1,)
            self.groups = 1

    def signature(self) -> tuple:
        """What the engine's plans read of this call besides the graph's structure: kind, hyper-parameters,
        the shapes and dtypes of input, output and parameters (equal for the same layer in later steps)."""
        hyper = getattr(self, "hyper", None)
        return (self.kind, type(self.module), tuple(self.x.shape), self.x.dtype, tuple(self.y.shape), self.y.dtype,
                tuple((name, tuple(p.shape), p.dtype) for name, p in self.parameters.items()),
                None if hyper is None else tuple((name, _hashable(value)) for name, value in hyper.items()))

    # ------------------------------------------------------------------------------------------
    # conv-shaped views of input, output messages and weights

    def conv_input(self) -> Tensor:
        """``x`` as a convolution input ``[N, C_in, *I]`` (Linear: ``[N, D_in, T]``)."""
        if self.kind == "linear":
            n = self.x.shape[0]
            return self.x.reshape(n, -1, self.x.shape[-1]).transpose(1, 2)
        return self.x

    def conv_input_as(self, dtype: torch.dtype) -> Tensor:
        """:meth:`conv_input` in ``dtype``, converted once per backward pass (for messages carried in a
        lower precision, whose products take both operands in it)."""
        x = self.conv_input()
        if x.dtype == dtype:
            return x
        if self._x_as is None or self._x_as[0] != dtype:
            self._x_as = (dtype, x.to(dtype))
        return self._x_as[1]

    def in_output_dtype(self, s: Tensor) -> Tensor:
        """``s`` in the layer output's dtype (the engine may carry messages in a lower precision)."""
        return s if s.dtype == self.y.dtype else s.to(self.y.dtype)

    def conv_message(self, s: Tensor) -> Tensor:
        """``s`` ``[C, *y.shape]`` as ``[C, N, C_out, *O]`` (Linear: ``[C, N, D_out, T]``)."""
        if self.kind == "linear":
            c, n = s.shape[:2]
            return s.reshape(c, n, -1, s.shape[-1]).transpose(2, 3)
        return s

    def _to_weight(self, tensor: Tensor, lead: int) -> Tensor:
        """Conv-layout weight-shaped result → the module's weight shape (Linear drops the kernel axis)."""
        if self.kind == "linear":
            return tensor.reshape(*tensor.shape[:lead], *self.module.weight.shape)
        return tensor

    def _kwargs(self) -> dict:
        return dict(self.hyper)

    @property
    def locations(self) -> int:
        """Number of output locations the weight is shared over (1 for a Linear on ``[N, D]``)."""
        shape = self.y.shape[1:-1] if self.kind == "linear" else self.y.shape[2:]
        return math.prod(shape)

    def bias_columns(self, s: Tensor) -> Tensor:
        """Per (column, sample) bias gradients ``[C, N, C_out]``: ``s`` summed over output locations,
        in the output's dtype (float32 sums of messages carried in bfloat16)."""
        s = self.conv_message(s)
        return s.flatten(3).sum(3, dtype=self.y.dtype)

    # ------------------------------------------------------------------------------------------
    # quantities

    def column_gradients(self, s: Tensor, coupled: bool = False) -> Dict[str, Tensor]:
        """Per-(column, sample) parameter gradients ``{name: [C, N, *param]}``.

        ``coupled=False``: ``s`` is ``[C, *y.shape]`` and sample ``n``'s gradient is its own VJP.
        ``coupled=True``: ``s`` is ``[C·N, *y.shape]``, one backpropagated vector per (c, n) pair,
        each summed over the batch (samples interact, e.g. through BatchNorm in train mode).
        """
        batch = self.y.shape[0]
        if self.kind == "generic":
            return self._generic_column_gradients(s, coupled)
        result = {}
        x, message = self.conv_input(), self.conv_message(s)
        if "weight" in self.parameters:
            grads = F.weight_vjp(
                x, message, self.kernel_size, per_sample=not coupled, columns=True, pathway=GGN_PATHWAY, **self._kwargs()
            )
            result["weight"] = self._to_weight(grads.reshape(-1, batch, *grads.shape[2 - coupled:]), 2)
        if "bias" in self.parameters:
            bias = self.bias_columns(s)
            result["bias"] = bias.sum(1).reshape(-1, batch, bias.shape[-1]) if coupled else bias
        return result

    def _generic_column_gradients(self, s: Tensor, coupled: bool) -> Dict[str, Tensor]:
        # Re-run the module functionally on its recorded input (buffers cloned so running statistics
        # are untouched): an independent graph, usable inside hooks of the ordinary backward pass.
        batch = self.y.shape[0]
        if coupled:
            vectors = s
        else:  # one vector per (column, sample): column c restricted to sample n
            eye = torch.eye(batch, dtype=s.dtype, device=s.device)
            vectors = (s[:, None] * eye.reshape(1, batch, batch, *([1] * (s.dim() - 2)))).flatten(0, 1)
        params = {name: p.detach().requires_grad_() for name, p in self.parameters.items()}
        buffers = {name: b.clone() for name, b in self.module.named_buffers(recurse=False)}
        with torch.enable_grad(), suspend_recording():
            y = torch.func.functional_call(self.module, {**params, **buffers}, (self.x,))
            grads = batched_vjp(y, list(params.values()), vectors, retain_graph=False)
        return {name: g.reshape(-1, batch, *params[name].shape) for name, g in zip(params, grads)}

    def ggn_diag(self, s: Tensor, per_sample: bool = False) -> Dict[str, Tensor]:
        """GGN diagonal ``Σ_{c,n} (J_{c,n})²`` per parameter (``[N, *param]`` summed over c if ``per_sample``)."""
        if self.kind == "generic":
            return {k: _square_sum(v, per_sample) for k, v in self.column_gradients(self.in_output_dtype(s)).items()}
        result = {}
        if "weight" in self.parameters and "bias" in self.parameters and not self.hyper["transposed"]:
            # both from one pass over the messages (the fused kernel sums them with the weight's products)
            # in the output's dtype: the fused kernel's float32 sums of bfloat16 messages stay unrounded
            x, message = self.conv_input_as(s.dtype), self.conv_message(s)
            weight, bias = F.ggn_diag(x, message, self.kernel_size, per_sample=per_sample, bias=True,
                                      dtype=self.y.dtype, **self._kwargs())
            result["weight"] = self._to_weight(weight, 1 if per_sample else 0)
            result["bias"] = bias
            return result
        if "weight" in self.parameters:
            diag = self._chunked_weight_diag(s, per_sample).to(self.y.dtype)
            result["weight"] = self._to_weight(diag, 1 if per_sample else 0)
        if "bias" in self.parameters:
            result["bias"] = _square_sum(self.bias_columns(s), per_sample)
        return result

    def _chunked_weight_diag(self, s: Tensor, per_sample: bool) -> Tensor:
        """Σ_c (per-sample weight VJPs of column c)², a chunk of columns at a time.

        Ordinary layers use :func:`curvlib.functional.ggn_diag` (automatic pathway). For transposed
        layers (no native or fused pathway): measured on an H100 (``benchmarks/ggn_pathways.py``),
        per-column weight VJPs through the unfold pathway (batched matrix products), squared and
        summed chunk by chunk, are faster
        and far leaner than the single GGN-diagonal network, which computes the per-column
        gradients twice (no common-subexpression elimination) and keeps them all at once.
        """
        if not self.hyper["transposed"]:
            # the functional op's automatic pathway: unfold once + chunked matrix products (native)
            # or the fused kernel on GPUs; its per-(column, sample) gradients stay in bounded chunks.
            # Messages carried in bfloat16 meet the input in bfloat16 (products accumulate in float32)
            x, message = self.conv_input_as(s.dtype), self.conv_message(s)
            return F.ggn_diag(x, message, self.kernel_size, per_sample=per_sample, dtype=self.y.dtype,
                              **self._kwargs())
        x, message = self.conv_input(), self.conv_message(self.in_output_dtype(s))
        weight_numel = self.module.weight.numel()
        chunk = max(1, int(GGN_CHUNK_BYTES // max(1, x.shape[0] * weight_numel * x.element_size())))
        total = None
        for start in range(0, message.shape[0], chunk):
            grads = F.weight_vjp(
                x, message[start : start + chunk], self.kernel_size, per_sample=True, columns=True,
                pathway=GGN_PATHWAY, **self._kwargs()
            )
            squared = (grads**2).sum(0) if per_sample else (grads**2).sum((0, 1))
            total = squared if total is None else total + squared
        return total

    def location_gram_bytes(self) -> int:
        """Bytes of the location Gram ``[N, C_out, O, O]`` (:func:`curvlib.native.location_gram`)."""
        return self.y.shape[0] * self._out_channels() * self.locations**2 * self.y.element_size()

    def prefers_location_gram(self, columns: Optional[int]) -> bool:
        """Whether the weight's GGN diagonal over ``columns`` columns is cheaper through the location Gram.

        Squaring per-(column, sample) weight gradients takes ``2·C·N·C_out·O·D`` FLOPs; the Gram of the
        columns over output-location pairs and its contraction with the unfolded input's outer products
        ``2·N·C_out·O²·(C + D)``. The Gram pays where it needs at most a quarter of the FLOPs,
        ``4·O·(C + D) ≤ C·D`` (few locations, many columns: classifier heads on 7×7 maps at 1000
        classes, 17× fewer for a 3×3 layer of 512 channels), and where each group has at least
        :data:`LOCATION_GRAM_MIN_CHANNELS` output channels (the outer products ``[N, D, O²]`` are
        materialised; with few channels per group their traffic outweighs the saved arithmetic).
        Measured on an H100 (All-CNN-C, 100 classes, chunks of 7 columns): with the smaller margin
        ``O·(C + D) < C·D`` its last four layers took the Gram — no faster in float32 (539 ms either way),
        slower with TF32 (228 against 209 ms). The Gram is summed over the chunks of columns, so a layer
        keeps it (at most :data:`LOCATION_GRAM_BYTES`) meanwhile.
        """
        if (columns is None or self.kind not in ("conv", "linear") or self.hyper["transposed"]
                or "weight" not in self.parameters):
            return False
        rows = self.module.weight.numel() // self._out_channels()  # D per group
        return (4 * self.locations * (columns + rows) <= columns * rows
                and self._out_channels() // self.groups >= LOCATION_GRAM_MIN_CHANNELS
                and self.location_gram_bytes() <= LOCATION_GRAM_BYTES)

    def location_gram(self, s: Tensor) -> Tensor:
        """The columns' location Gram ``[N, G, E, O, O]`` of ``s`` ``[C, *y.shape]``."""
        from .. import native  # here: the engine imports the native pathway lazily

        message = self.conv_message(self.in_output_dtype(s))
        kwargs = self._kwargs()
        self._gram_geometry = F._weight_side(
            self.conv_input(), message, "s", self.kernel_size, kwargs["stride"], kwargs["padding"], kwargs["dilation"],
            kwargs["groups"], kwargs["transposed"], kwargs["output_padding"], leading=1)
        return native.location_gram(message, self._gram_geometry)

    def weight_diag_from_location_gram(self, gram: Tensor, per_sample: bool) -> Tensor:
        """The weight's GGN diagonal (``[N, *weight]`` if ``per_sample``) from a location Gram summed
        over the chunks of columns (after :meth:`location_gram`, whose geometry it reuses)."""
        from .. import native

        diag = native.ggn_diag_from_location_gram(self.conv_input(), gram, self._gram_geometry, per_sample)
        return self._to_weight(diag, 1 if per_sample else 0)

    def _out_channels(self) -> int:
        weight = self.module.weight
        return weight.shape[1] * self.groups if self.hyper["transposed"] else weight.shape[0]

    def ggn_mini_block(self, s: Tensor, blocks: Dict[str, Sequence[int]]) -> Dict[str, Tensor]:
        """GGN mini-block diagonal ``[*blocks, d, d]`` per parameter; ``blocks[name]`` per parameter axis."""
        result = {}
        if self.kind == "conv" and "weight" in self.parameters:
            result["weight"] = F.ggn_mini_block(
                self.conv_input(), self.conv_message(s), self.kernel_size, blocks=tuple(blocks["weight"]),
                pathway=GGN_PATHWAY, **self._kwargs()
            )
        remaining = [name for name in self.parameters if name not in result]
        if remaining:
            columns = self.column_gradients(s) if self.kind == "generic" else {}
            for name in remaining:
                grads = columns[name] if name in columns else self._column_gradient(s, name)
                result[name] = blocks_from_columns(grads, tuple(blocks[name]))
        return result

    def _column_gradient(self, s: Tensor, name: str) -> Tensor:
        if name == "bias":
            return self.bias_columns(s)
        return self.column_gradients(s)[name]

    def ggn_gram(self, s: Tensor) -> Dict[str, Tensor]:
        """Per-parameter GGN Gram matrices ``[C, N, C, N]``."""
        if self.kind == "generic":
            return {k: _gram(v) for k, v in self.column_gradients(s).items()}
        result = {}
        if "weight" in self.parameters:
            result["weight"] = F.ggn_gram(
                self.conv_input(), self.conv_message(s), self.kernel_size, pathway=GGN_PATHWAY, **self._kwargs()
            )
        if "bias" in self.parameters:
            result["bias"] = _gram(self.bias_columns(s))
        return result

    def batch_grad(self, g: Tensor) -> Dict[str, Tensor]:
        """Per-sample gradients ``[N, *param]`` from the gradient ``g`` w.r.t. the output."""
        return {k: v[0] for k, v in self.column_gradients(g[None]).items()}

    # ------------------------------------------------------------------------------------------
    # KFAC

    def kfac_input(self, approx: str) -> Dict[str, Tensor]:
        """Input factors ``[G, D, D]`` (weight) and ``[G, 1, 1]`` (bias) for ``approx`` ``"expand"``/``"reduce"``."""
        if self.kind == "generic":
            raise ValueError(f"KFAC is not defined for {type(self.module).__name__}: only Linear and convolution layers")
        x = self.conv_input()
        function = F.kfc if approx == "expand" else F.kfac_reduce
        result = {}
        if "weight" in self.parameters:
            result["weight"] = function(x, self.kernel_size, **self._kwargs())
        if "bias" in self.parameters:
            locations = self.locations if approx == "expand" else 1
            result["bias"] = torch.full((self.groups, 1, 1), float(locations), dtype=x.dtype, device=x.device)
        return result

    def kfac_output(self, s: Tensor, approx: str) -> Tensor:
        """Output factor ``[G, E, E]`` (shared by weight and bias).

        expand: ``1/O Σ_{c,n,o} s sᵀ`` (``O`` output locations); reduce: ``Σ_{c,n} (Σ_o s)(Σ_o s)ᵀ``.
        With the input factors' ``1/N`` these reproduce KFAC of a Linear layer exactly when ``O = 1``.
        """
        message = self.conv_message(s)
        c, n, channels = message.shape[:3]
        flat = message.reshape(c, n, self.groups, channels // self.groups, -1)
        locations = flat.shape[-1]
        if approx == "expand":
            return _summed_outer(flat.reshape(c * n, *flat.shape[2:])) / locations
        summed = flat.sum(-1)
        return torch.einsum("cnge,cngf->gef", summed, summed)


#: elements of the per-(column, sample) products :func:`_summed_outer` holds at once, at least (more
#: when its input is larger)
OUTER_CHUNK_ELEMENTS = 2**23


def _summed_outer(flat: Tensor) -> Tensor:
    """``Σ_b flat[b] flat[b]ᵀ`` ``[G, E, E]`` of ``flat`` ``[B, G, E, L]``: per-``b`` batched products summed,
    in chunks of ``b`` whose products take at most the input's size (or :data:`OUTER_CHUNK_ELEMENTS`).

    The strided operands feed cuBLAS directly; an einsum over ``(b, l)`` would first permute ``flat``
    into a ``[G, E, B·L]`` copy (All-CNN-C's output factors, batch 128 on an H100: 0.86 ms against
    1.73 ms for the einsum)."""
    batch, groups, e, length = flat.shape
    chunk = max(1, min(batch, max(flat.numel(), OUTER_CHUNK_ELEMENTS) // max(groups * e * e, 1)))
    total = None
    for start in range(0, batch, chunk):
        block = flat[start:start + chunk].reshape(-1, e, length)
        part = torch.bmm(block, block.transpose(1, 2)).view(-1, groups, e, e).sum(0)
        total = part if total is None else total.add_(part)
    return total


def _square_sum(columns: Tensor, per_sample: bool) -> Tensor:
    squared = columns**2
    return squared.sum(0) if per_sample else squared.sum((0, 1))


def _gram(columns: Tensor) -> Tensor:
    flat = columns.flatten(2)
    return torch.einsum("cnp,dmp->cndm", flat, flat)


def blocks_from_columns(columns: Tensor, blocks: Sequence[int]) -> Tensor:
    """Mini-block GGN ``[*blocks, d, d]`` from column gradients ``[C, N, *param]``."""
    shape = columns.shape[2:]
    if len(blocks) != len(shape) or any(size % b for size, b in zip(shape, blocks)):
        raise ValueError(f"blocks {tuple(blocks)} must have one divisor per parameter axis {tuple(shape)}")
    split = []
    for size, b in zip(shape, blocks):
        split += [b, size // b]
    tensor = columns.reshape(*columns.shape[:2], *split)
    k = len(shape)
    block_axes = [2 + 2 * a for a in range(k)]
    within_axes = [3 + 2 * a for a in range(k)]
    tensor = tensor.permute(0, 1, *block_axes, *within_axes)
    d = math.prod(size // b for size, b in zip(shape, blocks))
    tensor = tensor.reshape(*columns.shape[:2], *blocks, d)
    return torch.einsum("cn...i,cn...j->...ij", tensor, tensor)


def _hashable(value):
    """Lists (of hyper-parameters) as tuples."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def _gradient_edge(y: Tensor):
    """``torch.autograd.graph.get_gradient_edge(y)`` where available (torch ≥ 2.2), else ``y`` itself."""
    get_edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
    return y if get_edge is None or y.grad_fn is None else get_edge(y)


_RECORDING_SUSPENDED = [0]


@contextlib.contextmanager
def suspend_recording():
    """Forward calls inside this block are not recorded by the engine's hooks (internal recomputation)."""
    _RECORDING_SUSPENDED[0] += 1
    try:
        yield
    finally:
        _RECORDING_SUSPENDED[0] -= 1


def recording_suspended() -> bool:
    return _RECORDING_SUSPENDED[0] > 0


def batched_vjp(
    output: Tensor, inputs: Sequence, vectors: Tensor, retain_graph: bool = True, like: Optional[Sequence[Tensor]] = None
) -> list:
    """VJPs of ``output`` w.r.t. ``inputs`` for each of the vectors ``[J, *output.shape]`` (graph kept).

    ``output`` is a tensor or an autograd gradient edge (the backward pass then starts at that node
    with the vectors as the gradient of its output). ``inputs`` are tensors or gradient edges (then
    ``like`` gives their shapes, as tensors or sizes; ``None`` for an input that must be reached).
    Inputs not reached give zeros. Three ways, the first that runs:

    1. ``torch.func.vmap`` over ``torch.autograd.grad``: functorch's batching rules fold the vector
       axis into each backward kernel's batch axis — one ``convolution_backward`` of ``J·N``
       samples instead of ``J`` of ``N`` (ops without a rule run functorch's per-vector fallback);
    2. autograd's own ``is_grads_batched`` (the legacy vmap, which loops over the vectors for every
       op without a legacy rule — convolutions included);
    3. a loop over the vectors (backward kernels no vmap can batch).

    On an H100 (All-CNN-C, batch 128, 100 columns in chunks of 4), the first takes 281 ms in float32
    and 97 ms with TF32, the second 327 / 135 ms, the loop 314 / 121 ms.
    """
    if vectors.shape[0] == 1:  # one vector (an MC sample): a plain backward, ~15 % faster than a vmapped one
        grads = [None if g is None else g[None] for g in torch.autograd.grad(
            output, inputs, grad_outputs=vectors[0], retain_graph=True, allow_unused=True)]
    else:
        for attempt in (_functorch_vjp, _legacy_batched_vjp, _looped_vjp):
            try:
                grads = attempt(output, inputs, vectors)
                break
            except (RuntimeError, SystemError, NotImplementedError) as error:
                if attempt is _looped_vjp:
                    raise
                _LAST_BATCHED_VJP_ERROR[0] = error
    like = inputs if like is None else like
    for g, inp in zip(grads, like):
        if g is None and inp is None:
            raise RuntimeError("batched_vjp: an input that the backward pass must reach was not reached")
    return [
        g if g is not None else torch.zeros(
            vectors.shape[0], *(inp if isinstance(inp, torch.Size) else inp.shape), dtype=vectors.dtype,
            device=vectors.device)
        for g, inp in zip(grads, like)
    ]


#: The last error that made :func:`batched_vjp` fall back to a slower way (for diagnostics).
_LAST_BATCHED_VJP_ERROR: list = [None]


def _functorch_vjp(output: Tensor, inputs: Sequence, vectors: Tensor) -> list:
    reached: list = []  # which inputs autograd reaches (vmap returns tensors only)

    def vjp(vector):
        grads = torch.autograd.grad(output, inputs, grad_outputs=vector, retain_graph=True, allow_unused=True)
        reached[:] = [g is not None for g in grads]
        return tuple(g for g in grads if g is not None)

    with warnings.catch_warnings():
        # ops without a batching rule run functorch's per-vector loop: still right, and no slower than
        # the alternatives, so its "performance drop" warning would only be noise for our users
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        batched = iter(torch.func.vmap(vjp)(vectors))
    return [next(batched) if hit else None for hit in reached]


def _legacy_batched_vjp(output: Tensor, inputs: Sequence, vectors: Tensor) -> list:
    return list(torch.autograd.grad(
        output, inputs, grad_outputs=vectors, retain_graph=True, is_grads_batched=True, allow_unused=True
    ))


def _looped_vjp(output: Tensor, inputs: Sequence, vectors: Tensor) -> list:
    per_vector = [
        torch.autograd.grad(output, inputs, grad_outputs=v, retain_graph=True, allow_unused=True) for v in vectors
    ]
    return [
        None if any(g[i] is None for g in per_vector) else torch.stack([g[i] for g in per_vector])
        for i in range(len(inputs))
    ]


class ModuleCalls:
    """All calls of one module in a forward pass (a layer applied twice shares its parameters).

    Exact quantities of shared parameters need the per-column gradients summed over the calls
    before they are squared; so do networks whose samples interact (``coupled``). Otherwise, with
    a single call, the quantities come straight from the call's tensor networks.
    """

    def __init__(self, module: nn.Module, calls: Sequence[LayerCall], coupled: bool = False):
        self.module = module
        self.calls = list(calls)
        self.coupled = coupled
        self.parameters = direct_parameters(module)
        self._kfac_inputs: Dict[str, Dict[str, Tensor]] = {}
        #: columns backpropagated in all (over every chunk), set by the engine before the first chunk;
        #: ``None``: unknown (quantities computed chunk by chunk as they are)
        self.columns: Optional[int] = None

    @property
    def by_columns(self) -> bool:
        return self.coupled or len(self.calls) > 1

    def column_gradients(self, messages: Sequence[Tensor]) -> Dict[str, Tensor]:
        total: Dict[str, Tensor] = {}
        for call, s in zip(self.calls, messages):
            for name, value in call.column_gradients(s, self.coupled).items():
                total[name] = value if name not in total else total[name] + value
        return total

    def ggn_diag(self, messages: Sequence[Tensor], per_sample: bool = False) -> Dict[str, Tensor]:
        if self.by_columns:
            messages = [call.in_output_dtype(s) for call, s in zip(self.calls, messages)]
            return {k: _square_sum(v, per_sample) for k, v in self.column_gradients(messages).items()}
        return self.calls[0].ggn_diag(messages[0], per_sample)

    def ggn_diag_terms(self, messages: Sequence[Tensor], per_sample: bool = False) -> Dict[str, Tensor]:
        """Terms of the GGN diagonal for one chunk of columns, to be summed over the chunks and finished
        by :meth:`finish_ggn_diag`: the diagonal itself, or for a weight cheaper through the location
        Gram (:meth:`LayerCall.prefers_location_gram` for :attr:`columns` columns in all) that Gram."""
        if self.by_columns or not self.calls[0].prefers_location_gram(self.columns):
            return self.ggn_diag(messages, per_sample)
        call, s = self.calls[0], messages[0]
        terms = {LOCATION_GRAM_KEY: call.location_gram(s)}
        if "bias" in call.parameters:
            terms["bias"] = _square_sum(call.bias_columns(s), per_sample)
        return terms

    def finish_ggn_diag(self, terms: Dict[str, Tensor], per_sample: bool = False) -> Dict[str, Tensor]:
        """The GGN diagonal from the summed :meth:`ggn_diag_terms` (contiguous: a single chunk's term may be
        a view of the fused kernel's result, which holds the bias's diagonal next to the weight's)."""
        result = {name: value.contiguous() for name, value in terms.items()}
        gram = result.pop(LOCATION_GRAM_KEY, None)
        if gram is not None:
            result["weight"] = self.calls[0].weight_diag_from_location_gram(gram, per_sample)
        return result

    def ggn_mini_block(self, messages: Sequence[Tensor], blocks: Dict[str, Sequence[int]]) -> Dict[str, Tensor]:
        if self.by_columns:
            return {k: blocks_from_columns(v, tuple(blocks[k])) for k, v in self.column_gradients(messages).items()}
        return self.calls[0].ggn_mini_block(messages[0], blocks)

    def ggn_gram(self, messages: Sequence[Tensor]) -> Dict[str, Tensor]:
        if self.by_columns:
            return {k: _gram(v) for k, v in self.column_gradients(messages).items()}
        return self.calls[0].ggn_gram(messages[0])

    def batch_grad(self, gradients: Sequence[Tensor]) -> Dict[str, Tensor]:
        total: Dict[str, Tensor] = {}
        for call, g in zip(self.calls, gradients):
            for name, value in call.batch_grad(g).items():
                total[name] = value if name not in total else total[name] + value
        return total

    def kfac_input(self, approx: str) -> Dict[str, Tensor]:
        """Input factors summed over the calls (a shared layer's factors add up); computed once per
        ``approx`` (the engine may have started them on a side stream, :mod:`.side_stream`)."""
        total = self._kfac_inputs.get(approx)
        if total is None:
            total = {}
            for call in self.calls:
                for name, value in call.kfac_input(approx).items():
                    total[name] = value if name not in total else total[name] + value
            self._kfac_inputs[approx] = total
        return total

    def kfac_output(self, messages: Sequence[Tensor], approx: str) -> Tensor:
        return sum(call.kfac_output(s, approx) for call, s in zip(self.calls, messages))
