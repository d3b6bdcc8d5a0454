"""Weight bytes of a search point without realizing it: what lets the algorithms steer by a size budget.

The truth is :func:`hago.weight_bytes.weight_bytes` of the candidate's
realized program (what ``hago compile`` reports, kept in the search log per
candidate). Realizing every point an algorithm merely considers would cost a
realize each, so :class:`SizeModel` predicts instead: the widest point's
realized bytes plus, per weight knob, what moving that one knob to each of
its other choices adds or saves, each measured once on a realized program.

Why measured rather than computed from shapes: the backend decides the
packing per layer, and not always as the bit width suggests. On x86 VNNI a
4-bit depthwise conv and a 4-bit conv with at most 4 input channels keep
int8 weights (no ``vpdpbusd`` block to feed nibbles), int8 weights are
padded to the kernel's 16x4 blocks, and a float layer may hold a re-laid-out
copy. A per-knob difference of two realized programs includes all of that.

The prediction assumes the knobs add up, which holds when a layer's stored
weight depends only on its own choice. A neighbour's choice can change a
layer's kernel (its input's signedness, say), so the algorithms use the
prediction to rank and filter the points they consider, and the engine
checks the realized count of every candidate it evaluates: only that
decides whether a build fits the budget.

Activation knobs are taken to change no weight bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from .space import Point, SearchSpace


class SizeModel:
    """``bytes(point) = base + sum_i delta_i[point[i]]``, measured against ``base_point`` (the widest)."""

    def __init__(self, base_point: Point, base_bytes: int, deltas: list[dict[int, int]]):
        self.base_point, self.base_bytes, self.deltas = tuple(base_point), int(base_bytes), deltas

    @classmethod
    def measure(cls, space: SearchSpace, realized_bytes: Callable[[Point], int]) -> "SizeModel":
        """One realized count for the widest point, one per other choice of each weight knob.

        ``realized_bytes`` is the engine's (logged, so a resumed search does not realize them again).
        """
        base = space.widest()
        base_bytes = realized_bytes(base)
        deltas = []
        for i, knob in enumerate(space.knobs):
            delta = {c: 0 for c in knob.choices}
            if knob.kind == "weight":
                for c in knob.choices:
                    if c != base[i]:
                        delta[c] = realized_bytes(base[:i] + (c,) + base[i + 1:]) - base_bytes
            deltas.append(delta)
        return cls(base, base_bytes, deltas)

    def __call__(self, point: Point) -> int:
        return self.base_bytes + sum(d[c] for d, c in zip(self.deltas, point))

    def layer_bytes(self, i: int) -> dict[int, int]:
        """Knob ``i``'s choices -> the bytes each adds against the widest point (for reports and tests)."""
        return dict(self.deltas[i])
