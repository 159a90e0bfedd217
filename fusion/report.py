"""What flashfuse did to each captured graph: fusions, near-misses with reasons, graph breaks, code
before/after, and a picture of the rewritten regions."""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
from typing import Any

import torch
import torch.fx as fx

_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+)(?:, in [^\n]*)?\n?([^\n]*)')


def _innermost_frame(node: fx.Node | None) -> tuple[str, str]:
    """(`file:line`, source text of that line) of the innermost frame of a node's stack trace."""
    if node is None:
        return "", ""
    trace = node.meta.get("stack_trace") or ""
    found = _FRAME_RE.findall(trace)
    if not found:
        return "", ""
    path, line, text = found[-1]
    # The line after `File ...` is the code; a following `File` line means it was left out.
    text = "" if text.lstrip().startswith("File ") else text.strip()
    return f"{path}:{line}", text


def module_of(node: fx.Node | None) -> str:
    """The qualified name of the innermost nn.Module a node was traced in (`transformer.h.1.attn`;
    '' for the top module or a plain function), from Dynamo's `nn_module_stack`."""
    if node is None:
        return ""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"^L\['[^']*'\]", "", path)               # the frame's `self`
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)  # ._modules['h'] -> .h
    path = re.sub(r"\[['\"]?([^'\"\]]*)['\"]?\]", r".\1", path)  # [0] / ['x'] -> .0 / .x
    return path.strip(".")


def source_of(node: fx.Node | None) -> str:
    """The user's `file:line` for an FX node, from the stack trace Dynamo recorded ('' if none)."""
    return _innermost_frame(node)[0]


def short_source(src: str) -> str:
    """`/long/path/model.py:41` -> `model.py:41`."""
    return re.split(r"[\\/]", src)[-1] if src else ""


def at_source(node: fx.Node | None) -> str:
    """` at model.py:41` for a node with the user's stack trace, else ''."""
    src = short_source(source_of(node)) if node is not None else ""
    return f" at {src}" if src else ""


def jsonable(value: Any) -> Any:
    """A JSON-serialisable form of a pass's detail value (dtypes, sympy expressions, tensors -> text)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no inf/nan
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Size):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not value.is_meta and type(value) is torch.Tensor:
            return jsonable(value.item())
        return f"tensor(shape={list(value.shape)}, dtype={value.dtype})"
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return str(value)


def _where(source: str, module: str) -> str:
    where = f" at {short_source(source)}" if source else ""
    return where + (f" in {module}" if module else "")


@dataclasses.dataclass
class Match:
    """One rewrite: which pass, where in the user's code, and the specialization in words."""

    fusion: str
    source: str
    description: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    graph: int = 0
    nodes: list[str] = dataclasses.field(default_factory=list)
    code: str = ""  # the user's source line at `source`
    module: str = ""  # the nn.Module it was found in, e.g. "transformer.h.1.attn"

    def __str__(self) -> str:
        return f"{self.fusion}{_where(self.source, self.module)}: {self.description}"

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


@dataclasses.dataclass
class NearMiss:
    """A subgraph that looked like a fusion but was left alone, and the precise reason why."""

    fusion: str
    source: str
    reason: str
    graph: int = 0
    node: str = ""
    code: str = ""  # the user's source line at `source`
    module: str = ""  # the nn.Module it was found in

    def __str__(self) -> str:
        return f"{self.fusion}{_where(self.source, self.module)}: not fused: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


@dataclasses.dataclass
class GraphBreak:
    """Where and why Dynamo split the user's program. `graph` is the captured graph that ends at the
    break, or None where nothing was captured before it (e.g. a break on a function's first line)."""

    reason: str
    source: str = ""
    code: str = ""
    graph: int | None = 0

    @property
    def summary(self) -> str:
        """Dynamo's headline and its `Explanation:` line, from its (often multi-line) reason."""
        lines = [line.strip() for line in self.reason.splitlines() if line.strip()]
        if not lines:
            return ""
        explanation = next((line[len("Explanation:"):].strip() for line in lines
                            if line.startswith("Explanation:")), "")
        return f"{lines[0]}: {explanation}" if explanation else lines[0]

    def __str__(self) -> str:
        where = f" at {short_source(self.source)}" if self.source else ""
        after = f"after graph {self.graph}" if self.graph is not None else "with no graph before it"
        return f"{after}{where}: {self.summary}"

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


@dataclasses.dataclass
class GraphReport:
    index: int
    matches: list[Match] = dataclasses.field(default_factory=list)
    near_misses: list[NearMiss] = dataclasses.field(default_factory=list)
    code_before: str = ""
    code_after: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    # The FX graphs themselves, for drawing; not part of to_dict().
    graph_before: Any = dataclasses.field(default=None, repr=False)
    graph_after: Any = dataclasses.field(default=None, repr=False)
    # The normalized (ATen) graph before the rewrite passes, when known (explain records it): the
    # same level as graph_after, so the rewritten regions are exactly the nodes that differ.
    graph_normalized: Any = dataclasses.field(default=None, repr=False)

    def add_match(self, fusion: str, node: fx.Node | None, description: str, **details: Any) -> Match:
        source, code = _innermost_frame(node)
        m = Match(fusion, source, description, details, self.index,
                  [node.name] if node is not None else [], code, module_of(node))
        self.matches.append(m)
        return m

    def add_near_miss(self, fusion: str, node: fx.Node | None, reason: str) -> NearMiss:
        source, code = _innermost_frame(node)
        nm = NearMiss(fusion, source, reason, self.index, node.name if node is not None else "", code,
                      module_of(node))
        self.near_misses.append(nm)
        return nm

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "matches": [m.to_dict() for m in self.matches],
            "near_misses": [n.to_dict() for n in self.near_misses],
            "code_before": self.code_before,
            "code_after": self.code_after,
            "notes": list(self.notes),
        }


class Report:
    """Everything flashfuse did during one compilation (one or more captured graphs).

    `print(report)` is a summary; `report.format(code=True)` adds each graph's code before and after
    the passes. Programs use `matches`, `near_misses`, `graph_breaks`, `count(name)`, `counts()`,
    `to_dict()` (JSON-serialisable) and `draw(path)`.
    """

    def __init__(self) -> None:
        self.graphs: list[GraphReport] = []
        self.graph_breaks: list[GraphBreak] = []
        self.config: dict[str, Any] = {}  # the backend configuration explain ran the passes with

    def new_graph(self) -> GraphReport:
        g = GraphReport(index=len(self.graphs))
        self.graphs.append(g)
        return g

    @property
    def matches(self) -> list[Match]:
        return [m for g in self.graphs for m in g.matches]

    @property
    def near_misses(self) -> list[NearMiss]:
        return [n for g in self.graphs for n in g.near_misses]

    @property
    def notes(self) -> list[str]:
        return [f"graph {g.index}: {note}" for g in self.graphs for note in g.notes]

    def count(self, fusion: str | None = None) -> int:
        """Number of rewrites by the pass `fusion` (all passes when None)."""
        return sum(1 for m in self.matches if fusion is None or m.fusion == fusion)

    def counts(self) -> dict[str, int]:
        """Rewrites per fusion name, for every fusion that matched at least once."""
        out: dict[str, int] = {}
        for m in self.matches:
            out[m.fusion] = out.get(m.fusion, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphs": [g.to_dict() for g in self.graphs],
            "graph_breaks": [b.to_dict() for b in self.graph_breaks],
            "counts": self.counts(),
            "matches": [m.to_dict() for m in self.matches],
            "near_misses": [n.to_dict() for n in self.near_misses],
            "config": jsonable(self.config),
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def format(self, code: bool = False) -> str:
        """The readable summary; with `code=True` also each graph's code before and after the passes."""
        lines = [f"flashfuse report: {len(self.graphs)} graph(s), {len(self.matches)} fusion(s), "
                 f"{len(self.near_misses)} near-miss(es), {len(self.graph_breaks)} graph break(s)"]
        # A break ends graph k: print it after graph k. A break with no graph before it comes
        # before the graph that follows the previous break.
        after: dict[int, list[GraphBreak]] = {}
        before: dict[int, list[GraphBreak]] = {}
        previous = -1
        for b in self.graph_breaks:
            if b.graph is not None:
                after.setdefault(b.graph, []).append(b)
                previous = b.graph
            else:
                before.setdefault(previous + 1, []).append(b)
        for g in self.graphs:
            lines += [f"graph break {b}" for b in before.get(g.index, [])]
            lines.append(f"graph {g.index}:")
            for m in g.matches:
                lines.append(f"  fused     {m}")
                if m.code:
                    lines.append(f"              {m.code}")
            for n in g.near_misses:
                lines.append(f"  near-miss {n}")
                if n.code:
                    lines.append(f"              {n.code}")
            for note in g.notes:
                lines.append(f"  note      {note}")
            if not g.matches and not g.near_misses:
                lines.append("  nothing fused")
            if code:
                lines.append("  code before the passes:")
                lines.extend("    " + line for line in g.code_before.strip("\n").splitlines())
                lines.append("  code after the passes:")
                lines.extend("    " + line for line in g.code_after.strip("\n").splitlines())
            lines += [f"  graph break {b}" for b in after.get(g.index, [])]
        shown = {g.index for g in self.graphs}
        for index in sorted(set(before) | set(after)):  # breaks of graphs not in this report
            if index not in shown:
                lines += [f"graph break {b}" for b in before.get(index, []) + after.get(index, [])]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return (f"<flashfuse.Report: {len(self.graphs)} graph(s), counts={self.counts()}, "
                f"{len(self.near_misses)} near-miss(es), {len(self.graph_breaks)} graph break(s)>")

    def draw(self, path: str | os.PathLike) -> str:
        """Write a picture of the rewritten regions of every graph, before and after the passes.

        The format follows the extension: `.svg`, `.png`, `.pdf` (these need graphviz's `dot` program)
        or `.dot` (the graph description itself, needs only pydot)."""
        return _draw_report(self, os.fspath(path))


# Reports of compilations in flight: explain() pushes one, the backend writes into the innermost.
_active: list[Report] = []
# Every graph the backend compiled in this process (most recent last), for users who did not call explain.
last_reports: list[Report] = []


def current_report() -> Report:
    if _active:
        return _active[-1]
    r = Report()
    last_reports.append(r)
    del last_reports[:-16]
    return r


# ---- drawing (graphviz through pydot) ----

_DRAW_FORMATS = ("svg", "png", "pdf", "dot")
_MAX_DRAWN_NODES = 120  # a region bigger than this is cut, with a note, so the picture stays readable


class DrawingToolMissing(ImportError, RuntimeError):
    """pydot or graphviz's `dot` program is not installed (an ImportError: a missing optional dependency)."""


def _import_pydot():
    try:
        import pydot
    except ImportError as exc:
        raise DrawingToolMissing(
            "flashfuse: Report.draw needs pydot (and graphviz's `dot` program for .svg/.png/.pdf): "
            "pip install pydot  (or pip install 'flashfuse[draw]'), and e.g. apt-get install graphviz"
        ) from exc
    return pydot


def _node_key(node: fx.Node) -> tuple[str, str, str]:
    return node.name, node.op, str(node.target)


def _rewritten_regions(g: GraphReport) -> tuple[Any, list[fx.Node], Any, list[fx.Node], bool]:
    """(before graph, its replaced nodes, after graph, its new nodes, exact).

    Exact when the normalized graph before the passes is known: then the regions are the nodes the
    passes removed and added. Otherwise the graphs are at different levels (torch vs ATen) and every
    computing node is shown."""
    before = g.graph_normalized if g.graph_normalized is not None else g.graph_before
    after = g.graph_after
    if before is None or after is None:
        return before, [], after, [], False
    computing = ("call_function", "call_method", "call_module")
    if g.graph_normalized is None:
        return (before, [n for n in before.graph.nodes if n.op in computing],
                after, [n for n in after.graph.nodes if n.op in computing], False)
    before_keys = {_node_key(n) for n in before.graph.nodes}
    after_keys = {_node_key(n) for n in after.graph.nodes}
    removed = [n for n in before.graph.nodes if n.op in computing and _node_key(n) not in after_keys]
    added = [n for n in after.graph.nodes if n.op in computing and _node_key(n) not in before_keys]
    return before, removed, after, added, True


def _label(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_function":
        name = getattr(target, "__name__", None) or str(target)
        if isinstance(target, torch._ops.OpOverload):
            name = f"{target.namespace}.{target._schema.name.split('::')[-1]}"
            if target._overloadname != "default":
                name += f".{target._overloadname}"
        what = name
    elif node.op in ("call_method", "call_module", "get_attr"):
        what = f"{node.op} {target}"
    else:
        what = node.op
    val = node.meta.get("val", node.meta.get("example_value"))
    shape = ""
    if isinstance(val, torch.Tensor):
        shape = f"\\n{list(val.shape)} {str(val.dtype).replace('torch.', '')}"
    src = short_source(source_of(node))
    return f"{node.name}\\n{what}{shape}" + (f"\\n{src}" if src else "")


def _add_region(pydot: Any, parent: Any, prefix: str, region: list[fx.Node], color: str) -> None:
    """Draw `region` (highlighted) with its direct inputs and users (grey) into `parent`."""
    region = region[:_MAX_DRAWN_NODES]
    members = set(region)
    context: list[fx.Node] = []
    for n in region:
        for other in list(n.all_input_nodes) + list(n.users):
            if other not in members and other not in context:
                context.append(other)
    drawn = list(region) + context

    def nid(n: fx.Node) -> str:
        return f'"{prefix}_{n.name}"'

    for n in context:
        parent.add_node(pydot.Node(nid(n), label=f'"{_label(n)}"', shape="box", style="dashed",
                                   color="gray50", fontcolor="gray40", fontsize="9"))
    for n in region:
        parent.add_node(pydot.Node(nid(n), label=f'"{_label(n)}"', shape="box", style="filled",
                                   fillcolor=color, fontsize="10"))
    for n in drawn:
        for user in n.users:
            if (user in members or user in context) and (n in members or user in members):
                parent.add_edge(pydot.Edge(nid(n), nid(user)))


def _draw_report(report: Report, path: str) -> str:
    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    if ext not in _DRAW_FORMATS:
        raise ValueError(f"flashfuse: Report.draw({path!r}): the extension picks the format; "
                         f"expected one of {['.' + f for f in _DRAW_FORMATS]}")
    pydot = _import_pydot()
    dot = pydot.Dot("flashfuse", graph_type="digraph", rankdir="TB", fontsize="12",
                    label='"flashfuse: rewritten regions, before and after the passes"', labelloc="t")
    drawn_any = False
    for g in report.graphs:
        if not g.matches:
            continue
        before, removed, after, added, exact = _rewritten_regions(g)
        if before is None or after is None:
            continue
        drawn_any = True
        fused = ", ".join(str(m) for m in g.matches)
        outer = pydot.Cluster(f"graph{g.index}", label=f'"graph {g.index}: {_escape(fused)}"',
                              style="rounded", color="gray30")
        note = "" if exact else " (whole graph: normalized graph not recorded)"
        before_cluster = pydot.Cluster(f"graph{g.index}_before", label=f'"before{note}"', color="firebrick")
        after_cluster = pydot.Cluster(f"graph{g.index}_after", label='"after"', color="forestgreen")
        _add_region(pydot, before_cluster, f"g{g.index}b", removed, "mistyrose")
        _add_region(pydot, after_cluster, f"g{g.index}a", added, "palegreen")
        # given in this order, dot places "before" on the left (the other order came out reversed)
        outer.add_subgraph(after_cluster)
        outer.add_subgraph(before_cluster)
        dot.add_subgraph(outer)
    if not drawn_any:
        dot.add_node(pydot.Node("nothing", label='"nothing was fused"', shape="plaintext"))
    if ext == "dot":
        with open(path, "w") as f:
            f.write(dot.to_string())
        return path
    try:
        dot.write(path, format=ext)
    except FileNotFoundError as exc:  # pydot runs graphviz's `dot`; say so instead of a bare errno
        raise DrawingToolMissing(
            f"flashfuse: Report.draw({path!r}) needs graphviz's `dot` program, which was not found "
            f"(install graphviz, e.g. apt-get install graphviz), or draw to a .dot file instead"
        ) from exc
    return path


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
