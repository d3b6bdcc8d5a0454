"""The search space: one knob per weighted layer and per activation edge the spec lets vary.

HAGO's rule sets each knob's choices: an edge's widest width is the smaller of
what its producer can emit and what its consumer accepts, and float is always
a choice. A weight knob picks the layer's weight bits from the spec, or 0 for
float (the layer then runs in FP32 and its neighbours meet it at a float
boundary). Activation knobs exist only where the spec lists more than one
activation width (the T4's int4/int8, say); on a device with one width the
edge simply follows its consumer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..annotate import AnnotateConfig
from ..graph import Graph
from ..hwspec import HardwareSpec

Point = tuple[int, ...]


@dataclass(frozen=True)
class Knob:
    name: str  # node name (weight knob) or edge name (activation knob)
    kind: str  # "weight" | "activation"
    choices: tuple[int, ...]  # ascending; 0 = float


@dataclass(frozen=True)
class SearchSpace:
    knobs: tuple[Knob, ...]

    @classmethod
    def from_graph(cls, graph: Graph, spec: HardwareSpec) -> "SearchSpace":
        knobs = []
        wbits = tuple(sorted({min(b, spec.weights.range_bits or b) for b in spec.bits.weight}))
        for node in graph.nodes:
            if node.weighted and spec.descriptors(node.kind):
                knobs.append(Knob(node.name, "weight", (0, *wbits)))
        if len(spec.bits.activation) > 1:
            for node in graph.nodes:
                if node.weighted and spec.descriptors(node.kind):
                    knobs.append(Knob(node.inputs[0], "activation", tuple(spec.bits.activation)))
        return cls(tuple(knobs))

    @property
    def size(self) -> int:
        """How many strategies the space holds (3**50 for EfficientNet-Lite0: not an index-sized
        int, so this is not ``__len__``, which Python caps at sys.maxsize)."""
        n = 1
        for k in self.knobs:
            n *= len(k.choices)
        return n

    def size_text(self) -> str:
        """``size`` for people: exact up to a million, then 3 significant digits (``7.18e+23``)."""
        return str(self.size) if self.size <= 10**6 else f"{float(self.size):.3g}"

    def key(self, point: Point) -> str:
        """Canonical text of a point: the log's key, stable across runs."""
        return ",".join(f"{k.kind[0]}:{k.name}={b}" for k, b in zip(self.knobs, point))

    def widest(self) -> Point:
        return tuple(max(k.choices) for k in self.knobs)

    def narrowest(self) -> Point:
        """Every layer integer at its lowest width: the fastest build on most devices."""
        return tuple(min(c for c in k.choices if c) if k.kind == "weight" else min(k.choices) for k in self.knobs)

    def all_float(self) -> Point:
        return tuple(0 if k.kind == "weight" else max(k.choices) for k in self.knobs)

    def config(self, point: Point) -> AnnotateConfig:
        weight, floats, edges = {}, set(), {}
        for k, b in zip(self.knobs, point):
            if k.kind == "weight":
                if b == 0:
                    floats.add(k.name)
                else:
                    weight[k.name] = b
            else:
                edges[k.name] = b
        return AnnotateConfig(node_weight_bits=weight, float_ops=frozenset(floats), edge_bits=edges)

    def neighbours(self, point: Point, direction: int) -> list[Point]:
        """Points one step more (+1) or less (-1) precise on a single knob; float is the top step."""
        out = []
        for i, k in enumerate(self.knobs):
            order = list(k.choices)
            if k.kind == "weight":
                order = [c for c in order if c] + [0]  # 4 < 8 < float
            j = order.index(point[i]) + direction
            if 0 <= j < len(order):
                p = list(point)
                p[i] = order[j]
                out.append(tuple(p))
        return out
