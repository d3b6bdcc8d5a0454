"""The strategy: what hago decided for one graph on one device, as JSON.

A strategy is the unit the search explores and the file ``hago compile
--strategy`` replays. It records, per op, integer or float and the descriptor
chosen from the spec; per edge, the bit width, the dtype and the calibrated
range with the resulting scale and zero point. It is keyed by the structural
hash of the FP32 graph so a strategy is never applied to a different model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import QuantizeError
from .qparams import QParams

SCHEMA_VERSION = 1


@dataclass
class OpChoice:
    """Integer or float for one node, and why."""

    kind: str
    mode: str  # "integer" | "float"
    descriptor: dict | None = None
    weight_bits: int | None = None
    reason: str = ""
    # per-output-channel float amount a correction plug-in (hago.correct) adds to the
    # layer's bias; stored so a replayed strategy realizes the same integer biases
    bias_delta: list[float] | None = None
    # learned rounding (hago.correct.adaround): one up/down bit per weight, packed
    # (hago.correct.rounding); None rounds to nearest
    weight_round: str | None = None


@dataclass
class EdgeChoice:
    """Quantization of one tensor edge; ``bits == 0`` means it stays float."""

    bits: int = 0
    dtype: str | None = None
    symmetric: bool = False
    range: tuple[float, float] | None = None
    qparams: QParams | None = None
    observe_at: str | None = None  # node whose output range is calibrated for this edge
    alias_of: str | None = None  # passthrough ops share their input's parameters
    dynamic: bool = False  # per-row parameters computed at run time (hago.dynamic); no calibrated range

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "qparams"}
        d["qparams"] = self.qparams.to_json() if self.qparams else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "EdgeChoice":
        d = dict(d)
        qp = d.pop("qparams", None)
        rng = d.pop("range", None)
        return cls(**d, range=tuple(rng) if rng else None, qparams=QParams.from_json(qp) if qp else None)


@dataclass
class Strategy:
    graph_hash: str
    device: str
    calibrator: str = "kl"
    ops: dict[str, OpChoice] = field(default_factory=dict)
    edges: dict[str, EdgeChoice] = field(default_factory=dict)
    corrections: list[str] = field(default_factory=list)  # hago.correct plug-ins that ran, in order

    def integer_ops(self) -> list[str]:
        return [n for n, c in self.ops.items() if c.mode == "integer"]

    def float_ops(self) -> list[str]:
        return [n for n, c in self.ops.items() if c.mode == "float"]

    def resolved(self, edge: str) -> EdgeChoice:
        """Follow ``alias_of`` links to the edge that owns the parameters."""
        seen = set()
        e = self.edges[edge]
        while e.alias_of is not None:
            if edge in seen:
                raise QuantizeError(f"strategy has an alias cycle at edge {edge!r}")
            seen.add(edge)
            edge = e.alias_of
            e = self.edges[edge]
        return e

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "graph_hash": self.graph_hash,
            "device": self.device,
            "calibrator": self.calibrator,
            "corrections": list(self.corrections),
            "ops": {k: asdict(v) for k, v in self.ops.items()},
            "edges": {k: v.to_json() for k, v in self.edges.items()},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def from_json(cls, d: dict) -> "Strategy":
        if d.get("schema") != SCHEMA_VERSION:
            raise QuantizeError(f"strategy schema {d.get('schema')!r} is not {SCHEMA_VERSION}; re-run hago compile")
        return cls(
            graph_hash=d["graph_hash"],
            device=d["device"],
            calibrator=d.get("calibrator", "kl"),
            corrections=list(d.get("corrections", [])),
            ops={k: OpChoice(**v) for k, v in d["ops"].items()},
            edges={k: EdgeChoice.from_json(v) for k, v in d["edges"].items()},
        )

    @classmethod
    def load(cls, path: str | Path) -> "Strategy":
        p = Path(path)
        if not p.is_file():
            raise QuantizeError(f"strategy file {p} does not exist")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise QuantizeError(f"strategy file {p} is not valid JSON (line {e.lineno}): {e.msg}") from None
        return cls.from_json(d)
