"""Make an ONNX file as it comes from the wild importable: a relaxed batch and folded shape arithmetic.

Two habits of real exports break a compiler that calibrates in batches:

- **A static batch.** ``torch.onnx.export(model, x, path)`` with its defaults
  writes the example's batch (almost always 1) into every input, output and
  often into ``Reshape`` constants (``[1, 3136]``). Calibrating such a model
  in batches of 64 fails inside TVM.
- **Shape arithmetic.** "Same" padding, resize sizes and reshape targets are
  often computed at run time from ``Shape`` ops. TVM's importer refuses
  dynamic pads, even where every input dimension is known.

:func:`prepare_onnx` therefore

1. **relaxes a static batch where that is safe**: the batch dimension of the
   inputs and outputs becomes symbolic, and a ``Reshape`` whose constant
   target starts with the batch gets ``0`` there (ONNX: "copy this dim from
   the input"). Safety is not guessed from the graph, it is *checked*: ONNX
   Runtime runs the relaxed model on a batch of two random samples and the
   original model on each sample alone, and the relaxed model is used only
   when the outputs agree. Otherwise the file keeps its static batch and hago
   calibrates and evaluates in batches of that size instead (slower, exact).
   Why relax at all: one relaxed import serves calibration (64 per batch),
   evaluation (250) and the deployment batch, and the graph is the same one a
   dynamic-batch export of the model gives, so its strategy hash matches.
2. **folds shape computations to constants** with onnxscript's constant
   folder and ONNX shape inference (``Shape -> Gather -> ... -> Pad``
   collapses to a constant ``pads`` wherever the dims involved are static).

Everything here works on the ONNX proto before TVM sees it; failures of the
optional steps are logged and the step is skipped, never fatal.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np

from .errors import error_line

log = logging.getLogger(__name__)

__all__ = ["OnnxPrep", "prepare_onnx", "static_batch_of", "fold_shapes", "pinned_batch"]

#: Relative and absolute tolerance for "the relaxed model computes the same thing", per output.
_RTOL, _ATOL = 1e-4, 1e-5
_BATCH_PARAM = "batch"


@dataclass
class OnnxPrep:
    """The proto to import and what was done to it (for the report)."""

    proto: object
    declared_batch: int | None = None  # the file's static batch, None when it was already symbolic
    relaxed: bool = False
    notes: list[str] = field(default_factory=list)


def _dims(value_info) -> list:
    """``[int | str | None]`` per dim of a graph input/output (str: a dim_param)."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    out = []
    for d in t.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def _graph_inputs(proto) -> list:
    """Real inputs: old exporters list initializers among the graph inputs too."""
    inits = {i.name for i in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def static_batch_of(proto) -> int | None:
    """The shared static leading dim of every input, when every other dim is static too; else None."""
    batches = set()
    for inp in _graph_inputs(proto):
        dims = _dims(inp)
        if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
            return None
        batches.add(dims[0])
    return batches.pop() if len(batches) == 1 else None


def pinned_batch(proto, batch: int = 1):
    """A copy of ``proto`` whose symbolic leading input (and output) dims are ``batch``; None if it has none.

    The way back for a dynamic-batch file TVM's importer cannot take: some
    TorchScript exports (``dynamo=False`` with ``dynamic_axes``) compute shapes
    from a symbolic batch that the importer loses (a ``Split`` whose parts it
    gives no shape, then a ``Reshape`` of one of them). Pinned, the file is a
    static one and goes through :func:`prepare_onnx` like any batch-1 export:
    shapes folded, the batch relaxed again where ONNX Runtime confirms it.
    """
    cand = copy.deepcopy(proto)

    def pin(values) -> bool:
        done = False
        for vi in values:
            dims = _dims(vi)
            if dims and (not isinstance(dims[0], int) or dims[0] <= 0):
                d = vi.type.tensor_type.shape.dim[0]
                d.ClearField("dim_param")
                d.dim_value = batch
                done = True
        return done

    if not pin(_graph_inputs(cand)):
        return None
    pin(cand.graph.output)
    return cand


def prepare_onnx(proto) -> OnnxPrep:
    """Fold shape arithmetic, then relax a static batch (verified with ONNX Runtime); see the module doc.

    Folding comes first, while every dim is still static: ONNX Runtime folds
    ``Shape`` only of fully static tensors. A batch that folding bakes into a
    ``Reshape`` target is what the relaxation's reshape patch undoes.
    """
    batch = static_batch_of(proto)
    proto = fold_shapes(proto)
    prep = OnnxPrep(proto, declared_batch=batch)
    if batch is not None:
        relaxed = _try_relax(proto, batch)
        if relaxed is not None:
            prep.proto, prep.relaxed = relaxed, True
            prep.notes.append(f"the model file declares a static batch of {batch}; the batch dimension was made "
                              f"symbolic (checked with ONNX Runtime: same outputs per sample)")
        else:
            prep.notes.append(f"the model file declares a static batch of {batch} that its graph depends on; "
                              f"calibration and evaluation run in batches of {batch}")
    return prep


def _try_relax(proto, batch: int):
    """The relaxed proto, or None when no relaxation reproduces the static model."""
    for patch_reshapes in (True, False):
        cand = _relaxed(proto, batch, patch_reshapes)
        if cand is None:
            continue
        ok, why = _same_per_sample(proto, cand, batch)
        if ok:
            return cand
        log.info("relaxing the batch (%s reshape patch) does not reproduce the model: %s",
                 "with" if patch_reshapes else "without", why)
    return None


def _relaxed(proto, batch: int, patch_reshapes: bool):
    import onnx

    cand = copy.deepcopy(proto)
    g = cand.graph
    for vi in _graph_inputs(cand):
        vi.type.tensor_type.shape.dim[0].dim_param = _BATCH_PARAM
    for vi in g.output:
        dims = _dims(vi)
        if dims and dims[0] == batch:
            vi.type.tensor_type.shape.dim[0].dim_param = _BATCH_PARAM
    del g.value_info[:]  # intermediate shapes were inferred for the static batch
    if patch_reshapes:
        if not _patch_reshape_targets(cand, batch):
            return None  # nothing to patch: the unpatched attempt covers it
    try:
        onnx.checker.check_model(cand)
    except Exception as exc:  # noqa: BLE001 - any checker complaint means: do not use it
        log.info("relaxed model fails the ONNX checker: %s", exc)
        return None
    return cand


def _patch_reshape_targets(proto, batch: int) -> bool:
    """``Reshape(x, [batch, ...])`` -> ``Reshape(x, [-1, ...])`` (or ``[0, ...]``) for constant targets.

    ``-1`` ("whatever is left") when no other entry is ``-1``; otherwise ``0``
    ("copy the input's dim"), which needs ``allowzero=0``. torch's exporter
    writes ``allowzero=1``, so the ``-1`` form is the common one. Targets with
    a real 0 are left alone. Returns True if any target changed.
    """
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.attribute}
    changed = False
    for k, node in enumerate(g.node):
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        arr = _const_array(node.input[1], inits, consts, numpy_helper)
        if arr is None or arr.ndim != 1 or len(arr) < 1 or int(arr[0]) != batch or 0 in arr:
            continue
        new = arr.astype(np.int64).copy()
        if -1 not in arr[1:]:
            new[0] = -1
        else:
            new[0] = 0
            kept = [a for a in node.attribute if a.name != "allowzero"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("allowzero", 0)])
        new_name = f"{node.input[1]}__hago_batch{k}"
        g.initializer.append(numpy_helper.from_array(new, new_name))
        node.input[1] = new_name
        changed = True
    return changed


def _const_array(name, inits, consts, numpy_helper):
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = consts.get(name)
    if node is not None:
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return None


def _example_inputs(proto, batch: int, rng) -> dict[str, np.ndarray]:
    from onnx import helper

    feeds = {}
    for vi in _graph_inputs(proto):
        dims = [batch, *_dims(vi)[1:]]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        if dtype.kind == "f":
            feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind == "b":
            feeds[vi.name] = rng.integers(0, 2, dims).astype(dtype)
        else:  # ids, masks: small non-negative values are valid for any table
            feeds[vi.name] = rng.integers(0, 2, dims).astype(dtype)
    return feeds


def _same_per_sample(original, relaxed, batch: int) -> tuple[bool, str]:
    """Run ``relaxed`` on 2*batch samples and ``original`` on each batch of them; compare."""
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(4)  # a refused candidate is an answer, not an error for the user
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.intra_op_num_threads = 1
        ref = ort.InferenceSession(original.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        new = ort.InferenceSession(relaxed.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = [_example_inputs(original, batch, rng) for _ in range(2)]
        both = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
        got = new.run(None, both)
        want = [ref.run(None, f) for f in feeds]
    except Exception as exc:  # noqa: BLE001 - ORT refusing the relaxed graph is the answer
        return False, error_line(exc, "first")
    for k, out in enumerate(got):
        exp = np.concatenate([w[k] for w in want])
        if out.shape != exp.shape:
            return False, f"output {k} has shape {out.shape}, expected {exp.shape}"
        if not np.allclose(out, exp, rtol=_RTOL, atol=_ATOL, equal_nan=True):
            return False, f"output {k} differs by up to {float(np.max(np.abs(out - exp))):.3g}"
    return True, ""


def fold_shapes(proto):
    """Fold ``Shape``-derived arithmetic (pads, reshape targets, resize sizes) to constants.

    ONNX Runtime's *basic* graph optimisations do exactly this with its own
    shape inference: constant folding (``Shape`` of a statically shaped
    tensor included), redundant-node removal and semantics-preserving fusions
    into standard ONNX ops (Conv+BatchNorm and the like); contrib-op fusions
    belong to the higher levels and are not used. onnxscript's folder was
    tried first and leaves TorchScript's ``Shape -> Gather -> ... -> Pad``
    chains in place. Returns the input unchanged (and logs why) if ONNX
    Runtime fails; a model it cannot load is reported later by TVM's importer.
    """
    import tempfile
    from pathlib import Path

    try:
        import onnx
        import onnxruntime as ort

        if not any(n.op_type in _SHAPE_OPS for n in proto.graph.node):
            return proto  # nothing to fold: skip the round trip
        ort.set_default_logger_severity(4)
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        with tempfile.TemporaryDirectory(prefix="hago_fold_") as tmp:
            out = Path(tmp) / "folded.onnx"
            opts.optimized_model_filepath = str(out)
            ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            folded = onnx.load(str(out))
        # ORT declares every domain it knows; keep the file's own, so the result reads like the input
        kept = [o for o in folded.opset_import if o.domain in {p.domain for p in proto.opset_import} | {""}]
        del folded.opset_import[:]
        folded.opset_import.extend(kept)
        return folded
    except Exception as exc:  # noqa: BLE001 - folding is an optimisation of the import, never required
        log.info("shape folding skipped: %s", error_line(exc, "first", limit=None))
        return proto


#: Ops whose presence means there is shape arithmetic worth folding.
_SHAPE_OPS = frozenset({"Shape", "Size", "ConstantOfShape", "Range"})
