"""Frontend: turn an ONNX file, a torch module or a Relax module into one canonical IRModule.

Every later stage (prepare, annotate, calibrate, realize) assumes the same
shape of program, so the frontend guarantees it once:

- ``main`` takes the model inputs and nothing else: weights are bound as
  constants, which lets ``prepare`` fold them and ``annotate`` see them;
- the batch dimension is symbolic where the exporter allows it, so one build
  serves calibration, evaluation and deployment batch sizes;
- a single-output model returns a tensor, not a 1-tuple (torch.export
  always returns a tuple);
- the body sits in a dataflow block, which the dpl rewriters require.

Import failures become one-line :class:`FrontendError` messages; torch and
onnx are imported only when a model of that kind is given.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from hago.data import InputInfo
from hago.errors import FrontendError, check, error_line

logger = logging.getLogger(__name__)

__all__ = ["InputInfo", "Imported", "import_model", "load_model", "input_infos", "fixed_batch",
           "bind_symbolic_dims"]

_NOISY_TORCH_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export")

Shapes = Mapping[str, Sequence[int]] | Sequence[Sequence[int]]


@dataclass
class Imported:
    """An imported module plus what the import learned about the file.

    ``declared_batch`` is the static batch the model file (or torch example)
    declared, kept so a build can have the model's own input signature even
    when the batch was relaxed for calibration; ``notes`` go to the report.
    """

    mod: tvm.IRModule
    declared_batch: int | None = None
    notes: list[str] = field(default_factory=list)


def load_model(model: Any, example_inputs: Any = None, input_shapes: Shapes | None = None) -> tvm.IRModule:
    """The module of :func:`import_model`, for callers that need nothing else."""
    return import_model(model, example_inputs, input_shapes).mod


def import_model(model: Any, example_inputs: Any = None, input_shapes: Shapes | None = None) -> Imported:
    """Import a model into a Relax IRModule whose ``main`` is ready for :func:`hago.prepare.prepare`.

    Parameters
    ----------
    model
        A path to an ``.onnx`` file, a ``torch.nn.Module`` or a ``tvm.IRModule``.
    example_inputs
        torch only: a tensor or tuple of tensors to trace with. Required unless
        ``input_shapes`` is given (float32 zeros of those shapes are used then).
    input_shapes
        ``{input name: shape}`` (ONNX: overrides the file's shapes) or, for
        torch, a list of shapes in argument order.

    Returns
    -------
    Imported
        ``mod``: ``main`` with weights as constants, a symbolic batch dim where
        possible (a static ONNX batch is relaxed when ONNX Runtime confirms it
        is safe, :mod:`hago.onnx_prep`), a single tensor output for
        single-output models and a dataflow block.
    """
    if isinstance(model, tvm.IRModule):
        imp = Imported(model)
    elif isinstance(model, (str, os.PathLike)):
        imp = _from_onnx(Path(model), input_shapes)
    elif _is_torch_module(model):
        imp = _from_torch(model, example_inputs, input_shapes)
    else:
        raise FrontendError(f"cannot load a model of type {type(model).__name__}; pass an .onnx path, "
                            f"a torch.nn.Module or a tvm.IRModule")
    imp.mod = _canonicalize(imp.mod)
    if imp.declared_batch is None:
        imp.declared_batch = fixed_batch(input_infos(imp.mod))
    return imp


def input_infos(mod: tvm.IRModule) -> list[InputInfo]:
    """Describe ``main``'s parameters; symbolic dims (e.g. the batch) become ``None``."""
    check("main" in [gv.name_hint for gv in mod.get_global_vars()], FrontendError,
          "the IRModule has no 'main' function")
    infos = []
    for param in mod["main"].params:
        ty = param.ty
        check(isinstance(ty, relax.TensorType) and ty.shape is not None, FrontendError,
              f"model input '{param.name}' is not a tensor of known rank ({ty}); give it a static rank")
        dims = tuple(int(d.value) if isinstance(d, tvm.tirx.IntImm) else None for d in ty.shape.values)
        infos.append(InputInfo(param.name, dims, str(ty.dtype)))
    return infos


def fixed_batch(infos: list[InputInfo]) -> int | None:
    """The batch every input is fixed to, or None when the batch is symbolic (or inputs disagree)."""
    firsts = {i.shape[0] if i.shape else None for i in infos}
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


def bind_symbolic_dims(mod: tvm.IRModule, shapes: Mapping[str, Sequence[int]]) -> tuple[tvm.IRModule, dict]:
    """Bind symbolic input dims other than the batch (dim 0) to the sizes in ``shapes`` (input -> shape).

    A model exported with a symbolic height, width or sequence length is
    quantized for the sizes its calibration data has: hago's integer kernels
    tile exact shapes. Returns the module and ``{dim name: size}``.
    """
    binding: dict[str, int] = {}
    for param in mod["main"].params:
        shape = shapes.get(param.name)
        if shape is None:
            continue
        for axis, dim in enumerate(param.ty.shape.values):
            if axis == 0 or not isinstance(dim, tvm.tirx.Var):
                continue
            size = int(shape[axis])
            if binding.get(dim.name, size) != size:
                raise FrontendError(f"model input '{param.name}' dim {axis} ('{dim.name}') is {size} in the data "
                                    f"but {binding[dim.name]} elsewhere; give inputs consistent shapes")
            binding[dim.name] = size
    if not binding:
        return mod, {}
    return relax.transform.BindSymbolicVars(binding, "main")(mod), binding


def symbolic_dims(infos: list[InputInfo]) -> list[str]:
    """``input[axis]`` for every symbolic dim other than the batch."""
    return [f"{i.name}[{axis}]" for i in infos for axis, d in enumerate(i.shape) if axis > 0 and d is None]


def _from_onnx(path: Path, input_shapes: Shapes | None) -> Imported:
    check(path.exists(), FrontendError, f"model file '{path}' does not exist")
    check(path.suffix.lower() == ".onnx", FrontendError,
          f"model file '{path}' is not an .onnx file; export the model to ONNX or pass a torch.nn.Module")
    try:
        import onnx
    except ImportError as exc:
        raise FrontendError("loading ONNX models needs the onnx package: pip install onnx") from exc
    from tvm.relax.frontend.onnx import from_onnx

    try:
        proto = onnx.load(str(path))
    except Exception as exc:
        raise FrontendError(f"model file '{path}' is not a valid ONNX model ({error_line(exc, 'first', 240)})") from exc
    check(len(proto.graph.node) > 0 and len(proto.graph.output) > 0, FrontendError,
          f"model file '{path}' is not a valid ONNX model (empty graph); re-export it")
    if input_shapes is not None:
        check(isinstance(input_shapes, Mapping), FrontendError,
              "input_shapes for an ONNX model must be a dict {input name: shape}")
        graph_inputs = [i.name for i in proto.graph.input]
        unknown = [k for k in input_shapes if k not in graph_inputs]
        check(not unknown, FrontendError,
              f"input_shapes names '{unknown[0] if unknown else ''}', which model file '{path}' "
              f"does not have; its inputs are: {', '.join(graph_inputs)}")
        input_shapes = {k: [int(d) for d in v] for k, v in input_shapes.items()}
    if input_shapes is not None:
        return Imported(_import_onnx(from_onnx, proto, input_shapes, path))
    from .onnx_prep import pinned_batch

    try:
        return _import_prepared(from_onnx, proto, path)[0]
    except FrontendError as exc:
        pinned = pinned_batch(proto)
        if pinned is None:
            raise
        # the importer lost a shape that hangs on the symbolic batch: import the file as a batch-1 export
        logger.info("TVM cannot import %s with its symbolic batch (%s); importing it at batch 1", path, exc)
        try:
            imp, relaxed = _import_prepared(from_onnx, pinned, path)
        except FrontendError:
            raise exc from None  # the file's own failure is the one to report
        then = ("then its batch made symbolic again (checked with ONNX Runtime: same outputs per sample)" if relaxed
                else "calibration and evaluation run in batches of 1")
        # the file's batch is symbolic, so it declares none (builds take the usual default)
        return Imported(imp.mod, None, [f"TVM's ONNX importer cannot take this file's symbolic batch; it was "
                                        f"imported at batch 1, {then}"])


def _import_prepared(from_onnx, proto, path: Path) -> tuple[Imported, bool]:
    """Import ``proto`` after :func:`hago.onnx_prep.prepare_onnx`; a relaxed batch TVM refuses falls back to
    the file's static one. ``(imported, whether the imported batch is a relaxed static one)``."""
    from .onnx_prep import fold_shapes, prepare_onnx

    prep = prepare_onnx(proto)
    try:
        mod = _import_onnx(from_onnx, prep.proto, None, path)
    except FrontendError:
        if not prep.relaxed:
            raise
        # TVM's importer may refuse a symbolic batch where ONNX Runtime took it: keep the file's batch
        log_msg = "TVM cannot import the relaxed batch of %s; importing it with its static batch"
        logger.info(log_msg, path)
        mod = _import_onnx(from_onnx, fold_shapes(proto), None, path)  # the static file, folded
        notes = [f"the model file declares a static batch of {prep.declared_batch}; calibration and "
                 f"evaluation run in batches of {prep.declared_batch}"]
        return Imported(mod, prep.declared_batch, notes), False
    return Imported(mod, prep.declared_batch, list(prep.notes)), prep.relaxed


def _import_onnx(from_onnx, proto, input_shapes, path: Path) -> tvm.IRModule:
    from .native_log import drop_native_lines

    printed = io.StringIO()  # the importer print()s "Error converting operator ..." before raising
    try:
        with drop_native_lines(), contextlib.redirect_stdout(printed):
            return from_onnx(proto, shape_dict=input_shapes, keep_params_in_input=False)
    except tvm.error.OpNotImplemented as exc:
        ops = str(exc).rsplit(":", 1)[-1].strip()
        raise FrontendError(f"ONNX model '{path}' uses operators TVM's ONNX importer does not support: "
                            f"{ops}; replace them or re-export the model without them") from exc
    except Exception as exc:
        raise FrontendError(f"cannot convert ONNX model '{path}' to Relax: {error_line(exc, 'first', 240)}") from exc
    finally:
        if printed.getvalue().strip():
            logger.debug("TVM's ONNX importer printed:\n%s", printed.getvalue())


def _from_torch(model: Any, example_inputs: Any, input_shapes: Shapes | None) -> Imported:
    """Export with ``torch.export`` (dynamic batch if possible) and convert to Relax."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    args = _torch_examples(torch, example_inputs, input_shapes)
    was_training = model.training
    model.eval()  # quantization targets inference: batch norm must use running stats
    try:
        program = _export(torch, model, args)
    finally:
        model.train(was_training)
    try:
        with warnings.catch_warnings():
            # TVM's importer deep-copies torch treespecs, which torch 2.13 flags as deprecated
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            from .native_log import drop_native_lines

            with drop_native_lines():
                mod = from_exported_program(program, keep_params_as_input=False, unwrap_unit_return_tuple=True)
    except Exception as exc:
        raise FrontendError(f"TVM's torch frontend cannot convert {type(model).__name__}: "
                            f"{error_line(exc, 'first', 240)}") from exc
    return Imported(mod)  # a static export's batch is read off the module by import_model


def _torch_examples(torch: Any, example_inputs: Any, input_shapes: Shapes | None) -> tuple:
    if example_inputs is None:
        check(input_shapes is not None, FrontendError,
              "a torch model needs example_inputs (a tensor or tuple of tensors) or input_shapes")
        shapes = input_shapes.values() if isinstance(input_shapes, Mapping) else input_shapes
        return tuple(torch.zeros(tuple(int(d) for d in s)) for s in shapes)
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    out = []
    for k, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            try:
                item = torch.as_tensor(item)
            except Exception as exc:
                raise FrontendError(f"example input {k} cannot be converted to a torch tensor: "
                                    f"{error_line(exc, 'first', 240)}") from exc
        out.append(item)
    return tuple(out)


def _export(torch: Any, model: Any, args: tuple) -> Any:
    """Try a shared dynamic batch dim first, then fall back to static shapes.

    torch.export specialises dims of size 1, so a batch-1 example is widened
    to 2 for the dynamic attempt. A failed attempt makes torch log warnings
    and print the partial graph to stderr; the failure is reported here
    instead, so that output is kept for ``--debug`` logging only.
    """
    captured = io.StringIO()
    try:
        with _quiet_torch_logs(), contextlib.redirect_stderr(captured):
            return _export_attempts(torch, model, args)
    finally:
        if captured.getvalue().strip():
            logger.debug("torch.export output:\n%s", captured.getvalue())


@contextlib.contextmanager
def _quiet_torch_logs():
    loggers = [logging.getLogger(n) for n in _NOISY_TORCH_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_attempts(torch: Any, model: Any, args: tuple) -> Any:
    name = type(model).__name__
    if args and all(a.dim() >= 1 for a in args) and len({a.shape[0] for a in args}) == 1:
        batch = torch.export.Dim("batch")
        wide = tuple(a.expand(2, *a.shape[1:]).clone() if a.shape[0] == 1 else a for a in args)
        try:
            return torch.export.export(model, wide, dynamic_shapes=tuple({0: batch} for _ in wide))
        except Exception as exc:  # data-dependent shapes, reshapes baking in the batch, ...
            logger.info("dynamic-batch export of %s failed (%s); exporting with static shapes",
                        name, error_line(exc, 'first', 240))
    try:
        return torch.export.export(model, args)
    except Exception as exc:
        raise FrontendError(f"torch.export failed for {name}: {error_line(exc, 'first', 240)}; "
                            f"make the model exportable or export it to ONNX") from exc


def _canonicalize(mod: tvm.IRModule) -> tvm.IRModule:
    check("main" in [gv.name_hint for gv in mod.get_global_vars()], FrontendError,
          "the IRModule has no 'main' function; name the entry function 'main'")
    func = mod["main"]
    check(isinstance(func, relax.Function), FrontendError, "'main' is not a Relax function")
    func = _unwrap_unit_tuple(func)
    mod = mod.clone()  # never mutate the caller's module
    mod["main"] = func
    if not _has_dataflow(func):
        mod = relax.transform.ConvertToDataflow(min_size=1)(mod)
    return relax.transform.CanonicalizeBindings()(mod)


def _unwrap_unit_tuple(func: relax.Function) -> relax.Function:
    """Return the only field when ``main`` returns a 1-tuple (a torch.export habit)."""
    ret = func.ret_ty
    if not (isinstance(ret, relax.TupleType) and len(ret.fields) == 1):
        return func
    body = func.body
    out = relax.Var("output", ret.fields[0])
    block = relax.BindingBlock([relax.VarBinding(out, relax.TupleGetItem(body.body, 0))])
    new_body = relax.SeqExpr([*body.blocks, block], out)
    return relax.Function(func.params, new_body, ret.fields[0], func.is_pure, func.attrs, func.span)


def _has_dataflow(func: relax.Function) -> bool:
    return isinstance(func.body, relax.SeqExpr) and any(
        isinstance(b, relax.DataflowBlock) for b in func.body.blocks)


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # a torch module implies torch is already imported
    return torch is not None and isinstance(obj, torch.nn.Module)


