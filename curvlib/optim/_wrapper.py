"""The machinery every curvature optimizer shares: hooks on curvature steps only, statistics, state.

:class:`CurvatureOptimizer` wraps a ``torch.optim.Optimizer`` (the *base*). It is itself an
``Optimizer`` whose ``param_groups`` and ``state`` *are* the base's, so learning-rate schedulers,
``GradScaler`` and gradient clipping act on the base as usual. A training loop is unchanged::

    opt.zero_grad()
    loss = loss_fn(model(X), y)     # loss_fn: the module given to the optimizer
    loss.backward()
    opt.step()                      # statistics → preconditioned gradients → base.step()

**When hooks run.** A step is a *curvature step* when its statistics are due
(:meth:`CurvatureOptimizer._is_update_step`). The engine's hooks (:class:`curvlib.curvature`) are
installed only while the *next* step is a curvature step: at construction, at the end of the
``step()`` before a curvature step, and by ``zero_grad()`` if missing; they are removed at the
start of that curvature step's ``step()``. On every other step no hook is installed and nothing
beyond the preconditioning itself runs. This works whether ``zero_grad()`` is called before the
forward pass or after ``step()``, and needs no ``with`` block:

- ``zero_grad()`` drops statistics collected since the last step (a step skipped by
  ``GradScaler``, an exception between forward and ``step()``), so stale statistics never mix in;
- several backward passes before one ``step()`` (gradient accumulation) are averaged, which for
  equal micro-batches of a ``mean`` loss equals the statistics of the whole batch (the engine
  reads the loss module's inputs, so scaling the loss value afterwards changes nothing);
- forward passes under ``torch.no_grad()`` (evaluation) are ignored, and forward passes whose
  output never reaches a loss do not count;
- a curvature step for which no statistics arrived (the loss was not computed by ``loss_fn``)
  warns once and keeps the previous statistics.

**Monte-Carlo sampling** uses the optimizer's own ``torch.Generator`` (seeded with ``seed`` plus the
rank), never the global one: sampling does not perturb the user's random stream, and its state is
part of ``state_dict()``, so resuming from a checkpoint continues bit for bit.

**Distributed data-parallel**: with ``distributed="auto"`` and an initialised process group of
more than one rank, the statistics of each curvature step are averaged over the ranks
(:mod:`curvlib.optim.distributed`) before they are used, so every rank takes the same step.

Subclasses implement :meth:`_extensions` (what to compute), :meth:`_templates` (the statistics'
keys and shapes), :meth:`_flatten` (engine results → statistics), :meth:`_absorb` (update running
statistics), :meth:`_transform` (turn gradients into the update direction, in place) and
:meth:`_extra_state` / :meth:`_load_extra_state`.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..engine.context import curvature
from ..engine.extension import Extension
from ..engine.losses import check_loss_module
from . import distributed as _dist


class _Context(curvature):
    """:class:`curvlib.curvature` drawing its Monte-Carlo samples from the optimizer's generator
    (a function of the device, created lazily by the optimizer).

    When a backward pass starts, before the engine starts the KFAC input factors (on a side stream,
    :mod:`curvlib.engine.side_stream`), the recorded inputs are cast to float32 (autocast records
    float16 ones) and ``before_backward()`` runs (the sink files the previous passes' statistics: those
    are complete, each pass joined its side work when it ended).
    """

    def __init__(self, *args, generator_for, before_backward=None, **kwargs):
        super().__init__(*args, generator=generator_for, **kwargs)
        self._before_backward = before_backward

    def _start_input_factors(self, loss_call, groups) -> None:
        for group in groups:
            for call in group.calls:
                call.x = _upcast(call.x)
        if self._before_backward is not None:
            self._before_backward()
        super()._start_input_factors(loss_call, groups)


def _weak_method(method):
    """A function calling the bound ``method`` through a weak reference (hooks must not keep the optimizer alive)."""
    reference = weakref.WeakMethod(method)

    def call(*args, **kwargs):
        target = reference()
        if target is None:
            raise RuntimeError("the curvlib optimizer that installed these hooks no longer exists")
        return target(*args, **kwargs)

    return call


def _exit_context(holder: list) -> None:
    """Finalizer of an optimizer: remove the hooks it left installed."""
    if holder and holder[0] is not None:
        context, holder[0] = holder[0], None
        context.__exit__(None, None, None)


def _upcast(tensor):
    """Half-precision tensors as float32 (statistics of an autocast forward pass would overflow in float16)."""
    if tensor is not None and tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def _collecting(extension: Extension, sink) -> Extension:
    """A copy of ``extension`` that hands its results to ``sink(module, results)`` instead of the parameters.

    Under ``autocast`` the recorded layer inputs and backpropagated messages are float16/bfloat16;
    they are cast to float32 first: products like ``Σ s sᵀ`` of loss-scaled gradients overflow
    float16 (a ``GradScaler`` scale of 2¹⁶ squared is far beyond its range).
    """
    cls = type(extension)

    def accumulate(self, group, messages, state):
        for call in group.calls:
            call.x = _upcast(call.x)
        return cls.accumulate(self, group, [_upcast(m) for m in messages], state)

    def finalize(self, group, state):
        for call in group.calls:
            call.x = _upcast(call.x)
        sink(group.module, cls.finalize(self, group, state))
        return {}  # nothing is stored on the parameters

    collecting = type(
        cls.__name__, (cls,), {"accumulate": accumulate, "finalize": finalize, "__module__": cls.__module__}
    )
    copy = collecting.__new__(collecting)
    copy.__dict__.update(extension.__dict__)
    return copy


class _Sink:
    """Sums of the statistics of each backward pass since the last reset, and how many passes added to each.

    Results arrive during a backward pass and are filed (flattened, summed) only later, by :meth:`drain`:
    until the pass ends, the KFAC input factors may still be being computed on the engine's side stream,
    and an operation on them in the caller's stream would race with it.
    """

    def __init__(self, flatten):
        self._flatten = flatten
        self._pending: List[tuple] = []
        self.sums: Dict[str, Tensor] = {}
        self.counts: Dict[str, int] = {}

    def __call__(self, module: nn.Module, results: Dict) -> None:
        self._pending.append((module, results))

    def drain(self) -> None:
        """File the results received so far (call when their backward pass has ended)."""
        pending, self._pending = self._pending, []
        for module, results in pending:
            self._file(module, results)

    def _file(self, module: nn.Module, results: Dict) -> None:
        for key, value in self._flatten(module, results).items():
            value = value.detach()
            if key in self.sums:
                self.sums[key] = self.sums[key] + value
                self.counts[key] += 1
            else:
                self.sums[key] = value
                self.counts[key] = 1

    def clear(self) -> None:
        self._pending = []
        self.sums, self.counts = {}, {}

    def take(self) -> Dict[str, Tensor]:
        """The statistics averaged over the backward passes, and a reset."""
        self.drain()
        result = {k: v if self.counts[k] == 1 else v / self.counts[k] for k, v in self.sums.items()}
        self.clear()
        return result


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_number(name: str, value, minimum: float = 0.0, maximum: float = math.inf, open_max: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or value > maximum or (open_max and value == maximum):
        bracket = ")" if open_max else "]"
        raise ValueError(f"{name} must be in [{minimum}, {maximum}{bracket}, got {value!r}")
    return float(value)


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base of the optimizers in :mod:`curvlib.optim`: wraps ``base``, collects curvature, preconditions.

    Args:
        model: the ``nn.Module`` being trained (also a ``DistributedDataParallel`` wrapper).
        loss_fn: the loss module the training loop calls as ``loss_fn(model(X), y)``
            (``CrossEntropyLoss``, ``MSELoss``, ``BCEWithLogitsLoss``).
        base: the optimizer that takes the step with the preconditioned gradients.
        update_every: statistics are collected on steps ``0, update_every, 2·update_every, …``.
        skip: modules (or their names in ``model.named_modules()``) whose parameters keep the
            base optimizer's plain update.
        memory_budget, batch_coupled: passed to :class:`curvlib.curvature`.
        distributed: ``"auto"`` (average over ranks when a process group of more than one rank
            is initialised), ``True`` or ``False``; ``process_group``: the group (default world).
        seed: seed of the Monte-Carlo generator (the rank is added under ``torch.distributed``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        base: torch.optim.Optimizer,
        *,
        update_every: int = 1,
        skip: Iterable = (),
        memory_budget: Optional[int] = None,
        batch_coupled="auto",
        distributed="auto",
        process_group=None,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(loss_fn, nn.Module):
            raise TypeError(f"loss_fn must be a loss module (e.g. torch.nn.CrossEntropyLoss()), got {type(loss_fn).__name__}")
        check_loss_module(loss_fn)
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer (SGD, Adam, …), got {type(base).__name__}")
        if isinstance(base, CurvatureOptimizer):
            raise TypeError(f"base must be a plain torch.optim.Optimizer, not another curvature optimizer ({type(base).__name__})")
        self.update_every = _check_int("update_every", update_every)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.base = base
        self.memory_budget = memory_budget
        self.batch_coupled = batch_coupled
        self.process_group = process_group
        self.distributed = _dist.resolve_distributed(distributed, process_group)
        self._rank = torch.distributed.get_rank(process_group) if self.distributed else 0
        self._seed = seed
        self._skip_requested = self._resolve_skip(skip)
        # Optimizer.__init__ is not called: it would build param_groups and state of its own, while
        # ours are the base optimizer's (properties below); only the hook registries are needed.
        self.defaults = base.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._steps = 0
        # the installed context lives in a one-element list that a finalizer can reach without the
        # optimizer: an optimizer dropped by the user removes its hooks when it is collected
        self._holder: List[Optional[_Context]] = [None]
        weakref.finalize(self, _exit_context, self._holder)
        self._sink = _Sink(_weak_method(self._flatten))
        self._generators: Dict[str, torch.Generator] = {}
        self._warned_no_statistics = False
        self._module_names = {module: name for name, module in model.named_modules()}

    # ------------------------------------------------------------------------------------------
    # the base optimizer's state, shared

    @property
    def param_groups(self) -> List[dict]:
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.base.param_groups = value

    @property
    def state(self):
        return self.base.state

    @state.setter
    def state(self, value):
        self.base.state = value

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the base optimizer; the curvature bookkeeping follows the new parameters."""
        self.base.add_param_group(param_group)
        self._track()
        self._rearm()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()}, base={type(self.base).__name__})"

    def _describe(self) -> str:
        return f"update_every={self.update_every}"

    # ------------------------------------------------------------------------------------------
    # helpers for subclasses

    def _resolve_skip(self, skip) -> set:
        if isinstance(skip, (nn.Module, str)):
            skip = [skip]
        modules = set()
        for item in skip:
            if isinstance(item, str):
                try:
                    item = self.model.get_submodule(item)
                except AttributeError as error:
                    raise ValueError(f"skip: model has no submodule named {item!r}") from error
            if not isinstance(item, nn.Module):
                raise TypeError(f"skip must hold modules or module names, got {type(item).__name__}")
            modules.add(item)
        return modules

    def _optimized_parameters(self) -> set:
        return {p for group in self.param_groups for p in group["params"]}

    def _parameter_lrs(self) -> Dict[Tensor, float]:
        return {p: float(group["lr"]) for group in self.param_groups for p in group["params"]}

    def _name(self, module: nn.Module) -> str:
        return self._module_names.get(module, f"<{type(module).__name__}>")

    def _generator_for(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._seed + self._rank)
            self._generators[key] = generator
        return self._generators[key]

    # ------------------------------------------------------------------------------------------
    # what subclasses provide

    def _track(self) -> None:
        """(Re)compute the modules whose parameters get curvature and ``self._engine_skip``."""
        raise NotImplementedError

    def _extensions(self) -> Sequence[Extension]:
        raise NotImplementedError

    def _templates(self) -> Dict[str, Tuple[Tensor, bool]]:
        """``{key: (tensor like the statistic, symmetric?)}`` for every statistic any step may produce."""
        raise NotImplementedError

    def _flatten(self, module: nn.Module, results: Dict) -> Dict[str, Tensor]:
        raise NotImplementedError

    def _prepare(self, statistics: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Hook before averaging over ranks (e.g. undo a gradient scaler's factor)."""
        return statistics

    def _absorb(self, statistics: Dict[str, Tensor], step: int) -> None:
        raise NotImplementedError

    def _transform(self, step: int) -> None:
        raise NotImplementedError

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def _is_update_step(self, step: int) -> bool:
        return step % self.update_every == 0

    # ------------------------------------------------------------------------------------------
    # hooks: installed only while the next step is a curvature step

    def _arm(self) -> None:
        self._disarm()
        self._sink.clear()
        extensions = [_collecting(ext, self._sink) for ext in self._extensions()]
        context = _Context(
            self.model,
            self.loss_fn,
            *extensions,
            memory_budget=self.memory_budget,
            batch_coupled=self.batch_coupled,
            skip=list(self._engine_skip),
            generator_for=_weak_method(self._generator_for),
            before_backward=self._sink.drain,
        )
        context.__enter__()
        self._holder[0] = context

    def _disarm(self) -> None:
        _exit_context(self._holder)

    @property
    def _context(self) -> Optional[_Context]:
        return self._holder[0]

    def _rearm(self) -> None:
        self._disarm()
        if self._is_update_step(self._steps):
            self._arm()

    @property
    def hooks_active(self) -> bool:
        """Whether the engine's hooks are installed (only while the next step is a curvature step)."""
        return self._context is not None

    def remove_hooks(self) -> None:
        """Remove the engine's hooks now (e.g. after training); a later ``zero_grad()``/``step()`` re-installs them when due."""
        self._disarm()
        self._sink.clear()

    # ------------------------------------------------------------------------------------------
    # the optimizer interface

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's ``zero_grad``; drops statistics collected since the last step."""
        if self._is_update_step(self._steps):
            if self._context is None:
                self._arm()
            else:
                self._sink.clear()
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        """Absorb this step's statistics (curvature steps only), precondition the gradients, ``base.step()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step = self._steps
        if self._is_update_step(step):
            self._disarm()
            statistics = self._prepare(self._sink.take())
            if self.distributed:
                templates = self._templates()
                statistics = _dist.all_reduce_mean(
                    statistics,
                    keys=list(templates),
                    like={k: v[0] for k, v in templates.items()},
                    symmetric=[k for k, v in templates.items() if v[1]],
                    process_group=self.process_group,
                )
            if statistics:
                with torch.no_grad():
                    self._absorb(statistics, step)
            elif not self._warned_no_statistics:
                self._warned_no_statistics = True
                warnings.warn(
                    f"{type(self).__name__}: no curvature statistics arrived for step {step}; the loss must be "
                    f"computed by the loss_fn given to the optimizer ({type(self.loss_fn).__name__}) with gradients "
                    "enabled, between step() calls. The previous statistics are kept."
                )
        with torch.no_grad():
            self._transform(step)
        self.base.step()
        self._steps += 1
        if self._is_update_step(self._steps):
            self._arm()
        return loss

    @property
    def steps(self) -> int:
        """Number of ``step()`` calls so far (the index of the next step)."""
        return self._steps

    def communication_bytes(self) -> Dict[str, int]:
        """Bytes each module adds to the one ``all_reduce`` of a curvature step under ``torch.distributed``.

        Independent of the batch size and the number of ranks. KFAC: symmetric factors travel as
        upper triangles, ``G·(D(D+1)/2 + E(E+1)/2)`` entries (``+ G`` with a bias) of the factor
        dtype per layer; diagonal methods: one entry per parameter. Plus one presence flag per
        statistic. A ring all-reduce moves about twice the buffer per rank.
        """
        result: Dict[str, int] = {}
        for key, (like, symmetric) in self._templates().items():
            name = key.rsplit("/", 1)[0] if "/" in key else ""
            result[name] = result.get(name, 0) + _dist.packed_numel(like, symmetric) * like.element_size()
        return result

    def state_dict(self) -> dict:
        """``{"base": base.state_dict(), "curvature": {...}}``: everything needed to resume bit for bit."""
        return {
            "base": self.base.state_dict(),
            "curvature": {
                "steps": self._steps,
                "generators": {key: g.get_state() for key, g in self._generators.items()},
                **self._extra_state(),
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (into an optimizer built the same way on the same model)."""
        if not isinstance(state_dict, dict) or "base" not in state_dict or "curvature" not in state_dict:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict expects the dict of {type(self).__name__}.state_dict() "
                "with keys 'base' and 'curvature'"
            )
        self.base.load_state_dict(state_dict["base"])
        state = state_dict["curvature"]
        self._steps = int(state["steps"])
        self._generators = {}
        for key, generator_state in state.get("generators", {}).items():
            generator = torch.Generator(device=key)
            generator.set_state(generator_state)
            self._generators[key] = generator
        self._load_extra_state(state)
        self._rearm()
