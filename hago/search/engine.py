"""The search engine: evaluates candidates, keeps the log, picks the answer.

A candidate is a point of :class:`~hago.search.space.SearchSpace`. Its
accuracy is measured on this machine by running the realized integer program
(the one the device will run); its latency is measured on the device through a
:class:`~hago.measure.Measurer`. Calibration statistics are gathered
once for every edge, so each candidate only re-derives ranges, realizes and
builds. Every measurement goes to the JSONL log first; a resumed search reads
it back and measures nothing twice.

Choosing: among measured candidates that meet the target, the fastest; a
candidate within ``tie_tolerance`` of the fastest wins on accuracy instead,
so timer noise does not pick between builds that run the same kernels.
When nothing measured meets the target, the most accurate measured candidate
is returned with a message saying so.

Size: every evaluated candidate's weight bytes are counted on its realized
program (:func:`hago.weight_bytes.weight_bytes`, what ``hago compile``
reports; no device) and logged as a ``bytes|KEY`` record, so a resumed search
reads them back. With ``max_weight_bytes`` a candidate over that budget never
wins: choosing looks only at candidates that fit, and when none does the
result is no build, with a message naming the smallest. The algorithms steer
by it through :meth:`SearchEngine.point_bytes` (:mod:`.sizes`: a prediction
for points not realized yet).

When the device is this machine, a candidate is built once, at the device's
batch: that build scores its accuracy (one sample per call), lists its kernel
calls for :meth:`SearchEngine.estimate` and is the library measured. The FP32
reference outputs, the calibration statistics and the corrections are cached
under the cache directory, keyed by graph and data, so a resumed search starts
without re-running FP32. They are data files (``.npz`` and JSON, see
:mod:`.refcache`), never pickles: the directory may be shared.

A device that measures nothing is an error, not a result: when no latency
was ever measured and ``GIVE_UP_AFTER`` measurements failed (or the search
ends that way), :class:`~hago.errors.MeasureError` says so with the first
error, instead of "no candidate met the target".
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import OrderedDict
import tempfile
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from .. import build as build_mod
from ..annotate import annotate
from ..backends import backend_of
from ..calibrate import get_calibrator
from ..data import check_labels, load_samples
from ..errors import MeasureError, error_line
from ..evaluate import predict
from ..pipeline import CALIB_BATCH, apply_graph_corrections, prepare_model
from ..graph import analyze
from ..hwspec import HardwareSpec
from ..measure import LocalMeasurer, Measurement, Measurer, device_threads
from ..observe import apply_ranges, observe
from ..correct import CORRECTIONS, CorrectionContext, check_corrections, corrected_graph, run_corrections
from ..realize import realize
from ..weight_bytes import format_bytes, parse_bytes, weight_bytes
from . import refcache
from .kernelcache import KernelCache, profile_calls
from .log import SearchLog, check_resumable
from .sizes import SizeModel
from .points import SearchPoints, fitting_point
from .settle import settle, settled, settled_group
from .space import BF16, Point, SearchSpace, choice_bits, choice_label
from .target import AccuracyTarget, SearchError, make_metric

log = logging.getLogger(__name__)


#: what a local correction writes into a layer's OpChoice, and the search copies to each candidate
CORRECTED_FIELDS = ("bias_delta", "weight_round", "weight_scale", "weight_codes")
_FLOAT_LISTS = ("bias_delta", "weight_scale")


def _encode_corrections(corrected: dict[str, dict]) -> dict:
    """``{layer: {(weight_bits, input_bits, input_dynamic, multipoint): {field: value}}}`` as JSON data."""
    def plain(k, v):
        return [float(x) for x in v] if k in _FLOAT_LISTS and v is not None else v

    return {"layers": {name: [{"weight_bits": wb, "input_bits": ib, "input_dynamic": dyn, "multipoint": mp,
                               **{k: plain(k, fields.get(k)) for k in CORRECTED_FIELDS}}
                              for (wb, ib, dyn, mp), fields in settings.items()]
                       for name, settings in corrected.items()}}


def _decode_corrections(data) -> dict[str, dict]:
    """The inverse of :func:`_encode_corrections`; ValueError for anything that is not exactly that."""
    def opt(v, *types):  # None or one of types (a bool is not an int here)
        return v is None or (isinstance(v, types) and not isinstance(v, bool))

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def valid(k, v):
        if k in _FLOAT_LISTS:
            return v is None or isinstance(v, list) and all(number(x) for x in v)
        return opt(v, str)

    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict):
        raise ValueError("no layers")
    out: dict[str, dict] = {}
    for name, recs in layers.items():
        if not isinstance(recs, list) or not recs:
            raise ValueError(f"malformed records for layer {name!r}")
        for rec in recs:
            ok = (isinstance(rec, dict) and opt(rec.get("weight_bits"), int) and opt(rec.get("input_bits"), int)
                  and isinstance(rec.get("input_dynamic"), bool) and isinstance(rec.get("multipoint", False), bool)
                  and all(valid(k, rec.get(k)) for k in CORRECTED_FIELDS))
            if not ok or all(rec.get(k) is None for k in CORRECTED_FIELDS):
                raise ValueError(f"malformed record for layer {name!r}")
            fields = {k: [float(x) for x in rec[k]] if k in _FLOAT_LISTS and rec.get(k) is not None else rec.get(k)
                      for k in CORRECTED_FIELDS}
            key = (rec.get("weight_bits"), rec.get("input_bits"), rec["input_dynamic"], rec.get("multipoint", False))
            out.setdefault(name, {})[key] = fields
    return out


def _check_budget(max_trials, time_budget) -> tuple[int | None, float | None]:
    """``max_trials`` (at least 1) and ``time_budget`` (seconds, above 0), each None for no limit."""
    if max_trials is not None:
        if isinstance(max_trials, bool) or not isinstance(max_trials, (int, np.integer)) or max_trials < 1:
            raise SearchError(f"max trials {max_trials!r} is not usable: give a whole number of measurements, "
                              "at least 1")
        max_trials = int(max_trials)
    if time_budget is not None:
        try:
            t = float(time_budget)
        except (TypeError, ValueError):
            t = math.nan
        if isinstance(time_budget, bool) or not t > 0:  # NaN fails too; inf means no limit
            raise SearchError(f"time budget {time_budget!r} is not usable: give seconds above 0")
        time_budget = t
    return max_trials, time_budget


def _check_weight_budget(max_weight_bytes) -> int | None:
    """``max_weight_bytes`` as whole bytes (an int, or text such as ``"2MB"``, ``"1.5MiB"``); None for no budget."""
    if max_weight_bytes is None:
        return None
    try:
        return parse_bytes(max_weight_bytes)
    except ValueError as e:
        raise SearchError(f"max weight bytes: {e}") from None


GIVE_UP_AFTER = 3  # failed measurements, none ever successful, after which the device is deemed unmeasurable


class BudgetExhausted(Exception):
    """Raised inside an algorithm when trials or time run out; the engine catches it."""


@dataclass
class Candidate:
    key: str
    point: Point
    label: str
    accuracy: float | None = None
    latency_ms: float | None = None
    error: str | None = None
    weight_bytes: int | None = None  # of the realized program (hago.weight_bytes), None until counted


@dataclass
class SearchResult:
    best: Candidate | None
    met_target: bool
    message: str
    threshold: float
    fp32: Candidate | None
    candidates: list[Candidate]
    trials: int
    reused: int
    seconds: float
    strategy: object = None
    extras: dict = field(default_factory=dict)


class SearchEngine:
    def __init__(self, model, device: str | HardwareSpec, calib, eval_data, *, log_path, accuracy_drop="1%",
                 metric=None, measurer: Measurer | None = None, calibrator: str = "mse", example_inputs=None,
                 max_trials: int | None = None, time_budget: float | None = None, allow_float: bool = True,
                 weight_bits: list[int] | None = None, tie_tolerance: float = 0.03, eval_batch: int = 250,
                 cache_dir: str | Path | None = None, corrections=("bias",), resume: bool = False,
                 max_weight_bytes: int | str | None = None, multipoint: bool = False, settle_rounds: int = 3):
        self.t0 = time.perf_counter()
        # options first: a bad one is a one-line error before minutes of set-up
        self.target = accuracy_drop if isinstance(accuracy_drop, AccuracyTarget) else AccuracyTarget.parse(accuracy_drop)
        if metric == "kl" and self.target.relative:
            raise SearchError(f"a KL target is an absolute bound, not {self.target} of FP32's 0: give "
                              "accuracy_drop=kl_target(X) (hago search --max-kl X)")
        self.max_trials, self.time_budget = _check_budget(max_trials, time_budget)
        #: the weight-size budget in bytes (None: size is reported, never a constraint)
        self.max_weight_bytes = _check_weight_budget(max_weight_bytes)
        if isinstance(settle_rounds, bool) or not isinstance(settle_rounds, int) or settle_rounds < 0:
            raise SearchError(f"settle rounds: expected a whole number >= 0, got {settle_rounds!r}")
        #: interleaved rounds in which the contenders for the answer are re-timed side by side (:mod:`.settle`)
        self.settle_rounds = settle_rounds
        if resume:
            check_resumable(log_path)
        self.spec = device if isinstance(device, HardwareSpec) else HardwareSpec.load(device)
        if self.spec.is_local:  # accuracy runs here too: the device's cores, not TVM's half
            device_threads(self.spec.cores)
        # loaded and prepared once (hago.pipeline): symbolic sizes other than the batch come from the
        # calibration data; a static batch the graph depends on fixes every batch below
        self.prepared = apply_graph_corrections(  # cle rewrites the FP32 weights every candidate starts from
            prepare_model(model, calib, example_inputs=example_inputs),
            (corrections,) if isinstance(corrections, str) else tuple(corrections or ()))
        self.fp32, self.graph, self.ghash = self.prepared.fp32, self.prepared.graph, self.prepared.graph_hash
        self.infos, self.fixed_batch = self.prepared.inputs, self.prepared.fixed_batch
        self.space = self._space(allow_float, weight_bits, multipoint)
        self.tie_tolerance = tie_tolerance
        if measurer is None and not self.spec.is_local:
            raise SearchError(f"{self.spec.name} is not this machine: pass --rpc TRACKER --key KEY to measure on it")
        self.measurer = measurer or LocalMeasurer(threads=self.spec.cores)
        #: what the log names as the board of a measurement whose measurer names none (this machine)
        self.board = getattr(self.measurer, "name", "local")
        #: called with each measured candidate as it arrives (from a board's thread, for a farm)
        self.on_measured: list = []
        #: where the search's wall time went on the host: building candidates, scoring their accuracy, and
        #: waiting for measurements (a farm's device time is hidden behind the first two where it overlaps)
        self.seconds = {"build": 0.0, "accuracy": 0.0, "measure wait": 0.0}
        self.host = build_mod.host_target() if not self.spec.is_local else build_mod.target_of(self.spec)
        self.device_target = build_mod.target_of(self.spec)
        self.names = self.prepared.input_names
        # builds are static (the hand-scheduled kernels tile exact shapes): batch 1 on the device,
        # eval_batch for accuracy on the host; same node names, so one strategy serves all three graphs.
        # On this machine the device build also scores accuracy (batch 1): one build per candidate.
        self.shared_build = self.spec.is_local
        self.device_batch = self.fixed_batch or 1
        self.eval_batch = self.fixed_batch or (1 if self.shared_build else eval_batch)
        self.device_graph = analyze(build_mod.static_batch(self.fp32, self.device_batch))
        self.eval_graph = (self.device_graph if self.shared_build or self.fixed_batch
                           else analyze(build_mod.static_batch(self.fp32, eval_batch)))
        cache_dir = Path(cache_dir or os.environ.get("HAGO_CACHE_DIR", Path.home() / ".cache" / "hago"))
        self._executables: OrderedDict = OrderedDict()
        self._calibrate(calibrator, cache_dir)
        self._correct(corrections, cache_dir)
        #: the fitted extra points of the layers with a ``4+`` choice (:mod:`.points`; none without one)
        self.points = SearchPoints.fit(self, cache_dir)
        self.eval_samples = load_samples(eval_data, self.infos, name="evaluation")
        fp32_out = self._fp32_outputs(cache_dir)
        if self.eval_samples.labels is not None:
            self.eval_samples.labels = check_labels(self.eval_samples.labels, fp32_out.shape[-1], "evaluation")
        self.score, self.metric_name = make_metric(self.eval_samples.labels, fp32_out, metric)
        self.fp32_score = self.score(fp32_out)
        self.threshold = self.target.threshold(self.fp32_score)
        header = {"graph_hash": self.ghash, "device": self.spec.name, "space": [self.space.key(self.space.widest())],
                  "target": str(self.target), "metric": self.metric_name}
        self.log = SearchLog(log_path, header, resume=resume)
        self.kernels = KernelCache(cache_dir / "kernels" / f"{self.spec.name}.json", self.spec.name)
        self._signatures: dict[Point, list[str]] = {}
        self._bytes: dict[Point, int] = {}  # realized weight bytes counted by this run (the log has them too)
        self._size_model: SizeModel | None = None
        self.trials = 0
        self.reused = 0
        self.retimed = 0  # builds re-timed side by side before the choice (not trials: see .settle)
        self._exports = 0
        self._tmp = Path(tempfile.mkdtemp(prefix="hago_search_"))

    # -- set-up ----------------------------------------------------------------
    def _space(self, allow_float: bool, weight_bits, multipoint: bool = False) -> SearchSpace:
        space = SearchSpace.from_graph(self.graph, self.spec, multipoint)
        knobs = []
        for k in space.knobs:
            ch = k.choices
            if k.kind == "weight":
                ch = tuple(c for c in ch if (c or allow_float)
                           and (weight_bits is None or c in (0, BF16) or choice_bits(c) in weight_bits))
                if not ch:
                    raise SearchError(f"no weight bits left for {k.name}: the spec allows {k.choices[1:]}")
            knobs.append(type(k)(k.name, k.kind, ch))
        return SearchSpace(tuple(knobs))

    def _digest(self, what: str, samples, *extra) -> str:
        h = hashlib.sha1(f"{what}|{self.ghash}|{extra}".encode())
        for name in sorted(samples.arrays):
            a = np.ascontiguousarray(samples.arrays[name])
            h.update(f"{name}{a.shape}{a.dtype}".encode())
            h.update(a.tobytes())
        return h.hexdigest()[:20]

    def _calibrate(self, calibrator: str, cache_dir: Path) -> None:
        """Every edge's statistics, observed once and cached as data (:mod:`.refcache`, never a pickle)."""
        samples = self.calib_samples = self.prepared.calib
        self.calibrator = get_calibrator(calibrator)
        digest = self._digest("calib", samples, calibrator)
        path = cache_dir / "reference" / f"calib-{digest}.npz"  # the .pkl files of older versions are never read
        key = {"digest": digest, "graph_hash": self.ghash, "calibrator": calibrator}
        state = refcache.load_npz(path, "calibration", key)
        if state is not None:
            try:
                if not isinstance(state, dict) or not isinstance(state.get("edges"), dict) or not state["edges"]:
                    raise ValueError("no edge statistics")
                self.calibrator.load_state_dict(state)
                return
            except Exception as e:  # well-formed data that does not fit this calibrator: observe again
                log.warning("ignoring cached calibration %s (%s): recomputing it", path, e)
                self.calibrator = get_calibrator(calibrator)
        observe(self.fp32, self.graph, samples, self.calibrator, self.host, self.prepared.batch_for(CALIB_BATCH))
        refcache.save_npz(path, "calibration", key, self.calibrator.state_dict())

    def _fp32_outputs(self, cache_dir: Path) -> np.ndarray:
        """FP32 outputs on the evaluation data, computed once and cached as data (:mod:`.refcache`)."""
        digest = self._digest("fp32", self.eval_samples, str(self.host))
        path = cache_dir / "reference" / f"fp32-{digest}.npz"
        key = {"digest": digest, "graph_hash": self.ghash}
        out = refcache.load_npz(path, "fp32-outputs", key)
        if isinstance(out, np.ndarray) and len(out) == len(self.eval_samples):
            return out
        mod = build_mod.static_batch(self.fp32, self.eval_batch)
        ex = build_mod.build(mod, self.device_target if self.shared_build else self.host, "host")
        out = predict(ex, self.eval_samples, self.names, self.eval_batch, static=True)
        refcache.save_npz(path, "fp32-outputs", key, out)
        return out

    def _correct(self, corrections, cache_dir: Path) -> None:
        """Per-layer results of the correction plug-ins (``hago.correct``), computed once per weight width.

        Closed-form corrections that depend on the neighbours' choices
        (``Correction.per_candidate``: ``dfmpc``) run on each candidate's own
        strategy instead, after the local results are copied in (:meth:`strategy`;
        so a ``bias`` delta was measured without them: an approximation ``hago
        compile --corrections dfmpc,bias`` does not make). Since they run last,
        one listed before a correction that writes weights (``writes_weights``:
        ``dfmpc,gptq``) is refused: compile would run that order the other way
        round. Otherwise only *local*
        corrections are supported here (``Correction.local``:
        ``weight_clip``, ``gptq``, ``bias``, ``adaround``, ``adaround_conv``): each
        works on a layer's FP32 input, so its result (step, codes, bias delta,
        learned rounding) depends only on the layer's own weight bits, input
        quantization and multipoint points. They run on up to three strategies:
        the widest (here), the one with every weight at its lowest width (4-bit
        layers get a 4-bit result) and, with ``4+`` choices, the one that puts
        every such layer at ``4+`` with its points (a ``4+`` layer rounds
        differently from its plain 4-bit self, so it gets a bias delta of its
        own; ``gptq``, ``weight_clip`` and AdaRound leave it to its points). The
        last two run when a candidate first needs them (:meth:`strategy`).
        Each result serves every candidate that quantizes the layer the same
        way (``strategy`` copies it there). Candidates are then scored as
        ``hago compile`` would build them.
        """
        self.corrections = (corrections,) if isinstance(corrections, str) else tuple(corrections)
        self._corrected: dict[str, dict] = {}  # layer -> {correction key: {CORRECTED_FIELDS: value}}
        if not self.corrections:
            return
        check_corrections(self.corrections)
        serial = [n for n in self.corrections if not CORRECTIONS[n].local and not CORRECTIONS[n].per_candidate]
        if serial:
            raise SearchError(f"search cannot use --corrections {','.join(serial)}: its result for a layer depends "
                              "on every other layer's choice (use weight_clip, gptq, bias, adaround, adaround_conv, "
                              "brecq, brecq_fisher or dfmpc)")
        #: run on each candidate's strategy, after the local results are copied in (Correction.per_candidate)
        self._per_candidate = tuple(n for n in self.corrections if CORRECTIONS[n].per_candidate)
        for i, name in enumerate(self.corrections):
            later = [n for n in self.corrections[i + 1:] if CORRECTIONS[n].writes_weights]
            if name in self._per_candidate and later:
                raise SearchError(f"search runs {name} on each candidate after the per-layer corrections, so "
                                  f"--corrections must list it after {','.join(later)} (as hago compile would run "
                                  f"them: {','.join([n for n in self.corrections if n != name] + [name])})")
        self._local = tuple(n for n in self.corrections if n not in self._per_candidate)
        names = "+".join(self.corrections)
        digest = self._digest(names, self.calib_samples, self.calibrator.name)
        path = cache_dir / "reference" / f"corrections-{names}-{digest}.json"  # never the old .pkl
        key = {"digest": digest, "graph_hash": self.ghash, "corrections": list(self.corrections),
               "calibrator": self.calibrator.name}
        self._corrections_file = (path, key)
        self._corrected_at: set[str] = set()  # which of "widest" / "narrowest" / "multipoint" they ran at
        data = refcache.load_json(path, "corrections", key)
        if data is not None:
            try:
                self._corrected = _decode_corrections(data)
                self._corrected_at = set(data.get("settings") or ["widest"])
            except ValueError as e:  # a well-formed file with the wrong content: run the corrections again
                log.warning("ignoring cached corrections %s (%s): recomputing them", path, e)
        if "widest" not in self._corrected_at:
            self._correct_at("widest", self._strategy(self.space.widest()))

    def _correct_at(self, setting: str, strat) -> None:
        """Run the local corrections on ``strat``, keep each layer's result under its correction key, save."""
        run_corrections(self._local, CorrectionContext(self.fp32, self.graph, strat, self.calib_samples,
                                                       self.host, self.prepared.batch_for(CALIB_BATCH)))
        for name, op in strat.ops.items():
            fields = {k: getattr(op, k) for k in CORRECTED_FIELDS}
            if op.mode == "integer" and any(v is not None for v in fields.values()):
                self._corrected.setdefault(name, {})[self._correction_key(strat, name)] = fields
        self._corrected_at.add(setting)
        path, key = self._corrections_file
        refcache.save_json(path, "corrections", key, {**_encode_corrections(self._corrected),
                                                      "settings": sorted(self._corrected_at)})

    def _needs_narrow_corrections(self, strat) -> bool:
        """True when ``strat`` has an integer layer below its widest weight width that the corrections have not
        seen at that width yet (they run at the lowest width on first need: many searches never go there)."""
        if "narrowest" in self._corrected_at:
            return False
        wide = dict(zip((k.name for k in self.space.knobs), self.space.widest()))
        return any(op.mode == "integer" and name in wide and op.weight_bits is not None and op.multipoint is None
                   and op.weight_bits < choice_bits(wide[name])
                   and self._correction_key(strat, name) not in self._corrected.get(name, {})
                   for name, op in strat.ops.items())

    def _needs_multipoint_corrections(self, strat) -> bool:
        """True when ``strat`` has a layer with multipoint's points and the corrections have not run on them."""
        return "multipoint" not in self._corrected_at and any(
            op.mode == "integer" and op.multipoint is not None for op in strat.ops.values())

    def _multipoint_strategy(self):
        """The widest strategy with every ``4+``-able layer at ``4+``, its points applied: where the corrections
        see the layers as a ``4+`` choice builds them (the points were fitted on this strategy, :mod:`.points`)."""
        point = fitting_point(self.space, self.space.widest())
        strat = self._strategy(point)
        self.points.apply(strat, self.space, point, self._layer_key)
        return strat

    def _narrowest_weights(self):
        """The widest point with every weight at its lowest integer width (activations as wide as they go):
        the second setting local corrections run at, so 4-bit layers get their own 4-bit result."""
        return tuple(n if k.kind == "weight" else w
                     for k, w, n in zip(self.space.knobs, self.space.widest(), self.space.narrowest()))

    def _layer_key(self, strat, name: str) -> tuple:
        """What multipoint's points depend on: the layer's weight bits and its input's quantization."""
        src = strat.resolved(self.graph.node(name).inputs[0])
        return strat.ops[name].weight_bits, src.bits, src.dynamic

    def _correction_key(self, strat, name: str) -> tuple:
        """What a local correction depends on: the layer key, and whether the layer carries points."""
        return (*self._layer_key(strat, name), strat.ops[name].multipoint is not None)

    # -- one candidate ---------------------------------------------------------
    def _strategy(self, point: Point):
        strat = annotate(self.graph, self.spec, self.ghash, self.space.config(point))
        return apply_ranges(strat, self.calibrator)

    def strategy(self, point: Point):
        """The calibrated strategy of ``point``, with the stored corrections of its integer layers."""
        strat = self._strategy(point)
        # points first: a layer given multipoint's extra points (`4+`) rounds differently from its plain
        # 4-bit self, so its correction key (and its bias delta) is its own
        self.points.apply(strat, self.space, point, self._layer_key)
        if self.corrections:
            if self._needs_narrow_corrections(strat):
                self._correct_at("narrowest", self._strategy(self._narrowest_weights()))
            if self._needs_multipoint_corrections(strat):
                self._correct_at("multipoint", self._multipoint_strategy())
            for name, op in strat.ops.items():
                fields = self._corrected.get(name, {}).get(self._correction_key(strat, name))
                if op.mode == "integer" and fields is not None:
                    for k, v in fields.items():
                        setattr(op, k, v)
            if self._per_candidate:  # DF-MPC: the pairs this candidate's bits make, compensated in closed form
                quiet = logging.getLogger("hago.correct")  # its report would repeat for every candidate
                level = quiet.level
                quiet.setLevel(logging.ERROR)
                try:
                    run_corrections(self._per_candidate, CorrectionContext(self.fp32, self.graph, strat, None, None))
                finally:
                    quiet.setLevel(level)
            strat.corrections = [*self._local, *self._per_candidate]  # the order they were applied in
        return strat

    def label(self, point: Point) -> str:
        if point == self.space.all_float() and all(k.kind == "weight" for k in self.space.knobs):
            return "FP32"
        return " ".join(choice_label(b) for b in point)

    def candidate(self, point: Point) -> Candidate:
        key = self.space.key(point)
        c = Candidate(key, tuple(point), self.label(point))
        if (rec := self.log.get(f"accuracy|{key}")) is not None:
            c.accuracy = rec["accuracy"]
        if (rec := self.log.get(f"latency|{key}")) is not None:
            c.latency_ms, c.error = rec.get("latency_ms"), rec.get("error")
        if self.settle_rounds and (ms := settled(self, key)) is not None:  # re-timed beside the other contenders
            c.latency_ms = ms
        c.weight_bytes = self.known_bytes(point)
        return c

    def _remember(self, point: Point, ex) -> None:
        self._executables[point] = ex
        self._executables.move_to_end(point)
        while len(self._executables) > 8:
            self._executables.popitem(last=False)

    def executable(self, point: Point):
        """The candidate's device build (batch 1, or the graph's fixed batch), built once and kept for its next use."""
        if point in self._executables:
            self._executables.move_to_end(point)
            return self._executables[point]
        t0 = time.perf_counter()
        ex = build_mod.build_for(self._device_program(point), self.spec, rewritten=True)
        self.seconds["build"] += time.perf_counter() - t0
        self._remember(point, ex)
        return ex

    def _realize(self, graph, point: Point):
        """``point`` realized on ``graph``."""
        strat = self.strategy(point)
        return realize(corrected_graph(graph, strat), strat, self.spec.requantize, backend_of(self.spec))

    def _device_program(self, point: Point):
        """``point``'s program as the device build compiles it (realized, then the backend's kernel swap, which
        packs ARM's and CUDA's 4-bit weights); its weight bytes are counted on the way."""
        mod = build_mod.device_module(self._realize(self.device_graph, point).mod, self.spec)
        self._count_bytes(point, mod)
        return mod

    def _count_bytes(self, point: Point, mod) -> int:
        """The weight bytes of ``point``'s realized device program ``mod``, logged once (``bytes|KEY``)."""
        known = self.known_bytes(point)
        if known is not None:
            return known
        n = self._bytes[point] = int(weight_bytes(mod))
        self.log.add({"key": f"bytes|{self.space.key(point)}", "weight_bytes": n})
        return n

    def known_bytes(self, point: Point) -> int | None:
        """``point``'s realized weight bytes if this run or the log has them; never realizes."""
        point = tuple(point)
        if point in self._bytes:
            return self._bytes[point]
        rec = self.log.get(f"bytes|{self.space.key(point)}")
        if rec is not None:
            self._bytes[point] = rec["weight_bytes"]
            return rec["weight_bytes"]
        return None

    def weight_bytes(self, point: Point) -> int:
        """``point``'s weight bytes as ``hago compile`` reports them: :func:`hago.weight_bytes.weight_bytes`
        of its realized device program (batch as built for the device). From the log when it has them, else
        realized here (no build, no device) and logged."""
        point = tuple(point)
        known = self.known_bytes(point)
        if known is not None:
            return known
        t0 = time.perf_counter()
        n = self._count_bytes(point, self._device_program(point))
        self.seconds["build"] += time.perf_counter() - t0
        return n

    def size_model(self) -> SizeModel:
        """The per-knob weight-bytes predictor (:mod:`.sizes`), measured on first use: one realize per
        weight-knob choice, each logged, so a resumed search measures none of them again."""
        if self._size_model is None:
            self._size_model = SizeModel.measure(self.space, self.weight_bytes)
        return self._size_model

    def point_bytes(self, point: Point) -> int:
        """``point``'s weight bytes: the realized count where known, else :meth:`size_model`'s prediction."""
        known = self.known_bytes(point)
        return known if known is not None else self.size_model()(tuple(point))

    def fits(self, point: Point) -> bool:
        """Whether ``point`` is within the weight budget (:meth:`point_bytes`); always True without one."""
        return self.max_weight_bytes is None or self.point_bytes(point) <= self.max_weight_bytes

    def accuracy(self, point: Point) -> Candidate:
        c = self.candidate(point)
        if c.accuracy is not None:
            return c
        self._check_time()
        if self.shared_build:
            ex = self.executable(point)
        else:
            realized = self._realize(self.eval_graph, point)
            ex = build_mod.build(realized.mod, self.host, "host")
        c.weight_bytes = self.weight_bytes(point)  # logged before the accuracy: a logged candidate has both
        t0 = time.perf_counter()
        out = predict(ex, self.eval_samples, self.names, self.eval_batch, static=True)
        self.seconds["accuracy"] += time.perf_counter() - t0
        c.accuracy = float(self.score(out))
        self.log.add({"key": f"accuracy|{c.key}", "point": list(point), "accuracy": c.accuracy})
        return c

    def latency(self, point: Point) -> Candidate:
        """The candidate with its device latency, measured unless the log has it (see :meth:`latencies`)."""
        return self.latencies([point])[0]

    def latencies(self, points) -> list[Candidate]:
        """Each point's candidate with its device latency; what the log has is reused, the rest measured.

        With a farm (a measurer with ``submit``) the host builds and scores
        the next point while boards measure the ones before; the batch returns
        when every measurement is back. With one device the points are
        measured in turn, each right after its build, so a local measurement
        never shares the cores with a build. Every result goes to the log as
        it arrives, with the board that measured it and any failed attempts.
        Raises :class:`BudgetExhausted` when the trials or the time run out,
        after the measurements already sent have come back and been logged.
        """
        points = list(dict.fromkeys(tuple(p) for p in points))
        done: dict[Point, Candidate] = {}
        sent: list[tuple[Point, Candidate, Future]] = []
        failures: list[BaseException] = []
        try:
            for point in points:
                c = self.accuracy(point)
                if c.latency_ms is not None or c.error is not None:
                    self.reused += 1
                    done[point] = c
                    continue
                if self.max_trials is not None and self.trials >= self.max_trials:
                    raise BudgetExhausted(f"{self.max_trials} trials")
                self._check_time()
                self.trials += 1
                try:
                    future = self._submit(self.export(point))
                except Exception as e:  # a build that fails is a failed candidate, not a failed search
                    future = Future()
                    future.set_result(Measurement(None, error=error_line(e, with_type=True), board=self.board))
                future.add_done_callback(partial(self._record, c, failures))
                sent.append((point, c, future))
        finally:
            t0 = time.perf_counter()
            for point, c, future in sent:  # logged by _record as each arrived
                future.exception()
                done[point] = c
            self.seconds["measure wait"] += time.perf_counter() - t0
        if failures:
            raise failures[0]
        if any(c.error for _, c, _ in sent):
            failed = self._unmeasurable()
            if failed is not None and len(failed) >= GIVE_UP_AFTER:
                raise self._unmeasurable_error(failed)
        return [done[p] for p in points]

    def export(self, point: Point) -> Path:
        """``point``'s device build as a library file a measurer loads (built once, exported each call)."""
        lib = self._tmp / f"cand_{self._exports}.so"
        self._exports += 1
        build_mod.export(self.executable(point), self.spec, lib)
        return lib

    def measure_now(self, lib: Path) -> Measurement:
        """One measurement of ``lib``, waited for (a farm's next free board, or this device)."""
        return self._submit(lib).result()

    def _submit(self, lib: Path) -> Future:
        """The measurement of ``lib``: sent to a farm's next free board, or taken now on the one device."""
        if hasattr(self.measurer, "submit"):
            return self.measurer.submit(lib, self._input_spec())
        future = Future()
        try:
            future.set_result(self.measurer.measure(lib, self._input_spec()))
        except Exception as e:  # a measurer that raises is a failed measurement too
            future.set_result(Measurement(None, error=error_line(e, with_type=True), board=self.board))
        return future

    def _record(self, c: Candidate, failures: list, future: Future) -> None:
        """Log one measurement as it arrives (a board's thread, for a farm); errors are kept for the caller."""
        try:
            m = future.result()
            for n, (board, error) in enumerate(m.attempts):
                self.log.add({"key": f"attempt|{c.key}|{n}", "board": board, "error": error})
            c.latency_ms, c.error = m.latency_ms, m.error
            if m.kernels:
                self.kernels.add(list(m.kernels), m.latency_ms)
            self.log.add({"key": f"latency|{c.key}", "point": list(c.point), "latency_ms": c.latency_ms,
                          "error": c.error, "board": m.board or self.board})
            if c.error:
                log.warning("candidate %s failed: %s", c.label, c.error)
            for hook in self.on_measured:
                hook(c)
        except BaseException as e:  # e.g. the log's disk is full: the search must stop, not lose it quietly
            failures.append(e)

    def _unmeasurable(self) -> list[dict] | None:
        """The failed latency records in log order, when no latency was ever measured; else None."""
        lat = [r for k, r in self.log.snapshot() if k.startswith("latency|")]
        if lat and all(r.get("latency_ms") is None for r in lat):
            return lat
        return None

    def _unmeasurable_error(self, failed: list[dict]) -> MeasureError:
        first = next((r["error"] for r in failed if r.get("error")), "no error recorded")
        return MeasureError(f"latency could not be measured on {self.spec.name}: {first} ({len(failed)} "
                            f"measurement(s) failed, none succeeded; log {self.log.path})")

    def signatures(self, point: Point, build: bool = True) -> list[str] | None:
        """The candidate's kernel calls (see :mod:`.kernelcache`), kept in the log; None if that needs a
        build and ``build`` is False (a build already made for its accuracy costs one run)."""
        if point not in self._signatures:
            key = f"kernels|{self.space.key(point)}"
            if (rec := self.log.get(key)) is not None:
                self._signatures[point] = rec["signatures"]
            elif build or point in self._executables:
                from tvm import relax
                import tvm

                vm = relax.VirtualMachine(self.executable(point), tvm.cpu())
                rng = np.random.default_rng(0)
                args = [tvm.runtime.tensor(rng.standard_normal(s).astype(d)) for s, d in self._input_spec()]
                self._signatures[point] = [sig for sig, _ in profile_calls(vm, args, runs=1)]
                self.log.add({"key": key, "signatures": self._signatures[point]})
            else:
                return None
        return self._signatures[point]

    def estimate(self, point: Point, build: bool = True) -> float | None:
        """Latency from cached per-kernel times, without a device measurement (None if a kernel is new).

        The candidate is built for this machine and run once under the VM's
        instrument hook to list its kernel calls; only for devices that are
        this machine, where those calls are the device's calls. With
        ``build=False``, only candidates already built or listed are estimated.
        """
        if not self.spec.is_local:
            return None
        sigs = self.signatures(point, build)
        return None if sigs is None else self.kernels.estimate(sigs)

    def estimate_partial(self, point: Point, build: bool = False) -> float | None:
        """:meth:`estimate`, with kernels never timed priced like timed ones of their kind (see
        :meth:`KernelCache.estimate_partial`); a guess, used to rank candidates, never as a result."""
        if not self.spec.is_local:
            return None
        sigs = self.signatures(point, build)
        return None if sigs is None else self.kernels.estimate_partial(sigs)

    def _input_spec(self):
        return [([d if d is not None else self.device_batch for d in i.shape], i.dtype) for i in self.infos]

    def _check_time(self) -> None:
        if self.time_budget is not None and time.perf_counter() - self.t0 > self.time_budget:
            raise BudgetExhausted(f"{self.time_budget:g}s")

    # -- results ---------------------------------------------------------------
    def all_candidates(self) -> list[Candidate]:
        points = {tuple(r["point"]) for k, r in self.log.snapshot() if "point" in r}
        return [self.candidate(p) for p in sorted(points)]

    def budget_text(self) -> str:
        """The weight budget for messages: ``"1.20 MB (1200000 bytes)"``."""
        return f"{format_bytes(self.max_weight_bytes)} ({self.max_weight_bytes} bytes)"

    def choose(self) -> tuple[Candidate | None, bool, str]:
        cands = self.all_candidates()
        within = ""
        if self.max_weight_bytes is not None:  # over the budget never wins; sizes of old logs counted now
            for c in cands:
                if c.accuracy is not None and c.weight_bytes is None:
                    c.weight_bytes = self.weight_bytes(c.point)
            sized = [c for c in cands if c.accuracy is not None and c.error is None]
            cands = [c for c in cands if c.weight_bytes is not None and c.weight_bytes <= self.max_weight_bytes]
            if sized and not any(c.accuracy is not None and c.error is None for c in cands):
                small = min(sized, key=lambda c: (c.weight_bytes, -c.accuracy, c.key))
                return None, False, (f"no candidate fits the weight budget of {self.budget_text()}: the smallest "
                                     f"evaluated, {small.label}, takes {format_bytes(small.weight_bytes)} "
                                     f"({small.weight_bytes} bytes); raise --max-weight-bytes or allow "
                                     "narrower weights")
            within = f" within the weight budget of {self.budget_text()}"
        measured = [c for c in cands if c.latency_ms is not None and c.accuracy is not None]
        good = [c for c in measured if c.accuracy >= self.threshold]
        if self.settle_rounds and (group := settled_group(self)):  # latencies taken in the same minutes
            good = [c for c in good if c.key in group] or good
        if good:
            fastest = min(c.latency_ms for c in good)
            close = [c for c in good if c.latency_ms <= fastest * (1 + self.tie_tolerance)]
            best = max(close, key=lambda c: (c.accuracy, -c.latency_ms))
            size = f", weights {format_bytes(best.weight_bytes)}" if within else ""
            return best, True, (f"{best.label} meets the target ({self.metric_name} {best.accuracy:.4f} >= "
                                f"{self.threshold:.4f}{size}){within}")
        evaluated = [c for c in cands if c.accuracy is not None and c.error is None]
        if not evaluated:
            return None, False, "no candidate could be evaluated; see the log for errors"
        best = max(evaluated, key=lambda c: (c.accuracy, -(c.latency_ms or float("inf"))))
        return best, False, (f"no candidate{within} met the target {self.metric_name} >= {self.threshold:.4f} "
                             f"(FP32 {self.fp32_score:.4f}, drop {self.target}); returning the most accurate: "
                             f"{best.label} at {best.accuracy:.4f}")

    def _settle(self) -> str:
        """Re-time the contenders side by side (:mod:`.settle`); a sentence for the result's message."""
        try:
            n = settle(self, self.settle_rounds)
        except MeasureError as e:  # the first measurements still stand; say the order may be the drift's
            log.warning("%s", e)
            return f"; the contenders could not be re-timed side by side ({e}), so their first measurements decide"
        self.retimed += n
        return f"; the contenders re-timed side by side ({n} runs in {self.settle_rounds} rounds)" if n else ""

    def run(self, algorithm) -> SearchResult:
        try:
            algorithm(self)
            stop = "search finished"
        except BudgetExhausted as e:
            stop = f"budget exhausted ({e})"
        stop += self._settle()
        best, met, msg = self.choose()
        if best is not None and not met and best.latency_ms is None and best.error is None:
            try:  # the answer is a build, so measure the most accurate candidate even when it misses
                self.latency(best.point)
            except BudgetExhausted:
                pass
            best, met, msg = self.choose()
        if (failed := self._unmeasurable()) is not None:  # "no candidate met the target" would hide the cause
            raise self._unmeasurable_error(failed)
        fp32 = next((c for c in self.all_candidates() if c.point == self.space.all_float()), None)
        result = SearchResult(best, met, f"{msg}; {stop}", self.threshold, fp32, self.all_candidates(),
                              self.trials, self.reused, time.perf_counter() - self.t0)
        if best is not None:
            result.strategy = self.strategy(best.point)
            if fp32 is not None and fp32.latency_ms and best.latency_ms and best.latency_ms > fp32.latency_ms:
                result.message += f"; WARNING: the chosen build is slower than FP32 ({best.latency_ms:.3f} > {fp32.latency_ms:.3f} ms)"
        return result
