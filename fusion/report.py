"""What flashfuse did to each captured graph: fusions, near-misses with reasons, code before/after."""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch.fx as fx


def source_of(node: fx.Node | None) -> str:
    """The user's `file:line` for an FX node, from the stack trace Dynamo recorded ('' if none)."""
    if node is None:
        return ""
    trace = node.meta.get("stack_trace") or ""
    found = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if not found:
        return ""
    path, line = found[-1]
    return f"{path}:{line}"


def short_source(src: str) -> str:
    """`/long/path/model.py:41` -> `model.py:41`."""
    return src.rsplit("/", 1)[-1] if src else ""


@dataclasses.dataclass
class Match:
    """One rewrite: which pass, where in the user's code, and the specialization in words."""

    fusion: str
    source: str
    description: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    graph: int = 0
    nodes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        where = f" at {short_source(self.source)}" if self.source else ""
        return f"{self.fusion}{where}: {self.description}"


@dataclasses.dataclass
class NearMiss:
    """A subgraph that looked like a fusion but was left alone, and the precise reason why."""

    fusion: str
    source: str
    reason: str
    graph: int = 0
    node: str = ""

    def __str__(self) -> str:
        where = f" at {short_source(self.source)}" if self.source else ""
        return f"{self.fusion}{where}: not fused: {self.reason}"


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

    def add_match(self, fusion: str, node: fx.Node | None, description: str, **details: Any) -> Match:
        m = Match(fusion, source_of(node), description, details, self.index,
                  [node.name] if node is not None else [])
        self.matches.append(m)
        return m

    def add_near_miss(self, fusion: str, node: fx.Node | None, reason: str) -> NearMiss:
        nm = NearMiss(fusion, source_of(node), reason, self.index, node.name if node is not None else "")
        self.near_misses.append(nm)
        return nm


class Report:
    """Everything flashfuse did during one compilation (one or more captured graphs)."""

    def __init__(self) -> None:
        self.graphs: list[GraphReport] = []
        self.graph_breaks: list[str] = []

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

    def count(self, fusion: str | None = None) -> int:
        """Number of rewrites by the pass `fusion` (all passes when None)."""
        return sum(1 for m in self.matches if fusion is None or m.fusion == fusion)

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphs": [
                {
                    "index": g.index,
                    "matches": [dataclasses.asdict(m) for m in g.matches],
                    "near_misses": [dataclasses.asdict(n) for n in g.near_misses],
                    "code_before": g.code_before,
                    "code_after": g.code_after,
                    "notes": list(g.notes),
                }
                for g in self.graphs
            ],
            "graph_breaks": list(self.graph_breaks),
            "counts": {name: self.count(name) for name in sorted({m.fusion for m in self.matches})},
        }

    def __str__(self) -> str:
        lines = [f"flashfuse report: {len(self.graphs)} graph(s), {len(self.matches)} fusion(s), "
                 f"{len(self.near_misses)} near-miss(es), {len(self.graph_breaks)} graph break(s)"]
        for g in self.graphs:
            lines.append(f"graph {g.index}:")
            for m in g.matches:
                lines.append(f"  fused     {m}")
            for n in g.near_misses:
                lines.append(f"  near-miss {n}")
            for note in g.notes:
                lines.append(f"  note      {note}")
            if not g.matches and not g.near_misses:
                lines.append("  nothing fused")
        for b in self.graph_breaks:
            lines.append(f"graph break: {b}")
        return "\n".join(lines)

    __repr__ = __str__


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
