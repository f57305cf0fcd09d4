"""The result of :func:`curvlib.profile.profile_model`: rows, hot-layer report, table, JSON and plot.

A :class:`Profile` holds one :class:`ProfileRow` per (layer call, operation, pathway). Rows of
pathways that do not apply have ``status="n/a"``; ``"oom"`` and ``"error"`` record failures. The
reports look at one pathway at a time (``"auto"`` by default when it was profiled; ``"best"`` takes
the fastest measured pathway of each (layer, operation)):

- :meth:`Profile.hot_layers` — the (layer, operation) pairs, or layers, that dominate time or memory;
- :meth:`Profile.table` — the same as a Markdown table with time and memory shares;
- :meth:`Profile.compare` — per (layer, operation) the time of every pathway side by side;
- :meth:`Profile.plot` — bar charts of the top entries by time, with their extra memory;
- :meth:`Profile.to_json` / :meth:`Profile.save` / :meth:`Profile.load`.

Units: seconds, bytes, FLOPs (a multiply-add counts 2). Shares of memory are of the summed extra
memory of the entries shown; a layer's memory is the largest of its operations' (peaks do not add).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional, Sequence

__all__ = ["ProfileRow", "HotSpot", "Profile"]

MIB = 2**20


@dataclass
class ProfileRow:
    """One (layer call, operation, pathway) of a profile.

    Attributes:
        layer, module: layer name and module type.
        op: profiled operation (:data:`curvlib.profile.operations.OPERATIONS`); ``function``: the
            :mod:`curvlib.functional` function it calls.
        pathway: requested pathway; ``chosen``: the candidate that ran (for ``"auto"`` the one it chose).
        status: ``"ok"``, ``"n/a"`` (pathway does not apply), ``"oom"`` or ``"error"``; ``message`` says why.
        input_shape, output_shape, weight_shape: as the layer saw them (weight in functional layout).
        time_s, min_s: median and minimum of ``repeats`` timed calls.
        extra_bytes: measured extra peak memory; ``memory_method`` how (:mod:`curvlib.profile.memory`).
        result_bytes: size of the result.
        flops, min_bytes: the operation's FLOPs and minimum bytes whatever the pathway
            (:func:`curvlib.cost.minimum`: the count of the standard unfold-and-multiply algorithm, each
            operand moved once). Not a proven lower bound: a pathway that exploits structure (a
            simplified network of a Linear's GGN diagonal, say) can do less, and its efficiency exceed 1.
        pathway_flops: FLOPs the pathway performs (the planned path for tensor networks).
        largest_intermediate_bytes: largest intermediate of the pathway (plan, or the analytic model).
        bytes_moved: the analytic traffic of the pathway (minimum bytes plus its intermediates).
        ideal_s: roofline time of ``flops`` and ``min_bytes`` on the ceilings.
        estimated_s: the cost model's prediction for the pathway (traffic, per-call overheads).
        efficiency: ``ideal_s / time_s``, comparable across pathways (above 1: the pathway beats the
            roofline of the standard algorithm, by doing less work).
        pathway_efficiency: roofline time of the work the pathway performs (``pathway_flops``,
            ``min_bytes``) over ``time_s``: how well the pathway uses the device for its own work.
        flops_per_s, bytes_per_s: achieved useful rates ``flops / time_s`` and ``min_bytes / time_s``.
    """

    layer: str
    module: str
    op: str
    function: str
    pathway: str
    chosen: Optional[str] = None
    status: str = "ok"
    message: str = ""
    input_shape: List[int] = field(default_factory=list)
    output_shape: List[int] = field(default_factory=list)
    weight_shape: List[int] = field(default_factory=list)
    time_s: Optional[float] = None
    min_s: Optional[float] = None
    repeats: int = 0
    extra_bytes: Optional[float] = None
    memory_method: Optional[str] = None
    result_bytes: Optional[float] = None
    flops: Optional[float] = None
    min_bytes: Optional[float] = None
    pathway_flops: Optional[float] = None
    largest_intermediate_bytes: Optional[float] = None
    bytes_moved: Optional[float] = None
    ideal_s: Optional[float] = None
    estimated_s: Optional[float] = None
    efficiency: Optional[float] = None
    pathway_efficiency: Optional[float] = None
    flops_per_s: Optional[float] = None
    bytes_per_s: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class HotSpot:
    """One entry of :meth:`Profile.hot_layers`: a (layer, operation) pair, or a layer (``op=None``)."""

    layer: str
    op: Optional[str]
    module: str
    time_s: float
    time_share: float
    extra_bytes: float
    memory_share: float
    pathway: Optional[str] = None


def _fmt_bytes(value: Optional[float]) -> str:
    """Bytes with a binary prefix: ``"3.0 KiB"``, ``"1.50 GiB"``."""
    if value is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def _fmt_count(value: Optional[float]) -> str:
    """A count with a decimal prefix: ``"27.6 M"``."""
    if value is None:
        return "n/a"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f}"


def _fmt_time_ms(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value * 1e3:.3f}"


def _fmt_percent(value: Optional[float]) -> str:
    """A fraction as a percentage, two significant digits below 10 %."""
    if value is None:
        return "n/a"
    percent = 100 * value
    return f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Profile:
    """Per-layer profile of a model's curvature operations (see the module docstring).

    Attributes:
        rows: list of :class:`ProfileRow`.
        device: device string the operations ran on.
        ceilings: ``{"flops_per_s", "bytes_per_s", "call_overhead_s", "measured"}`` used for ideal times.
        settings: how it was measured (columns, repeats, warm-up, dtype, threads, torch version …).
        skipped: ``[(layer, reason)]`` of layers that could not be profiled.
    """

    def __init__(self, rows: Sequence[ProfileRow], device: str, ceilings: dict, settings: Optional[dict] = None,
                 skipped: Optional[Sequence] = None):
        self.rows: List[ProfileRow] = list(rows)
        self.device = device
        self.ceilings = dict(ceilings)
        self.settings = dict(settings or {})
        self.skipped = [tuple(s) for s in (skipped or ())]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        ok = sum(r.ok for r in self.rows)
        return f"Profile({len(self.rows)} rows, {ok} measured, {len(self.layers())} layers, device={self.device!r})"

    # ------------------------------------------------------------------------------------------
    # selection

    def layers(self) -> List[str]:
        """Layer names in call order."""
        return list(dict.fromkeys(r.layer for r in self.rows))

    def pathways(self) -> List[str]:
        """Pathways with at least one measured row."""
        return list(dict.fromkeys(r.pathway for r in self.rows if r.ok))

    def resolve_pathway(self, pathway: Optional[str] = None) -> str:
        """``pathway``, or for ``None`` the default: ``"auto"`` if it was profiled, else ``"best"``."""
        if pathway is None:
            return "auto" if "auto" in self.pathways() else "best"
        return pathway

    def select(self, pathway: Optional[str] = None) -> List[ProfileRow]:
        """Measured rows of one pathway; ``"best"``: the fastest measured row of each (layer, operation);
        ``None``: ``"auto"`` if it was profiled, else ``"best"``."""
        pathway = self.resolve_pathway(pathway)
        if pathway == "best":
            best: Dict[tuple, ProfileRow] = {}
            for r in self.rows:
                key = (r.layer, r.op)
                if r.ok and (key not in best or r.time_s < best[key].time_s):
                    best[key] = r
            return list(best.values())
        available = self.pathways()
        if pathway not in available:
            raise ValueError(f"pathway must be 'best' or one measured in this profile {available}, got {pathway!r}")
        return [r for r in self.rows if r.ok and r.pathway == pathway]

    # ------------------------------------------------------------------------------------------
    # hot-layer report

    def hot_layers(self, k: Optional[int] = 5, by: str = "time", pathway: Optional[str] = None, per: str = "operation") -> List[HotSpot]:
        """The ``k`` entries that dominate ``by`` (``"time"`` or ``"memory"``), largest first.

        Args:
            k: how many (``None``: all).
            by: ``"time"`` (median time) or ``"memory"`` (extra peak memory).
            pathway: which pathway's rows (``"best"``: the fastest per (layer, operation); ``None``:
                ``"auto"`` if profiled, else ``"best"``).
            per: ``"operation"`` ((layer, operation) pairs) or ``"layer"`` (time summed over the
                operations, memory the largest of them).

        Returns:
            :class:`HotSpot` list; shares are fractions of the total over all entries (not only the top ``k``).
        """
        if by not in ("time", "memory"):
            raise ValueError(f"by must be 'time' or 'memory', got {by!r}")
        if per not in ("operation", "layer"):
            raise ValueError(f"per must be 'operation' or 'layer', got {per!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be None or a positive int, got {k!r}")
        rows = self.select(pathway)
        if per == "operation":
            entries = [(r.layer, r.op, r.module, r.time_s, r.extra_bytes or 0.0, r.chosen or r.pathway) for r in rows]
        else:
            grouped: Dict[str, list] = {}
            for r in rows:
                g = grouped.setdefault(r.layer, [r.module, 0.0, 0.0])
                g[1] += r.time_s
                g[2] = max(g[2], r.extra_bytes or 0.0)
            entries = [(layer, None, m, t, b, None) for layer, (m, t, b) in grouped.items()]
        total_time = sum(e[3] for e in entries) or 1.0
        total_memory = sum(e[4] for e in entries) or 1.0
        key = (lambda e: e[3]) if by == "time" else (lambda e: (e[4], e[3]))
        entries.sort(key=key, reverse=True)
        return [
            HotSpot(layer, op, module, t, t / total_time, b, b / total_memory, chosen)
            for layer, op, module, t, b, chosen in entries[:k]
        ]

    def table(self, k: Optional[int] = None, by: str = "time", pathway: Optional[str] = None) -> str:
        """Markdown table of (layer, operation) entries of one pathway, sorted by ``by``, with shares.

        Columns: layer, module, operation, pathway that ran, time [ms], share of time, extra peak
        memory, share of memory, FLOPs, largest intermediate, efficiency (ideal / measured).
        """
        rows = {(r.layer, r.op): r for r in self.select(pathway)}
        spots = self.hot_layers(k, by=by, pathway=pathway)
        body = []
        for s in spots:
            r = rows[(s.layer, s.op)]
            body.append([
                r.layer, r.module, r.op, r.chosen or r.pathway, _fmt_time_ms(r.time_s), f"{100 * s.time_share:.1f}%",
                _fmt_bytes(r.extra_bytes), f"{100 * s.memory_share:.1f}%",
                _fmt_count(r.flops), _fmt_bytes(r.largest_intermediate_bytes),
                _fmt_percent(r.efficiency),
            ])
        header = ["layer", "module", "op", "ran", "time [ms]", "time %", "extra memory", "memory %", "FLOPs",
                  "largest intermediate", "efficiency"]
        return _markdown(header, body, [False] * 4 + [True] * 7)

    def compare(self, k: Optional[int] = None) -> str:
        """Markdown table: per (layer, operation) the median time [ms] of every pathway (``*`` fastest,
        ``n/a`` not applicable, ``oom``/``error`` failed), ordered by the fastest time, largest first."""
        pathways = list(dict.fromkeys(r.pathway for r in self.rows))
        cells: Dict[tuple, Dict[str, ProfileRow]] = {}
        for r in self.rows:
            cells.setdefault((r.layer, r.op), {})[r.pathway] = r
        fastest = {key: min((r.time_s for r in v.values() if r.ok), default=None) for key, v in cells.items()}
        order = sorted(cells, key=lambda key: -(fastest[key] or 0.0))
        body = []
        for key in order[:k]:
            row = [key[0], key[1]]
            for p in pathways:
                r = cells[key].get(p)
                if r is None:
                    row.append("")
                elif not r.ok:
                    row.append(r.status)
                else:
                    star = "*" if r.time_s == fastest[key] else ""
                    row.append(_fmt_time_ms(r.time_s) + star)
            auto = cells[key].get("auto")
            row.append(auto.chosen if auto is not None and auto.ok and auto.chosen else "")
            body.append(row)
        return _markdown(["layer", "op", *pathways, "auto chose"], body, [False, False] + [True] * len(pathways) + [False])

    def summary(self, k: int = 5, pathway: Optional[str] = None) -> str:
        """A few lines: device, ceilings, totals of ``pathway`` and its top-``k`` (layer, operation) by time."""
        pathway = self.resolve_pathway(pathway)
        rows = self.select(pathway)
        total = sum(r.time_s for r in rows)
        c = self.ceilings
        lines = [
            f"device {self.device}: {c.get('flops_per_s', math.nan) / 1e9:.1f} GFLOP/s, "
            f"{c.get('bytes_per_s', math.nan) / 1e9:.1f} GB/s ({'measured' if c.get('measured') else 'nominal'})",
            f"{len(self.layers())} layers, pathway {pathway!r}: {total * 1e3:.3f} ms in all",
        ]
        for s in self.hot_layers(k, pathway=pathway):
            lines.append(f"  {s.layer:>20} {s.op:<22} {s.time_s * 1e3:9.3f} ms {100 * s.time_share:5.1f}%  "
                         f"{_fmt_bytes(s.extra_bytes):>10}")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------
    # serialisation

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "ceilings": self.ceilings,
            "settings": self.settings,
            "skipped": [list(s) for s in self.skipped],
            "rows": [asdict(r) for r in self.rows],
        }

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path) -> str:
        """Write :meth:`to_json` to ``path`` (directories created); returns the path."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as handle:
            handle.write(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        if not isinstance(data, dict) or "rows" not in data:
            raise ValueError("data must be a dict as written by Profile.to_dict (with a 'rows' list)")
        names = {f.name for f in fields(ProfileRow)}
        rows = [ProfileRow(**{k: v for k, v in row.items() if k in names}) for row in data["rows"]]
        return cls(rows, data.get("device", "?"), data.get("ceilings", {}), data.get("settings", {}), data.get("skipped", []))

    @classmethod
    def load(cls, path) -> "Profile":
        with open(os.fspath(path)) as handle:
            return cls.from_dict(json.load(handle))

    # ------------------------------------------------------------------------------------------
    # plot

    def plot(self, path, k: int = 10, pathway: Optional[str] = None, title: Optional[str] = None) -> str:
        """Bar charts of the top-``k`` (layer, operation) by time (left, efficiency annotated) and their
        extra peak memory (right), written to ``path`` (PNG, PDF, SVG … by extension). Needs matplotlib.

        Returns the path.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as error:  # pragma: no cover - depends on the installation
            raise ImportError("Profile.plot needs matplotlib (pip install matplotlib); the table and JSON do not") from error
        pathway = self.resolve_pathway(pathway)
        spots = self.hot_layers(k, by="time", pathway=pathway)
        if not spots:
            raise ValueError(f"no measured rows for pathway {pathway!r} to plot")
        rows = {(r.layer, r.op): r for r in self.select(pathway)}
        labels = [f"{s.layer} · {s.op}" + (f" [{s.pathway}]" if s.pathway and s.pathway != pathway else "") for s in spots]
        times = [s.time_s * 1e3 for s in spots]
        memory = [s.extra_bytes / MIB for s in spots]
        figure = Figure(figsize=(11, 1.2 + 0.4 * len(spots)), layout="constrained")
        FigureCanvasAgg(figure)  # attaches an Agg canvas: no pyplot, no global backend change
        left, right = figure.subplots(1, 2, sharey=True, width_ratios=[3, 2])
        positions = list(range(len(spots)))[::-1]  # largest on top
        left.barh(positions, times, color="tab:blue")
        left.set_yticks(positions, labels, fontsize=8)
        left.set_xlabel("median time [ms]")
        for pos, spot, t in zip(positions, spots, times):
            eff = rows[(spot.layer, spot.op)].efficiency
            text = f" {100 * spot.time_share:.0f}%" + ("" if eff is None else f", eff. {_fmt_percent(eff)}")
            left.text(t, pos, text, va="center", fontsize=7)
        left.margins(x=0.25)
        right.barh(positions, memory, color="tab:orange")
        right.set_xlabel("extra peak memory [MiB]")
        method = self.settings.get("memory_method")
        figure.suptitle(title or f"hot layers on {self.device} (pathway {pathway!r}"
                        + (f", memory: {method})" if method else ")"))
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        figure.savefig(path, dpi=120)
        return path
