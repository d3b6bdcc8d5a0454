"""The strategy: what hago decided for one graph on one device, as JSON.

A strategy is the unit the search explores and the file ``hago compile
--strategy`` replays. It records, per op, integer or float and the descriptor
chosen from the spec; per edge, the bit width, the dtype and the calibrated
range with the resulting scale and zero point. It is keyed by the structural
hash of the FP32 graph so a strategy is never applied to a different model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import QuantizeError
from .qparams import _INT_RANGES, QParams

SCHEMA_VERSION = 1

#: bit widths a strategy may hold: a spec allows 4 or 8, and ``range_bits`` narrows
#: weights to as few as 2 (0 on an edge means it stays float)
MIN_BITS, MAX_BITS = 2, 8


#: how a node runs: integer (int8/int4 weights, its descriptor says), bf16 (bfloat16 inputs, float32
#: accumulation) or float (fp32)
MODES = ("integer", "bf16", "float")


@dataclass
class OpChoice:
    """Integer, bf16 or float for one node, and why."""

    kind: str
    mode: str  # one of MODES
    descriptor: dict | None = None
    weight_bits: int | None = None
    reason: str = ""
    # per-output-channel float amount a correction plug-in (hago.correct) adds to the
    # layer's bias; stored so a replayed strategy realizes the same integer biases
    bias_delta: list[float] | None = None
    # learned rounding (hago.correct.adaround): one up/down bit per weight, packed
    # (hago.correct.rounding); None rounds to nearest
    weight_round: str | None = None
    # per-input-channel factor on the layer's float weights before they are quantized
    # (hago.correct.dfmpc); None (the default, left out of the JSON) scales nothing
    weight_scale_in: list[float] | None = None
    # multipoint quantization's extra points (hago.multipoint.ExtraPoints.to_json: source channels,
    # coefficients, packed codes): extra output channels of the layer's kernel; None (the default, left
    # out of the JSON) gives the layer none
    multipoint: dict | None = None
    # the per-output-channel scale of the layer's integer weights, given rather than derived
    # (hago.qat: the step sizes a quantization-aware training learned, so realize rounds the exported
    # weights back to exactly the trained integers; hago.correct.weight_clip: the least-Lp-error step,
    # on which a learned weight_round then sits); None (the default, left out of the JSON): the
    # max-abs scale of hago.qparams.weight_qparams
    weight_scale: list[float] | None = None
    # the layer's integer weights themselves, packed (hago.correct.rounding.encode_codes), on the grid
    # of weight_scale, which they require (hago.correct.gptq: codes that error feedback moved more than
    # one step from the weight); None (the default, left out of the JSON): realize rounds the weights
    weight_codes: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        # optional: strategies without them keep their exact JSON
        for key in ("weight_scale_in", "multipoint", "weight_scale", "weight_codes"):
            if d[key] is None:
                del d[key]
        return d


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
    # the spec's SPARQ activation trimming ({mode, options, rounding}, hago.sparq) that simulate and
    # realize both apply; None (the default, left out of the JSON): plain 8-bit activations
    sparq: dict | None = None

    def integer_ops(self) -> list[str]:
        return [n for n, c in self.ops.items() if c.mode == "integer"]

    def float_ops(self) -> list[str]:
        return [n for n, c in self.ops.items() if c.mode == "float"]

    def bf16_ops(self) -> list[str]:
        return [n for n, c in self.ops.items() if c.mode == "bf16"]

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
            "ops": {k: v.to_json() for k, v in self.ops.items()},
            "edges": {k: v.to_json() for k, v in self.edges.items()},
            **({"sparq": dict(self.sparq)} if self.sparq is not None else {}),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def from_json(cls, d: dict) -> "Strategy":
        """Build a strategy from its JSON data, refusing any field realize could not use.

        A hand-edited or corrupted file would otherwise fail deep in realize
        with an unrelated message (bits 99 surfaced as a bad requantize scale).
        """
        if not isinstance(d, dict):
            raise QuantizeError(f"strategy must be a JSON object, got {type(d).__name__}; re-run hago compile")
        if d.get("schema") != SCHEMA_VERSION:
            raise QuantizeError(f"strategy schema {d.get('schema')!r} is not {SCHEMA_VERSION}; re-run hago compile")
        _validate(d)
        return cls(
            graph_hash=d["graph_hash"],
            device=d["device"],
            calibrator=d.get("calibrator", "kl"),
            corrections=list(d.get("corrections", [])),
            ops={k: OpChoice(**v) for k, v in d["ops"].items()},
            edges={k: EdgeChoice.from_json(v) for k, v in d["edges"].items()},
            sparq=dict(d["sparq"]) if d.get("sparq") is not None else None,
        )

    @classmethod
    def load(cls, path: str | Path) -> "Strategy":
        p = Path(path)
        if not p.is_file():
            raise QuantizeError(f"strategy file {p} does not exist")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise QuantizeError(f"strategy file {p} is not valid JSON (line {e.lineno}): {e.msg}") from None
        except (OSError, UnicodeError) as e:
            raise QuantizeError(f"strategy file {p} cannot be read ({type(e).__name__}: {e})") from None
        try:
            return cls.from_json(d)
        except QuantizeError as e:
            raise QuantizeError(f"strategy file {p}: {e}") from None


# -- validation of the JSON form -----------------------------------------------
def _fail(where: str, problem: str) -> None:
    raise QuantizeError(f"{where}: {problem}; re-run hago compile (or hago search) to write a fresh strategy")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _numbers(v) -> list:
    """A scalar or a flat list of numbers as a list; anything else as None."""
    vals = v if isinstance(v, list) else [v]
    return vals if vals and all(_is_num(x) for x in vals) else None


def _keys(where: str, d, cls, required: tuple[str, ...]) -> None:
    if not isinstance(d, dict):
        _fail(where, f"must be an object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = [k for k in d if k not in known]
    if unknown:
        _fail(f"{where}.{unknown[0]}", f"unknown field (valid: {', '.join(sorted(known))})")
    missing = [k for k in required if k not in d]
    if missing:
        _fail(f"{where}.{missing[0]}", "required field missing")


def _validate(d: dict) -> None:
    """Check every field of a strategy's JSON data; the first problem raises one line naming it."""
    for key in ("graph_hash", "device"):
        if not isinstance(d.get(key), str):
            _fail(key, f"must be a string, got {d.get(key)!r}")
    if not isinstance(d.get("calibrator", ""), str):
        _fail("calibrator", "must be a string")
    corr = d.get("corrections", [])
    if not (isinstance(corr, list) and all(isinstance(c, str) for c in corr)):
        _fail("corrections", f"must be a list of names, got {corr!r}")
    for key in ("ops", "edges"):
        if not isinstance(d.get(key), dict):
            _fail(key, f"must be an object keyed by node name, got {type(d.get(key)).__name__}")
    if d.get("sparq") is not None:
        from .hwspec import SparqSpec  # pure pydantic: the spec's own rules for the SPARQ block

        try:
            SparqSpec.model_validate(d["sparq"])
        except Exception as e:  # pydantic's ValidationError, one line here
            errs = getattr(e, "errors", None)
            _fail("sparq", errs()[0]["msg"] if callable(errs) else str(e))
    for name, op in d["ops"].items():
        _validate_op(f"ops[{name!r}]", op)
    for name, edge in d["edges"].items():
        _validate_edge(f"edges[{name!r}]", edge, d["edges"])


def _validate_op(where: str, op) -> None:
    _keys(where, op, OpChoice, ("kind", "mode"))
    if not isinstance(op["kind"], str):
        _fail(f"{where}.kind", f"must be a string, got {op['kind']!r}")
    if op["mode"] not in MODES:
        _fail(f"{where}.mode", f"must be one of {', '.join(map(repr, MODES))}, got {op['mode']!r}")
    wb = op.get("weight_bits")
    if wb is not None and not (_is_int(wb) and MIN_BITS <= wb <= MAX_BITS):
        _fail(f"{where}.weight_bits", f"must be a bit width {MIN_BITS}..{MAX_BITS} or null, got {wb!r}")
    desc = op.get("descriptor")
    if desc is not None:
        from .hwspec import OpDescriptor  # pure pydantic: the spec's own rules for a descriptor

        try:
            OpDescriptor.model_validate(desc)
        except Exception as e:  # pydantic's ValidationError or our _Problem, always one line here
            errs = getattr(e, "errors", None)
            first = errs()[0] if callable(errs) else {"loc": (), "msg": str(e)}
            loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in first["loc"])
            _fail(f"{where}.descriptor{loc}", first["msg"])
    bd = op.get("bias_delta")
    if bd is not None and (not isinstance(bd, list) or _numbers(bd) is None and bd):
        _fail(f"{where}.bias_delta", "must be a list of finite numbers or null")
    ws = op.get("weight_scale_in")
    if ws is not None and not (isinstance(ws, list) and _numbers(ws) is not None and min(ws) > 0):
        _fail(f"{where}.weight_scale_in", "must be a non-empty list of finite positive numbers or null")
    wsc = op.get("weight_scale")
    if wsc is not None and not (isinstance(wsc, list) and _numbers(wsc) is not None and min(wsc) > 0):
        _fail(f"{where}.weight_scale", "must be a non-empty list of finite positive numbers or null")
    clash = [k for k in ("multipoint", "weight_scale_in") if op.get(k) is not None]
    if wsc is not None and clash:  # each of them moves the weights or fits its own grid
        _fail(f"{where}.weight_scale", f"does not compose with {clash[0]} (each sets the layer's grid its own way)")
    codes = op.get("weight_codes")
    if codes is not None:
        if not isinstance(codes, str):
            _fail(f"{where}.weight_codes", "must be a string (packed codes) or null")
        if wsc is None:
            _fail(f"{where}.weight_codes", "needs the weight_scale its codes sit on")
        if op.get("weight_round") is not None:
            _fail(f"{where}.weight_codes", "does not compose with weight_round (the codes are already rounded)")
    if op.get("multipoint") is not None:
        _validate_multipoint(f"{where}.multipoint", op["multipoint"])
    if not isinstance(op.get("reason", ""), str) or not isinstance(op.get("weight_round") or "", str):
        _fail(where, "reason and weight_round must be strings")


def _validate_multipoint(where: str, m) -> None:
    """The JSON form of :class:`hago.multipoint.ExtraPoints`; its fit to the layer is checked by realize."""
    if not isinstance(m, dict) or set(m) != {"channels", "scales", "codes"}:
        _fail(where, "must be an object with channels, scales and codes")
    ch, sc = m["channels"], m["scales"]
    if not (isinstance(ch, list) and all(_is_int(c) and c >= 0 for c in ch)):
        _fail(f"{where}.channels", "must be a list of non-negative channel indices")
    if not (isinstance(sc, list) and len(sc) == len(ch) and (not sc or _numbers(sc) is not None and min(sc) > 0)):
        _fail(f"{where}.scales", "must be one finite positive number per channel entry")
    if not isinstance(m["codes"], str):
        _fail(f"{where}.codes", "must be a string (packed codes)")


def _validate_edge(where: str, e, edges: dict) -> None:
    _keys(where, e, EdgeChoice, ())
    bits = e.get("bits", 0)
    if not (_is_int(bits) and (bits == 0 or MIN_BITS <= bits <= MAX_BITS)):
        _fail(f"{where}.bits", f"must be 0 (float) or a bit width {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    dtype = e.get("dtype")
    if dtype is not None and dtype not in _INT_RANGES:
        _fail(f"{where}.dtype", f"unknown dtype {dtype!r} (valid: {', '.join(_INT_RANGES)})")
    if bits and dtype is None and e.get("alias_of") is None:
        _fail(f"{where}.dtype", f"a {bits}-bit edge needs an integer dtype")
    for key in ("symmetric", "dynamic"):
        if not isinstance(e.get(key, False), bool):
            _fail(f"{where}.{key}", f"must be true or false, got {e.get(key)!r}")
    for key in ("observe_at", "alias_of"):
        if e.get(key) is not None and not isinstance(e.get(key), str):
            _fail(f"{where}.{key}", f"must be a node name or null, got {e.get(key)!r}")
    if e.get("alias_of") is not None and e["alias_of"] not in edges:
        _fail(f"{where}.alias_of", f"names edge {e['alias_of']!r}, which the strategy does not have")
    rng = e.get("range")
    if rng is not None and not (isinstance(rng, list) and len(rng) == 2 and _numbers(rng) and rng[0] <= rng[1]):
        _fail(f"{where}.range", f"must be [low, high] with finite low <= high, got {rng!r}")
    if e.get("qparams") is not None:
        _validate_qparams(f"{where}.qparams", e["qparams"])


def _validate_qparams(where: str, q) -> None:
    _keys(where, q, QParams, ("scale", "zero_point", "dtype", "qmin", "qmax"))
    if q["dtype"] not in _INT_RANGES:
        _fail(f"{where}.dtype", f"unknown dtype {q['dtype']!r} (valid: {', '.join(_INT_RANGES)})")
    lo, hi = _INT_RANGES[q["dtype"]]
    qmin, qmax = q["qmin"], q["qmax"]
    if not (_is_int(qmin) and _is_int(qmax) and lo <= qmin < qmax <= hi):
        _fail(f"{where}.qmin", f"qmin/qmax {qmin!r}/{qmax!r} must be integers with {lo} <= qmin < qmax <= {hi}")
    scale = _numbers(q["scale"])
    if scale is None or min(scale) <= 0:
        _fail(f"{where}.scale", f"must be finite and positive, got {q['scale']!r}")
    zp = _numbers(q["zero_point"])
    if zp is None or not all(float(z).is_integer() and qmin <= z <= qmax for z in zp):
        _fail(f"{where}.zero_point", f"must be integers in [{qmin}, {qmax}], got {q['zero_point']!r}")
    if isinstance(q["scale"], list) and isinstance(q["zero_point"], list) and len(scale) != len(zp):
        _fail(f"{where}.zero_point", f"has {len(zp)} values for {len(scale)} scales")
    axis = q.get("axis")
    if axis is not None and not (_is_int(axis) and axis >= 0):
        _fail(f"{where}.axis", f"must be a non-negative integer or null, got {axis!r}")
