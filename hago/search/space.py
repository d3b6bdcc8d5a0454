"""The search space: one knob per weighted layer and per activation edge the spec lets vary.

HAGO's rule sets each knob's choices: an edge's widest width is the smaller of
what its producer can emit and what its consumer accepts, and float is always
a choice. A weight knob picks the layer's precision: its integer weight bits
from the spec, :data:`BF16` (16) where the spec declares bf16 for the layer's
kind and the backend's kernels take it, or 0 for fp32 (the layer then runs in
float and its neighbours meet it at a float boundary). Precision rises
int4 < int8 < bf16 < fp32, so a search that restores accuracy step by step
tries bf16 before fp32. Activation knobs exist only where the spec lists more than one
activation width (the T4's int4/int8, say); on a device with one width the
edge simply follows its consumer.

With ``multipoint=True`` a dense or one-group conv2d layer also gets, for each
integer width below its widest, the choice "that width plus extra points"
(:data:`MULTIPOINT` + bits; :mod:`hago.multipoint`): the same integer kernel
with about a tenth more output channels, which buys back accuracy for less
weight than the next width. It sits between its width and the next
(4 < 4+points < 8), so a search restoring accuracy weighs it against raising
the layer's bits, each priced by measured latency and realized bytes. Only on
specs with one activation width: the points are fitted to the layer's
calibrated input scale.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..annotate import AnnotateConfig
from ..graph import Graph
from ..hwspec import HardwareSpec

Point = tuple[int, ...]
#: the weight-knob choice that puts a layer in bf16 (bf16 weights and activations, float32 accumulation)
BF16 = 16
#: a weight-knob choice ``MULTIPOINT + b``: ``b``-bit weights with multipoint extra points (104: 4-bit + points)
MULTIPOINT = 100


def is_multipoint(choice: int) -> bool:
    return choice > MULTIPOINT


def choice_bits(choice: int) -> int:
    """The integer weight width of a weight-knob choice (0 for fp32, 16 for bf16)."""
    return choice - MULTIPOINT if is_multipoint(choice) else choice


def choice_label(choice: int) -> str:
    """How a point's label shows a choice: ``F`` fp32, ``B`` bf16, ``4+`` 4-bit with extra points, else bits."""
    if choice == 0:
        return "F"
    if choice == BF16:
        return "B"
    return f"{choice_bits(choice)}+" if is_multipoint(choice) else str(choice)


def _integer(choices) -> tuple[int, ...]:
    """The plain integer widths (no bf16, no multipoint)."""
    return tuple(c for c in choices if c and c != BF16 and not is_multipoint(c))


def takes_points(node) -> bool:
    """Whether multipoint extra points fit ``node``: a dense or a one-group NCHW conv2d."""
    if node.kind == "dense":
        return True
    if node.kind != "conv2d":
        return False
    a = node.call.attrs
    return int(a.groups) == 1 and str(a.data_layout) == "NCHW" and str(a.kernel_layout) == "OIHW"


@dataclass(frozen=True)
class Knob:
    name: str  # node name (weight knob) or edge name (activation knob)
    kind: str  # "weight" | "activation"
    choices: tuple[int, ...]  # ascending; 0 = float


@dataclass(frozen=True)
class SearchSpace:
    knobs: tuple[Knob, ...]

    @classmethod
    def from_graph(cls, graph: Graph, spec: HardwareSpec, multipoint: bool = False) -> "SearchSpace":
        from ..backends import backend_of

        backend = backend_of(spec)
        knobs = []
        wbits = tuple(sorted({min(b, spec.weights.range_bits or b) for b in spec.bits.weight}))
        for node in graph.nodes:
            if not node.weighted:
                continue
            ints = wbits if spec.descriptors(node.kind) else ()
            bf16 = (BF16,) if (spec.bf16_descriptor(node.kind) is not None
                               and backend.bf16_node_problem(node) is None) else ()
            points = (tuple(MULTIPOINT + b for b in ints[:-1]) if multipoint and takes_points(node)
                      and len(spec.bits.activation) == 1 else ())
            if ints or bf16:
                knobs.append(Knob(node.name, "weight", (0, *ints, *bf16, *points)))
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
        """Every layer integer at its widest width (bf16 for a layer with no integer choice)."""
        return tuple(max(_integer(k.choices) or k.choices) if k.kind == "weight" else max(k.choices)
                     for k in self.knobs)

    def narrowest(self) -> Point:
        """Every layer integer at its lowest width: the fastest build on most devices."""
        return tuple(min(_integer(k.choices) or [c for c in k.choices if c]) if k.kind == "weight"
                     else min(k.choices) for k in self.knobs)

    def all_float(self) -> Point:
        return tuple(0 if k.kind == "weight" else max(k.choices) for k in self.knobs)

    def all_bf16(self) -> Point | None:
        """Every layer that can run in bf16 in bf16, the others integer (widest); None without a bf16 choice."""
        if not any(BF16 in k.choices for k in self.knobs):
            return None
        return tuple(BF16 if BF16 in k.choices else w for k, w in zip(self.knobs, self.widest()))

    def config(self, point: Point) -> AnnotateConfig:
        weight, floats, bf16, edges = {}, set(), set(), {}
        for k, b in zip(self.knobs, point):
            if k.kind == "weight":
                if b == 0:
                    floats.add(k.name)
                elif b == BF16:
                    bf16.add(k.name)
                else:
                    weight[k.name] = choice_bits(b)
            else:
                edges[k.name] = b
        return AnnotateConfig(node_weight_bits=weight, float_ops=frozenset(floats), bf16_ops=frozenset(bf16),
                              edge_bits=edges)

    def raises(self, point: Point) -> list[Point]:
        """Points with one knob moved to any more precise choice (int8 -> bf16 and int8 -> fp32 alike).

        What a search restoring accuracy weighs: the cheapest of them that
        restores enough wins, which on a CPU whose bf16 is slower than its
        fp32 is fp32, not the next step up.
        """
        out = []
        for i, k in enumerate(self.knobs):
            order = self._order(k)
            for c in order[order.index(point[i]) + 1:]:
                p = list(point)
                p[i] = c
                out.append(tuple(p))
        return out

    @staticmethod
    def _order(k: Knob) -> list[int]:
        """``k``'s choices from least to most precise: 4 < 4+points < 8 < bf16 < fp32 for a weight knob."""
        if k.kind != "weight":
            return list(k.choices)
        ints = sorted((c for c in k.choices if c and c != BF16), key=lambda c: (choice_bits(c), is_multipoint(c)))
        return ints + [c for c in k.choices if c == BF16] + [0]

    def neighbours(self, point: Point, direction: int) -> list[Point]:
        """Points one step more (+1) or less (-1) precise on a single knob; float is the top step."""
        out = []
        for i, k in enumerate(self.knobs):
            order = self._order(k)
            j = order.index(point[i]) + direction
            if 0 <= j < len(order):
                p = list(point)
                p[i] = order[j]
                out.append(tuple(p))
        return out
