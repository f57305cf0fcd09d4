"""The :class:`curvature` context manager: hooks that compute extensions during ``loss.backward()``.

Inside the context, a forward hook on every module with parameters records its input and output,
and a forward hook on the loss module records the model output and targets; constant-padding
modules get a backward that returns a view instead of a copy (:mod:`curvlib.engine.padding`: one
copy fewer per column and padding layer). When the backward
pass starts (a hook on the loss value), the engine

1. builds the messages the active extensions need — columns of the loss-Hessian square root
   (exact, Monte-Carlo or empirical) at the model output — and backpropagates them to every
   recorded layer output with autograd (batched over columns, chunked to fit ``memory_budget``,
   under a budget from gate to gate: :mod:`curvlib.engine.staging`), which works for any graph
   autograd can differentiate (residuals, concatenations, shared layers);
2. runs HesScale's diagonal backpropagation if requested (:mod:`curvlib.engine.diagonal_backprop`);
3. lets each extension turn the messages into per-parameter results.

Quantities that need only the layer inputs (the KFAC input factors) start first, on a side CUDA
stream (``overlap=True``, :mod:`curvlib.engine.side_stream`): their kernels run beside those of the
backward passes, and the caller's stream waits for them when the backward pass ends.

Extensions that need only the plain gradient w.r.t. layer outputs (``BatchGrad``, empirical KFAC)
read it from hooks during the ordinary backward pass, at no extra backward cost.

When samples interact (a BatchNorm layer in train mode), backpropagating one column per class
would mix samples; the engine then backpropagates one column per (class, sample) pair so that
exact quantities stay exact (``batch_coupled="auto"`` detects this).

On exit every hook is removed and every recorded tensor released; results stay on the parameters.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections import OrderedDict
from dataclasses import replace
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import pathways as _pathways
from .batched_rules import BackwardOptions, UnsupportedNode
from .chunk_replay import ChunkReplay, replayable
from .extension import Extension, owned
from .graph_vjp import GraphVJP
from .layers import LayerCall, ModuleCalls, batched_vjp, check_module, direct_parameters, recording_suspended
from .losses import LossCall, check_loss_module
from . import plan_cache as _plan_cache
from .padding import CONSTANT_PAD_TYPES, pad_with_view_backward
from .skeleton import GraphSkeleton
from .side_stream import SideWork
from .staging import Stage, backpropagate, merge_stages, plan_stages, stage_numels, taken

_BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


#: values of ``curvature(column_backward=...)``
COLUMN_BACKWARDS = ("auto", "graph", "autograd")


#: columns per chunk are rounded to multiples of this where that costs no extra chunk: the fused GGN kernel
#: tiles the columns in blocks of 4 (32 output channels per tile) or more
COLUMN_BLOCK = 4


def balanced_chunk(largest: int, total: int) -> int:
    """Columns per chunk for ``total`` columns of which at most ``largest`` fit the memory budget: as many
    chunks as ``largest`` needs, of equal size, rounded up to a multiple of :data:`COLUMN_BLOCK` where
    that still fits (100 columns, 21 fit: 5 chunks of 20 instead of four of 21 and one of 16, whose
    kernels would pad 21 columns to 24).

    >>> balanced_chunk(21, 100), balanced_chunk(12, 100), balanced_chunk(7, 7), balanced_chunk(3, 10)
    (20, 12, 7, 3)
    """
    if largest >= total:
        return total
    even = -(-total // -(-total // largest))
    rounded = -(-even // COLUMN_BLOCK) * COLUMN_BLOCK
    return rounded if rounded <= largest else even


class curvature:
    """Compute curvature quantities (extensions) of ``model`` during ``loss.backward()``.

    Args:
        model: any ``nn.Module``.
        loss_fn: the loss module the forward pass calls as ``loss_fn(model_output, target)``
            (``CrossEntropyLoss``, ``MSELoss``, ``BCEWithLogitsLoss``; ``mean`` or ``sum``).
        *extensions: instances from :mod:`curvlib.extensions`.
        memory_budget: bytes the backpropagated columns and their per-layer intermediates may
            take at once; columns are processed in chunks to stay under it (results identical up
            to round-off), backpropagated from gate to gate where that fits more columns per chunk
            (:mod:`curvlib.engine.staging`). ``None``: all columns at once. The chunk comes from an
            estimate (:class:`ChunkMemory`) that does not count the convolution library's
            workspace: on All-CNN-C (H100) the measured peak was 0.89× a 3.5 GB budget with TF32,
            1.09× in float32.
        batch_coupled: ``"auto"`` (BatchNorm in train mode couples samples), ``True`` or ``False``.
        skip: modules whose parameters are skipped silently (e.g. layers an extension refuses).
        generator: ``torch.Generator`` for the Monte-Carlo samples (``DiagGGNMC``, ``fisher="mc"``), or
            a function ``device -> torch.Generator``; ``None``: torch's default generator.
        overlap: on CUDA, compute the quantities that need only the layer inputs (KFAC input factors)
            on a side stream while the backward passes run (same results; their temporaries then
            coexist with the backward passes'). They are complete when ``backward()`` returns.
        column_backward: how chunks of columns are backpropagated. ``"graph"``: the engine walks the
            autograd graph and applies a batched rule per node (:mod:`curvlib.engine.graph_vjp`;
            raises ``ValueError`` where a node has none); ``"autograd"``: ``torch.func.vmap`` over
            ``torch.autograd.grad`` (:func:`curvlib.engine.layers.batched_vjp`); ``"auto"`` (default):
            the graph walk where every node on the way has a rule, else autograd. Same results up to
            round-off; ``last_column_backward`` says which ran last.
        replay_chunks: on CUDA, with many chunks of columns per step (a tight ``memory_budget``), capture
            the second chunk's column pass (graph walk and layer quantities) as a CUDA graph and replay
            it for the later chunks, where every extension allows it (:mod:`curvlib.engine.chunk_replay`):
            the same device work with a fraction of the host time, for up to one chunk's working set
            of extra reserved memory; ``last_replays`` counts the replayed chunks. Off also with
            ``CURVLIB_CUDA_GRAPHS=0``.

    Precision of the column passes: with ``curvlib.pathways.options(precision="bf16")`` on CUDA (or
    ``backward_options = BackwardOptions(message_dtype=torch.bfloat16)`` on any device) the graph walk
    carries the columns of a float32 model in bfloat16 wherever every extension that reads them accepts
    that (``Extension.low_precision_messages``: the GGN/Fisher diagonals): half the bytes of every pass
    and the data gradients on the bf16 matrix units, with relative errors of about ``1e-2`` in the
    diagonals instead of TF32's ``1e-3``. ``last_message_dtype`` says what the last chunk carried.

    Example::

        with curvlib.curvature(model, loss_fn, DiagGGNExact(), KFACReduce(fisher="mc")):
            loss = loss_fn(model(X), y)
            loss.backward()
        model[0].weight.diag_ggn_exact, model[0].weight.kfac_reduce
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        *extensions: Extension,
        memory_budget: Optional[int] = None,
        batch_coupled="auto",
        skip: Sequence[nn.Module] = (),
        generator=None,
        overlap: bool = True,
        column_backward: str = "auto",
        replay_chunks: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_loss_module(loss_fn)
        for ext in extensions:
            if not isinstance(ext, Extension):
                raise TypeError(f"extensions must be curvlib.extensions instances, got {type(ext).__name__}")
        if memory_budget is not None and (
            isinstance(memory_budget, bool)
            or not isinstance(memory_budget, (int, float))
            or not math.isfinite(memory_budget)
            or memory_budget <= 0
        ):
            raise ValueError(f"memory_budget must be a positive, finite number of bytes or None, got {memory_budget!r}")
        if batch_coupled not in ("auto", True, False):
            raise ValueError(f"batch_coupled must be 'auto', True or False, got {batch_coupled!r}")
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap must be a bool, got {overlap!r}")
        if column_backward not in COLUMN_BACKWARDS:
            raise ValueError(f"column_backward must be one of {COLUMN_BACKWARDS}, got {column_backward!r}")
        if not isinstance(replay_chunks, bool):
            raise TypeError(f"replay_chunks must be a bool, got {replay_chunks!r}")
        self.column_backward = column_backward
        self.replay_chunks = replay_chunks
        self.last_replays = 0  # chunks of the last column passes replayed from a CUDA graph
        self._autograd_passes = 0  # stage passes autograd ran in the current column passes
        self.last_column_backward: Optional[str] = None  # "graph" or "autograd": how the last chunk ran
        # layout and message dtype of the graph walk (curvlib.engine.batched_rules)
        self.backward_options = BackwardOptions()
        self.last_message_dtype: Optional[torch.dtype] = None  # dtype of the last chunk's messages
        self._pass_options = self.backward_options  # those of the column pass running now (_options_for)
        self._plans: dict = {}
        self._skeleton: Optional[GraphSkeleton] = None  # the structure of the graph of the running column passes
        self._plan_cache: dict = {}
        self.overlap = overlap
        self._side: Optional[SideWork] = None
        self.model = model
        self.loss_fn = loss_fn
        self.extensions = list(extensions)
        self.memory_budget = memory_budget
        if generator is not None and not (isinstance(generator, torch.Generator) or callable(generator)):
            raise TypeError(f"generator must be a torch.Generator, a function device -> Generator, or None, "
                            f"got {type(generator).__name__}")
        self.generator = generator
        self.batch_coupled = batch_coupled
        self.skip = set(skip)
        self._handles: List = []
        # hooks on tensors (layer outputs, losses): removed on exit, so that a backward pass after the
        # context computes nothing; their closures hold no strong reference back to the tensors they
        # sit on (a reference cycle through a tensor hook is never collected)
        self._tensor_handles: List = []
        self._calls: List[LayerCall] = []
        self._active = None
        self._in_backward = False
        self._modules: List[nn.Module] = []
        self.last_chunk_size: Optional[int] = None  # columns per chunk in the last backward pass
        self._fused_rows: Optional[int] = None  # see _fused_layer_rows
        self.last_stages = None  # its stages (curvlib.engine.staging.Stage), None for one backward pass

    # ------------------------------------------------------------------------------------------
    # hooks

    def __enter__(self) -> "curvature":
        self._modules = [
            m for m in self.model.modules() if direct_parameters(m) and m not in self.skip
        ]
        if not self._modules:
            raise ValueError("model has no trainable parameters outside the skipped modules")
        for module in self._modules:
            check_module(module)
            for ext in self.extensions:
                ext.check(module)
        for module in self._modules:
            self._handles.append(module.register_forward_hook(self._record_layer))
        for module in self.model.modules():  # padding whose backward is a view (curvlib.engine.padding)
            if isinstance(module, CONSTANT_PAD_TYPES):
                self._handles.append(module.register_forward_hook(pad_with_view_backward))
        self._handles.append(self.loss_fn.register_forward_hook(self._record_loss))
        return self

    def __exit__(self, *exc) -> None:
        self._join_side_work()
        for handle in self._handles + self._tensor_handles:
            handle.remove()
        self._handles.clear()
        self._tensor_handles.clear()
        self._calls = []
        self._modules = []
        self._active = None
        self._grad_output_seen = {}

    def _record_layer(self, module: nn.Module, inputs, output):
        if recording_suspended() or not torch.is_grad_enabled() or not isinstance(output, Tensor) or not inputs:
            return None
        call = LayerCall(module, inputs[0].detach(), output)
        self._calls.append(call)
        if self._grad_output_extensions():
            call_ref = weakref.ref(call)  # the call holds the output: a strong reference would be a cycle
            self._tensor_handles.append(output.register_hook(lambda grad: self._on_grad_output(call_ref(), grad)))
        return None

    def _record_loss(self, loss_fn, inputs, loss):
        if recording_suspended() or not torch.is_grad_enabled() or not loss.requires_grad:
            return None
        output, target = inputs[0], inputs[1]
        # only the calls this loss depends on (a forward pass whose output never reached a loss, e.g.
        # a monitoring pass with gradients enabled, must not count as a second call of each layer)
        skeleton = GraphSkeleton(output) if isinstance(output, Tensor) else None
        graph = {} if skeleton is None else skeleton.index
        calls = [call for call in self._calls if call.node in graph]
        if not calls:
            # the loss module also serves something else (another model): not this context's loss;
            # the recorded calls stay for the loss that does depend on them
            return None
        loss_call = LossCall(loss_fn, output, target)  # without the loss itself: no cycle through its hook
        loss_call.skeleton = skeleton  # the graph's structure: plans carry over between steps (plan_cache)
        self._calls = []
        self._tensor_handles = [h for h in self._tensor_handles if h.hooks_dict_ref() is not None]
        self._tensor_handles.append(loss.register_hook(lambda grad: self._on_backward(loss_call, calls)))
        self._in_backward = False
        return None

    # ------------------------------------------------------------------------------------------
    # computation

    def _grad_output_extensions(self) -> List[Extension]:
        return [e for e in self.extensions if e.message in ("grad_output", "empirical")]

    def _coupled(self) -> bool:
        if self.batch_coupled != "auto":
            return bool(self.batch_coupled)
        return any(isinstance(m, _BATCHNORM_TYPES) and m.training for m in self.model.modules())

    def _groups(self, calls: Sequence[LayerCall], coupled: bool) -> List[ModuleCalls]:
        by_module: "OrderedDict[nn.Module, List[LayerCall]]" = OrderedDict()
        for call in calls:
            by_module.setdefault(call.module, []).append(call)
        return [ModuleCalls(module, group, coupled) for module, group in by_module.items()]

    def _on_backward(self, loss_call: LossCall, calls: List[LayerCall]) -> None:
        if getattr(self, "_computing", False):
            return  # our own differentiation of the loss (its gradient) passes through this hook again
        if self._in_backward:
            raise ValueError(
                "curvlib.curvature: several recorded losses in one backward pass (e.g. a sum of two "
                "loss_fn calls) are not supported; call backward on each loss separately"
            )
        self._in_backward = True
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        self._computing = True
        try:
            self._compute(loss_call, calls)
        finally:
            self._computing = False

    def _end_backward(self) -> None:
        """Queued at the first loss hook: runs when autograd has finished the whole backward pass."""
        self._in_backward = False
        self._join_side_work()
        self._active = None  # release this pass's recorded calls
        self._grad_output_seen = {}

    def _join_side_work(self) -> None:
        """The stream that launched the side work, and the one current now, wait for it."""
        side, self._side = self._side, None
        if side is not None and side.on_stream:
            side.join(torch.cuda.current_stream(side.device))

    def _start_input_factors(self, loss_call: LossCall, groups: Sequence[ModuleCalls]) -> None:
        """Start the KFAC input factors the extensions read, on a side stream (``overlap``); the groups
        keep them for ``finalize``."""
        approxes = sorted({ext.input_factor for ext in self.extensions if ext.input_factor})
        if not approxes:
            return
        self._side = side = SideWork(loss_call.output.device, enabled=self.overlap)
        for group in groups:
            if any(call.kind == "generic" for call in group.calls):
                continue  # no KFAC (extensions refuse such modules unless skipped)
            for approx in approxes:
                side.run(lambda: group.kfac_input(approx), inputs=[call.x for call in group.calls])

    def _compute(self, loss_call: LossCall, calls: List[LayerCall]) -> None:
        coupled = self._coupled()
        groups = self._groups(calls, coupled)
        self._active = (loss_call, groups)
        self._grad_output_seen = {}
        self._skeleton = getattr(loss_call, "skeleton", None)
        self._start_input_factors(loss_call, groups)
        column_extensions: "OrderedDict[object, List[Extension]]" = OrderedDict()
        for ext in self.extensions:
            if ext.message in ("ggn_exact", "ggn_mc"):
                column_extensions.setdefault(ext.message_key(), []).append(ext)
        try:
            for key, extensions in column_extensions.items():
                columns = self._columns(loss_call, key)
                self._run_columns(loss_call, groups, columns, extensions, coupled)
        finally:  # the plans hold the graph's nodes and what the rules derived from them
            self._plans.clear()
            self._plan_cache.clear()
            self._skeleton = None
        for ext in self.extensions:
            if ext.message is None:
                self._finish(ext, groups, [None] * 0)
            elif ext.message in ("hessian_diagonal", "hessian_diagonal_gn"):
                self._run_hessian_diagonal(loss_call, groups, ext)
        if not self._grad_output_extensions():
            self._active = None

    def _generator(self, device: torch.device) -> Optional[torch.Generator]:
        generator = self.generator
        return generator(device) if callable(generator) and not isinstance(generator, torch.Generator) else generator

    def _columns(self, loss_call: LossCall, key) -> Tensor:
        if key == "ggn_exact":
            return loss_call.sqrt_hessian()
        return loss_call.sqrt_hessian_mc(key[1], generator=self._generator(loss_call.output.device))

    def _chunk_size(self, groups: Sequence[ModuleCalls], num_columns: int, coupled: bool, whole: bool,
                    location_grams: bool = False, stages=None) -> int:
        if self.memory_budget is None or whole:
            return num_columns
        need = self._chunk_memory(groups, coupled, location_grams, stages)
        low, high = 0, num_columns  # the largest chunk whose estimated need fits: need() grows with it
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if need(middle) <= self.memory_budget else (low, middle - 1)
        if low < 1:
            warnings.warn(
                f"memory_budget={self.memory_budget} bytes is below one column's estimated need "
                f"({need(1)} bytes); processing one column at a time"
            )
            return 1
        return low

    def _chunk_memory(self, groups, coupled: bool, location_grams: bool, stages) -> "ChunkMemory":
        dtype = self._pass_options.message_dtype
        return ChunkMemory(groups, coupled, location_grams, stages, hand_off=self._hands_off,
                           message_itemsize=None if dtype is None else torch.empty((), dtype=dtype).element_size(),
                           fused_rows=None if coupled else self._fused_rows)

    @staticmethod
    def _fused_layer_rows(extensions, device: torch.device, batch: int) -> Optional[int]:
        """Float32 result rows of the fused kernels that compute every extension's layer quantities on
        ``device`` (1, or ``batch`` where one is per sample), ``None`` where one has no fused kernel or
        the device runs none."""
        from .. import kernels  # here: the kernels are optional

        kinds = {ext.fused_layer_memory for ext in extensions}
        if device.type != "cuda" or not kernels.available() or None in kinds:
            return None
        return batch if "per_sample" in kinds else 1

    def _layer_room(self, need: "ChunkMemory", chunk: int) -> Optional[float]:
        """The pathways' memory budget for the layer quantities of a chunk: what the chunk's messages
        leave of ``memory_budget`` (at most the pathways' own budget), where the chunk was sized with the
        fused kernels' working sets; else ``None`` (the pathways' settings hold)."""
        if self.memory_budget is None or need.fused is None:
            return None
        room = max(0.0, self.memory_budget - chunk * need.per_column - need.kept)
        own = _pathways.settings().memory_budget
        return room if own is None else min(own, room)

    def _setup(self, loss_call: LossCall, groups, num_columns: int, coupled: bool, whole: bool, grams: bool):
        """``(chunk, stages, room)`` of the column passes: columns per chunk, stages (:meth:`_stages`) and
        the pathways' memory budget for the layer quantities (:meth:`_layer_room`; ``None``: their own
        settings). Stored per graph structure and configuration (:mod:`.plan_cache`): a later step of
        the same structure takes them from there."""
        key = self._setup_key(groups, num_columns, coupled, whole, grams)
        stored = None if key is None else _plan_cache.SETUPS.get(key)
        if stored is not None:
            chunk, stages, room = stored
            return chunk, _plan_cache.rebound_stages(stages, self._skeleton), room
        chunk, stages = self._stages(loss_call, groups, num_columns, coupled, whole, grams)
        chunk = balanced_chunk(chunk, num_columns)
        room = None if self.memory_budget is None else self._layer_room(
            self._chunk_memory(groups, coupled, grams, stages), chunk)
        positional = None if key is None else _plan_cache.positional_stages(stages, self._skeleton)
        if positional is not False and key is not None:
            _plan_cache.SETUPS.put(key, (chunk, positional, room))
        return chunk, stages, room

    def _setup_key(self, groups, num_columns: int, coupled: bool, whole: bool, grams: bool) -> Optional[tuple]:
        """What :meth:`_setup`'s results depend on (``None`` where the graph's structure is unknown): the
        graph's structure, the recorded calls (positions, shapes, hyper-parameters) grouped by module, the
        columns, the engine's options and budget and the pathways' settings."""
        skeleton = self._skeleton
        if skeleton is None or skeleton.key is None:
            return None
        calls = []
        for group in groups:
            positions = _plan_cache.edge_positions(skeleton, [call.edge for call in group.calls])
            if positions is None:
                return None
            calls.append(tuple(zip(positions, (call.signature() for call in group.calls))))
        return (skeleton.key, tuple(calls), num_columns, coupled, whole, grams, self._pass_options, self._fused_rows,
                self.memory_budget, self.column_backward, _pathways.generation())

    def _stages(self, loss_call: LossCall, groups, num_columns: int, coupled: bool, whole: bool, grams: bool):
        """``(chunk, stages)``: one backward pass per chunk (``stages=None``) where the columns fit
        ``memory_budget`` that way, else stages from gate to gate (:mod:`curvlib.engine.staging`)
        if they fit more columns per chunk."""
        chunk = self._chunk_size(groups, num_columns, coupled, whole, grams)
        if chunk >= num_columns:
            return chunk, None
        calls = [call for group in groups for call in group.calls]
        stages = plan_stages(loss_call.output, [call.edge for call in calls])
        if len(stages) > 1:
            numels = [call.y.numel() for call in calls]
            group_of = [gi for gi, group in enumerate(groups) for _ in group.calls]
            stages = merge_stages(stages, numels, group_of, self._hands_off)
        if len(stages) < 2:
            return chunk, None
        staged = self._chunk_size(groups, num_columns, coupled, whole, grams, stages)
        return (staged, stages) if staged > chunk else (chunk, None)

    @property
    def _hands_off(self) -> bool:
        """Whether stages after the first release their source once its node has run (the graph walk
        does, :class:`~curvlib.engine.staging.Handoff`; autograd's backward holds it): the memory
        estimate of a stage depends on it."""
        return self.column_backward != "autograd"

    def _vjp(self, output, inputs, vectors, like) -> List[Tensor]:
        """The batched VJP of a stage: ``vectors`` a tensor or a :class:`~curvlib.engine.staging.Handoff`
        (the graph walk releases it after its first node; the autograd fallback takes it again, which
        recomputes it where the walk had taken it)."""
        # one vector (an MC sample, a chunk of one): autograd's own engine, less host time per pass
        single = vectors.shape[0] == 1 and self.column_backward == "auto"
        plan = None if single else self._graph_plan(output, inputs)
        if plan is not None:
            try:
                grads = plan.run(vectors, like)
                self.last_column_backward = "graph"
                return grads
            except UnsupportedNode as error:  # found while running (e.g. batch norm in training mode)
                self._plans[self._plan_key(output, inputs)] = error
                key = self._walk_key(output, inputs)
                if key is not None:  # later steps of this structure: autograd right away
                    _plan_cache.WALKS.put(key, _plan_cache.NO_WALK)
                if self.column_backward == "graph":
                    raise ValueError(f"column_backward='graph': {error}") from None
        vectors = taken(vectors)
        self._autograd_passes += 1
        if isinstance(output, Tensor) and vectors.dtype != output.dtype:
            vectors = vectors.to(output.dtype)  # a later stage after one in a message dtype: autograd's own
        self._engine_backprop = True  # our own backward passes must not trigger gradient-output hooks
        try:
            grads = batched_vjp(output, inputs, vectors, like=like)
            self.last_column_backward = "autograd"
            return grads
        finally:
            self._engine_backprop = False

    def _plan_key(self, output, inputs) -> tuple:
        def key(edge):
            return (id(edge.grad_fn), edge.output_nr) if isinstance(edge, Tensor) else (id(edge.node), edge.output_nr)
        return key(output), tuple(key(edge) for edge in inputs), self._pass_options

    def _options_for(self, extensions: Sequence[Extension], device: torch.device) -> BackwardOptions:
        """The graph walk's options for the columns ``extensions`` read: :attr:`backward_options`, with
        bfloat16 messages where ``pathways`` asks for ``precision="bf16"`` on CUDA, and without a
        message dtype where an extension does not accept one."""
        options = self.backward_options
        dtype = options.message_dtype
        if dtype is None and device.type == "cuda" and _pathways.settings().precision == "bf16":
            dtype = torch.bfloat16
        if dtype is not None and not all(ext.low_precision_messages for ext in extensions):
            dtype = None
        return options if dtype == options.message_dtype else replace(options, message_dtype=dtype)

    def _graph_plan(self, output, inputs) -> Optional[GraphVJP]:
        """The graph walk for this pass (built once per backward pass and reused by every chunk), or
        ``None`` where autograd runs it."""
        if self.column_backward == "autograd":
            return None
        key = self._plan_key(output, inputs)
        if key not in self._plans:
            self._plans[key] = self._walk(output, inputs)
            if self._plans[key] is None and self.column_backward == "graph":
                raise ValueError("column_backward='graph': the graph between the model output and the layers "
                                 "holds a node without a batched rule (curvlib.engine.batched_rules."
                                 "supported_node_names()) or the layer outputs are not gradient edges")
        plan = self._plans[key]
        return plan if isinstance(plan, GraphVJP) else None

    def _walk_key(self, output, inputs) -> Optional[tuple]:
        """The cross-step key of a stage's graph walk (:mod:`.plan_cache`), ``None`` without one."""
        skeleton = self._skeleton
        if skeleton is None or skeleton.key is None:
            return None
        positions = _plan_cache.edge_positions(skeleton, [output, *inputs])
        return None if positions is None else (skeleton.key, positions, self._pass_options)

    def _walk(self, output, inputs) -> Optional[GraphVJP]:
        """The graph walk from ``output`` to ``inputs``: rebound from the walk a step of the same structure
        stored (:mod:`.plan_cache`), else built (and stored); ``None`` where autograd runs the stage."""
        key = self._walk_key(output, inputs)
        stored = None if key is None else _plan_cache.WALKS.get(key)
        if stored is _plan_cache.NO_WALK:
            if self.column_backward != "graph":
                return None  # column_backward="graph" builds it again: the error it raises says why
        elif stored is not None:
            return GraphVJP.rebound(stored, self._skeleton, self._pass_options, self._plan_cache)
        plan = GraphVJP.build(output, inputs, self._pass_options, cache=self._plan_cache)
        if key is not None:
            positional = _plan_cache.NO_WALK if plan is None else plan.positional(self._skeleton)
            if positional is not None:
                _plan_cache.WALKS.put(key, positional)
        return plan

    def _backpropagate(self, loss_call: LossCall, groups, columns: Tensor, stages=None):
        """Yield ``(group, messages)`` for every group: the backpropagated columns at its calls' outputs,
        each group as soon as its messages are complete (``stages=None``: one backward pass)."""
        calls = [call for group in groups for call in group.calls]
        group_calls, position = [], 0
        for group in groups:
            group_calls.append(list(range(position, position + len(group.calls))))
            position += len(group.calls)
        stages = stages or [Stage(calls=list(range(len(calls))))]
        for g, messages in backpropagate(loss_call.output, [c.edge for c in calls], [c.y.shape for c in calls], columns,
                                         stages, group_calls, self._vjp, hand_off=True):
            yield groups[g], messages
            del messages  # not held while the next stage runs (a gate's message is the next stage's source)

    def _run_columns(self, loss_call, groups, columns: Tensor, extensions, coupled: bool) -> None:
        if coupled:  # one column per (class, sample): column c restricted to sample n
            batch = columns.shape[1]
            eye = torch.eye(batch, dtype=columns.dtype, device=columns.device)
            columns = columns[:, None] * eye.reshape(1, batch, batch, *([1] * (columns.dim() - 2)))
        whole = any(ext.needs_all_columns for ext in extensions)
        for group in groups:
            group.columns = columns.shape[0]
        grams = any(ext.keeps_location_gram for ext in extensions)
        self._pass_options = self._options_for(extensions, columns.device)
        self._fused_rows = self._fused_layer_rows(extensions, columns.device, loss_call.output.shape[0])
        chunk, stages, room = self._setup(loss_call, groups, columns.shape[0], coupled, whole, grams)
        self.last_chunk_size = chunk
        self.last_stages = stages
        states = {ext: {group.module: {} for group in groups} for ext in extensions}
        self._autograd_passes = 0

        def run_chunk(block: Tensor) -> None:
            for group, message in self._backpropagate(loss_call, groups, block, stages):
                self.last_message_dtype = message[0].dtype if message else None
                for ext in extensions:
                    ext.accumulate(group, message, states[ext][group.module])
                del message

        starts = range(0, columns.shape[0], chunk)
        replay = ChunkReplay(run_chunk) if self.replay_chunks and replayable(columns, len(starts), extensions) else None
        self.last_replays = 0
        with contextlib.nullcontext() if room is None else _pathways.options(memory_budget=room):
            for index, start in enumerate(starts):
                block = columns[start : start + chunk]
                if coupled:
                    block = block.flatten(0, 1)
                if replay is not None and index == 1:
                    if self._autograd_passes:  # autograd's engine ran a stage: not capturable (chunk_replay)
                        replay = None
                    else:
                        for ext_states in states.values():
                            for state in ext_states.values():
                                owned(state)  # the captured chunk adds into them in place
                if replay is not None and index > 0 and block.shape[0] == chunk and replay(block):
                    self.last_replays += 1
                    continue
                run_chunk(block)
        for ext in extensions:
            self._store(ext, groups, states[ext])

    def _run_hessian_diagonal(self, loss_call: LossCall, groups, ext: Extension) -> None:
        from .diagonal_backprop import backpropagate_diagonal

        watch = {call.node: (gi, ci) for gi, group in enumerate(groups) for ci, call in enumerate(group.calls)}
        found = backpropagate_diagonal(
            loss_call.output,
            loss_call.hessian_diagonal(),
            loss_call.gradient(),
            watch=watch,
            gauss_newton=ext.message == "hessian_diagonal_gn",
        )
        states = {}
        for gi, group in enumerate(groups):
            messages = []
            for ci, call in enumerate(group.calls):
                d = found.get((gi, ci))
                messages.append(torch.zeros_like(call.y) if d is None else d[0])
            state = {}
            ext.accumulate(group, messages, state)
            states[group.module] = state
        self._store(ext, groups, states)

    def _finish(self, ext: Extension, groups, _unused) -> None:
        states = {}
        for group in groups:
            state = {}
            ext.accumulate(group, [None] * len(group.calls), state)
            states[group.module] = state
        self._store(ext, groups, states)

    def _store(self, ext: Extension, groups, states) -> None:
        for group in groups:
            results = ext.finalize(group, states[group.module])
            for name, value in results.items():
                setattr(group.parameters[name], ext.savefield, value)

    # ------------------------------------------------------------------------------------------
    # gradient-output extensions (run inside the ordinary backward pass)

    def _on_grad_output(self, call: Optional[LayerCall], grad: Tensor) -> None:
        if call is None or self._active is None or getattr(self, "_engine_backprop", False):
            return
        loss_call, groups = self._active
        group = next((g for g in groups if call in g.calls), None)
        if group is None:
            return  # a call of another loss's forward pass
        seen = self._grad_output_seen.setdefault(group.module, {})
        seen[id(call)] = grad
        if len(seen) < len(group.calls):
            return  # wait for the other calls of a shared layer
        gradients = [seen[id(c)] for c in group.calls]
        scale = 1.0 / math.sqrt(loss_call.scale)
        for ext in self._grad_output_extensions():
            messages = [g[None] * scale for g in gradients] if ext.message == "empirical" else [g[None] for g in gradients]
            state = {}
            ext.accumulate(group, messages, state)
            for name, value in ext.finalize(group, state).items():
                setattr(group.parameters[name], ext.savefield, value)


class ChunkMemory:
    """Estimated peak bytes of a chunk of ``c`` backpropagated columns: ``ChunkMemory(groups, coupled)(c)``.

    - the message kept at every recorded layer output until the layer's quantities are computed,
      plus the backward pass's transient gradients of the largest output (its gradient and a padded
      or masked copy) — per column, ``N`` times that when samples are coupled (one column per (c, n));
      with ``stages`` (:mod:`curvlib.engine.staging`), what the widest stage holds instead;
    - the largest per-layer working set: the unfolded input (independent of ``c``) and the
      per-(column, sample) weight gradients, computed in chunks of at most
      :data:`curvlib.native.DEFAULT_CHUNK_BYTES`;
    - with ``fused_rows`` (extensions whose layer quantities have fused kernels, on a device that runs
      them), per layer the smaller of that and the fused kernel's working set: its unfolded chunk
      (:data:`curvlib.kernels._host.UNFOLDED_CHUNK_BYTES` at most, counted
      :data:`~curvlib.kernels._host.UNFOLDED_CHUNK_SHARE` times, the share of the pathways' budget it
      may take) and ``fused_rows`` float32 rows of
      the parameters' size (1, or ``N`` for per-sample results);
    - with ``location_grams``, the location Grams the layers that prefer them keep across the chunks
      (:meth:`~curvlib.engine.layers.LayerCall.prefers_location_gram`; GGN diagonals).

    ``message_itemsize``: bytes per message entry where the messages of a float32 model are carried in
    another dtype (:class:`~curvlib.engine.batched_rules.BackwardOptions`). ``hand_off``: the stages
    release their source once its node has run (the graph walk; :func:`~curvlib.engine.staging.stage_numels`).

    Measured on All-CNN-C (batch 128, 100 classes, H200): 4156 and 14556 MiB at 10 and 50 columns per
    chunk (estimates 3905 and 14781), 260 MiB per column (estimate 267).
    """

    def __init__(self, groups: Sequence[ModuleCalls], coupled: bool, location_grams: bool = False, stages=None,
                 message_itemsize: Optional[int] = None, hand_off: bool = False, fused_rows: Optional[int] = None):
        from ..kernels._host import UNFOLDED_CHUNK_BYTES, UNFOLDED_CHUNK_SHARE  # here: imported lazily
        from ..native import DEFAULT_CHUNK_BYTES

        self.gradient_cap = DEFAULT_CHUNK_BYTES
        calls = [call for group in groups for call in group.calls]
        itemsize = calls[0].y.element_size() if calls else 4
        batch = calls[0].y.shape[0] if calls else 1
        outputs = [call.y.numel() for call in calls] or [0]
        if stages is None:
            per_column = sum(outputs) + 2 * max(outputs)
        else:
            group_of = [gi for gi, group in enumerate(groups) for _ in group.calls]
            per_column = max(stage_numels(stages, outputs, group_of, hand_off))
        message_itemsize = itemsize if message_itemsize is None or itemsize != 4 else message_itemsize
        self.per_column = per_column * message_itemsize * (batch if coupled else 1)
        self.layers = []  # (unfolded input bytes, weight-gradient bytes per column) per recorded call
        for group in groups:
            params = sum(p.numel() for p in group.parameters.values())
            for call in group.calls:
                self.layers.append((_unfolded_numel(call) * itemsize, batch * params * itemsize))
        # a fused kernel's working set instead where that is smaller: its unfolded chunk and its float32
        # result rows (1, or N per sample); the engine then keeps the pathway choice within the room
        # the messages leave (curvature._layer_room), so no pathway needing more is taken where one fits.
        # The chunk counts UNFOLDED_CHUNK_SHARE times: a room of that much keeps it at its full size
        self.fused = None if fused_rows is None else [
            UNFOLDED_CHUNK_SHARE * min(unfolded, UNFOLDED_CHUNK_BYTES) + fused_rows * gradients // (batch * itemsize) * 4
            for unfolded, gradients in self.layers]
        self.kept = 0  # location Grams held from the first chunk to the last
        if location_grams and not coupled:
            self.kept = sum(group.calls[0].location_gram_bytes() for group in groups
                            if len(group.calls) == 1 and group.calls[0].prefers_location_gram(group.columns))

    def __call__(self, columns: int) -> int:
        working = [unfolded + min(self.gradient_cap, columns * gradients) for unfolded, gradients in self.layers]
        if self.fused is not None:
            working = [min(w, fused) for w, fused in zip(working, self.fused)]
        return columns * self.per_column + max(working, default=0) + self.kept


def _unfolded_numel(call: LayerCall) -> int:
    """Entries of the unfolded input ``[N, G, D, O]`` of a convolution or Linear call (0 otherwise)."""
    if call.kind not in ("conv", "linear") or "weight" not in call.parameters:
        return 0
    weight = call.module.weight
    out_channels = weight.shape[1] * call.groups if call.hyper["transposed"] else weight.shape[0]
    # G·D·(N·O) with D = weight.numel / C_out and N·O = y.numel / C_out
    return (weight.numel() // out_channels) * call.groups * (call.y.numel() // out_channels)
