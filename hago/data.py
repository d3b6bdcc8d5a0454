"""Calibration and evaluation samples, validated against the model's inputs.

Calibration quality depends on the data far more than on the calibrator, and a
wrong shape or a stray NaN otherwise surfaces deep inside TVM as an opaque
error (or, worse, as silently garbage thresholds). So every source is loaded
eagerly into plain numpy arrays and checked once, here, against the model's
:class:`InputInfo` list; each rule raises a one-line :class:`DataError` that
names the source, the input and the fix.

Axis 0 of every array is the sample axis. A model with a static batch (say
``(1, 3, 224, 224)``) still accepts any number of samples: only the non-batch
dimensions are checked, and the caller picks a matching ``batch_size``.

This module is pure numpy (no TVM import), so tools that only inspect data
stay light; :func:`hago.frontend.input_infos` builds the ``InputInfo`` list.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from hago.errors import DataError, check, error_line

logger = logging.getLogger(__name__)

LABEL_KEY = "label"

Source = Union[str, os.PathLike, Mapping[str, Any], Iterable, Callable[[], Any], np.ndarray]


@dataclass(frozen=True)
class InputInfo:
    """One model input: ``shape`` holds ints, or ``None`` for a symbolic dim."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def shape_str(self) -> str:
        """Render like ``(N, 1, 28, 28)``: ``N`` for a symbolic batch, ``?`` elsewhere."""
        dims = ["N" if d is None and i == 0 else "?" if d is None else str(d)
                for i, d in enumerate(self.shape)]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


class Samples:
    """Validated arrays, one per model input, plus optional labels.

    Holding everything in memory keeps calibration passes repeatable (each
    calibrator may iterate several times) and lets validation see the whole set.
    """

    def __init__(self, arrays: dict[str, np.ndarray], labels: np.ndarray | None = None,
                 notes: list[str] | None = None):
        self.arrays = arrays
        self.labels = labels
        #: one-line warnings about the data (e.g. it looks unnormalised), for the report's notes
        self.notes = list(notes or [])

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batches(self, batch_size: int, *, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{input name: array}`` slices of ``batch_size`` samples, in order.

        The last batch is shorter unless ``drop_last`` (for static-batch models).
        """
        check(isinstance(batch_size, int) and batch_size >= 1, DataError,
              f"batch_size must be a positive integer, got {batch_size!r}")
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.arrays.items()}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={v.shape}" for k, v in self.arrays.items())
        return f"Samples({len(self)} samples: {shapes}, labels={self.labels is not None})"


def load_samples(src: Source, inputs: list[InputInfo], *, require_label: bool = False,
                 name: str = "calibration") -> Samples:
    """Load and validate samples for a model with the given inputs.

    Parameters
    ----------
    src
        A path to an ``.npz`` file (arrays keyed by input name, optional
        ``label``); a dict of arrays; a numpy array (single-input models); an
        iterable of batches, each a dict, an array, or a tuple of arrays in
        input order with an optional trailing label array; or a zero-argument
        callable returning any of these (e.g. a generator function).
    inputs
        The model inputs, from :func:`hago.frontend.input_infos`.
    require_label
        Raise unless labels are present (evaluation data).
    name
        What the data is for, used in messages ("calibration", "evaluation").

    Returns
    -------
    Samples
        Arrays cast to the model dtypes; keys other than inputs and ``label`` are ignored.
    """
    check(len(inputs) > 0, DataError, "the model has no inputs to feed data to")
    if callable(src) and not isinstance(src, (Mapping, np.ndarray)):
        try:
            src = src()
        except Exception as exc:  # user code: report it, do not crash with a traceback
            raise DataError(f"{name} data callable raised {type(exc).__name__}: {error_line(exc, 'first')}") from exc
    arrays, labels, where = _collect(src, inputs, name)
    check(not (require_label and labels is None), DataError,
          f"{name} data {where} has no '{LABEL_KEY}' array; add the labels "
          f"(e.g. np.savez(path, ..., {LABEL_KEY}=y))")
    return _validate(arrays, labels, inputs, name, where)


def _collect(src: Any, inputs: list[InputInfo], name: str) -> tuple[dict, Any, str]:
    """Turn any supported source into ``({input: array}, labels, description)``."""
    if isinstance(src, (str, os.PathLike)):
        data = _read_npz(Path(src), name)
        return _pick(data, inputs, name, f"'{src}'") + (f"'{src}'",)
    if isinstance(src, Mapping):
        return _pick(src, inputs, name, "dict") + ("dict",)
    if _is_array(src):
        check(len(inputs) == 1, DataError,
              f"{name} data is a single array but the model has {len(inputs)} inputs "
              f"({_names(inputs)}); pass a dict keyed by input name")
        return {inputs[0].name: src}, None, "array"
    if isinstance(src, Iterable):
        return _concat_batches(src, inputs, name) + ("iterable",)
    raise DataError(f"{name} data of type {type(src).__name__} is not supported; pass an .npz "
                    f"path, a dict of arrays, an iterable of batches or a callable returning one")


def check_npz_file(path: str | os.PathLike, name: str = "calibration") -> None:
    """Check an ``.npz`` before any model is loaded: a readable archive, with valid labels if it has any.

    Reads only the ``label`` array, so the command line can refuse a broken
    file or NaN labels in a second instead of after a build; the input
    arrays are checked against the model by :func:`load_samples`.
    """
    path = Path(path)
    with _open_npz(path, name) as loaded:
        if LABEL_KEY in loaded.files:
            try:
                labels = loaded[LABEL_KEY]
            except Exception as exc:
                raise DataError(f"{name} file '{path}' cannot be read as .npz ({error_line(exc, 'first')})") from exc
            _class_indices(labels, name, f"'{path}'")


def _open_npz(path: Path, name: str):
    check(path.exists(), DataError, f"{name} file '{path}' does not exist")
    check(path.is_file(), DataError, f"{name} file '{path}' is not a file")
    with open(path, "rb") as f:
        magic = f.read(6)
    check(not magic.startswith(b"\x93NUMPY"), DataError,
          f"{name} file '{path}' is a single .npy array, not a .npz archive; "
          f"write it with np.savez(path, input_name=array)")
    check(magic.startswith(b"PK"), DataError,
          f"{name} file '{path}' is not a .npz archive; write it with np.savez(path, input_name=array)")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{name} file '{path}' is not a readable .npz archive ({error_line(exc, 'first')}); "
                        f"write it with np.savez(path, input_name=array)") from exc


def _read_npz(path: Path, name: str) -> dict[str, np.ndarray]:
    loaded = _open_npz(path, name)
    try:
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    except Exception as exc:
        raise DataError(f"{name} file '{path}' cannot be read as .npz ({error_line(exc, 'first')})") from exc


def _pick(data: Mapping, inputs: list[InputInfo], name: str, where: str) -> tuple[dict, Any]:
    """Select input arrays and the label from a mapping; other keys are ignored."""
    missing = [i.name for i in inputs if i.name not in data]
    check(not missing, DataError,
          f"{name} data {where} has no array for input '{missing[0] if missing else ''}'; "
          f"expected keys: {_names(inputs)} (optional: {LABEL_KEY}), found: {', '.join(map(str, data)) or 'none'}")
    extra = [k for k in data if k not in {i.name for i in inputs} | {LABEL_KEY}]
    if extra:
        logger.debug("%s data %s: ignoring keys %s", name, where, extra)
    return {i.name: data[i.name] for i in inputs}, data.get(LABEL_KEY)


def _concat_batches(src: Iterable, inputs: list[InputInfo], name: str) -> tuple[dict, Any]:
    """Materialise an iterable of batches into one array per input."""
    parts: dict[str, list] = {i.name: [] for i in inputs}
    label_parts: list = []
    try:
        for k, batch in enumerate(src):
            arrays, labels = _batch_to_dict(batch, inputs, name, k)
            for key, arr in arrays.items():
                parts[key].append(_as_array(arr, name, key))
            if labels is not None:
                label_parts.append(np.asarray(labels))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{name} data iterable raised {type(exc).__name__}: {error_line(exc, 'first')}") from exc
    check(len(parts[inputs[0].name]) > 0, DataError,
          f"{name} data iterable yielded no batches (0 samples); provide at least one sample")
    check(len(label_parts) in (0, len(parts[inputs[0].name])), DataError,
          f"{name} data iterable has labels in only {len(label_parts)} of "
          f"{len(parts[inputs[0].name])} batches; give every batch a label or none")
    merged = {}
    for key, arrs in parts.items():
        ranks = {a.ndim for a in arrs}
        check(len(ranks) == 1 and min(ranks) >= 1, DataError,
              f"{name} input '{key}' batches have ranks {sorted(ranks)}; every batch needs "
              f"the same rank with the sample axis first")
        try:
            merged[key] = np.concatenate(arrs, axis=0)
        except ValueError as exc:
            raise DataError(f"{name} input '{key}' batches have inconsistent shapes "
                            f"({', '.join(str(a.shape) for a in arrs[:3])}, ...)") from exc
    labels = np.concatenate([np.atleast_1d(l) for l in label_parts]) if label_parts else None
    return merged, labels


def _batch_to_dict(batch: Any, inputs: list[InputInfo], name: str, k: int) -> tuple[dict, Any]:
    where = f"batch {k}"
    if isinstance(batch, Mapping):
        return _pick(batch, inputs, name, f"iterable {where}")
    if _is_array(batch):
        check(len(inputs) == 1, DataError,
              f"{name} data iterable {where} is a single array but the model has "
              f"{len(inputs)} inputs ({_names(inputs)}); yield dicts keyed by input name")
        return {inputs[0].name: batch}, None
    if isinstance(batch, (tuple, list)):
        n = len(inputs)
        check(len(batch) in (n, n + 1), DataError,
              f"{name} data iterable {where} is a tuple of {len(batch)} items; expected {n} "
              f"input arrays ({_names(inputs)}) optionally followed by a label array")
        arrays = {i.name: a for i, a in zip(inputs, batch)}
        return arrays, (batch[n] if len(batch) == n + 1 else None)
    raise DataError(f"{name} data iterable {where} is a {type(batch).__name__}; "
                    f"yield dicts, arrays or tuples of arrays")


def _validate(arrays: dict, labels: Any, inputs: list[InputInfo], name: str, where: str) -> Samples:
    out, notes = {}, []
    for info in inputs:
        arr = _as_array(arrays[info.name], name, info.name)
        check(arr.ndim == 0 or len(arr) > 0, DataError,
              f"{name} data {where} has 0 samples for input '{info.name}'; provide at least one")
        _check_shape(arr, info, name)
        note = _range_note(arr, info, name)
        if note:
            logger.warning("%s", note)
            notes.append(note)
        arr = _cast(arr, info, name)
        _check_finite(arr, info.name, name)
        out[info.name] = arr
    counts = {k: len(v) for k, v in out.items()}
    check(len(set(counts.values())) == 1, DataError,
          f"{name} inputs have different numbers of samples: "
          + ", ".join(f"{k}={v}" for k, v in counts.items()))
    n = next(iter(counts.values()))
    if labels is not None:
        labels = _class_indices(_as_array(labels, name, LABEL_KEY), name, where)
        check(len(labels) == n, DataError,
              f"{name} data {where} has {len(labels)} labels but {n} samples; "
              f"give exactly one label per sample")
    logger.info("%s data %s: %d samples", name, where, n)
    return Samples(out, labels, notes)


def check_labels(labels: Any, classes: int, name: str = "evaluation") -> np.ndarray:
    """Refuse labels outside ``[0, classes)``, once the model's output width is known.

    :func:`load_samples` already turned the labels into non-negative integer
    class indices; only the model knows how many classes there are, so the
    evaluation path calls this with its output width. A label of 10 on a
    10-way classifier would otherwise just count as wrong and make the
    reported accuracy meaningless.

    Returns
    -------
    np.ndarray
        The labels as int64 class indices.
    """
    labels = _class_indices(_as_array(labels, name, LABEL_KEY), name, "")
    classes = int(classes)
    bad = labels >= classes
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{name} label {i} is {int(labels[i])}, but the model has {classes} output classes "
                        f"(0..{classes - 1}); fix the labels or check that this is the right model")
    return labels


def _class_indices(labels: np.ndarray, name: str, where: str) -> np.ndarray:
    """Labels as int64 class indices: whole-number floats are cast, one-hot rows become their index.

    Anything else (NaN, fractions, negatives, rows that are not one-hot) is
    refused in one line naming the first bad label, since top-1 against such
    labels is a number without meaning.
    """
    src = f"{name} data {where}" if where else f"{name} data"
    check(labels.dtype.kind in "biuf", DataError,
          f"{src}: labels have dtype {labels.dtype}; expected integer class indices")
    labels = np.atleast_1d(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:   # a column of indices, e.g. y.reshape(-1, 1)
        labels = labels[:, 0]
    elif labels.ndim == 2:
        labels = _from_one_hot(labels, src)
    check(labels.ndim == 1, DataError,
          f"{src}: labels have shape {labels.shape}; expected one class index per sample (N,) "
          f"or one-hot rows (N, classes)")
    if labels.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(labels) | (labels != np.round(labels))
        _refuse_first(bad, labels, src, "labels must be whole-number class indices")
    if labels.dtype.kind in "if":
        _refuse_first(labels < 0, labels, src, "class indices start at 0")
    return labels.astype(np.int64)


def _from_one_hot(labels: np.ndarray, src: str) -> np.ndarray:
    """Class index of each one-hot row; refuse the first row that is not exactly one 1 among 0s."""
    with np.errstate(invalid="ignore"):
        ok = ((labels == 0) | (labels == 1)).all(axis=1) & (labels.sum(axis=1) == 1)
    if not ok.all():
        i = int(np.argmin(ok))
        row = np.array2string(labels[i], threshold=8, max_line_width=10**6)
        raise DataError(f"{src}: labels are 2-D {labels.shape} but row {i} is not one-hot ({' '.join(row.split())}); "
                        f"give one class index per sample, or rows with a single 1")
    return labels.argmax(axis=1)


def _refuse_first(bad: np.ndarray, labels: np.ndarray, src: str, rule: str) -> None:
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{src}: label {i} is {labels[i].item()!r}; {rule}")


def _range_note(arr: np.ndarray, info: InputInfo, name: str) -> str | None:
    """A warning when integer data above 1 feeds a float input: raw 0..255 pixels, most likely.

    Calibrating a model trained on normalised input with raw pixels gives
    ranges 100x too wide and an INT8 build near chance, silently. Some models
    do take 0..255, so this only warns.
    """
    if np.dtype(info.dtype).kind != "f" or arr.dtype.kind not in "iu" or arr.size == 0:
        return None
    top = arr.max()
    if top <= 1:
        return None
    return (f"{name} input '{info.name}' is {arr.dtype} data up to {top} for a {info.dtype} model: it looks "
            f"unnormalised (raw pixels?); if the model was trained on scaled input, scale the data the same way")


def _check_shape(arr: np.ndarray, info: InputInfo, name: str) -> None:
    """Rank must match; non-batch static dims must match exactly."""
    expect = info.shape
    ok = arr.ndim == len(expect) and arr.ndim >= 1 and all(
        d is None or d == s for d, s in zip(expect[1:], arr.shape[1:]))
    check(ok, DataError, f"{name} input '{info.name}' has shape {tuple(arr.shape)}; "
                         f"the model expects {info.shape_str()}")


def _cast(arr: np.ndarray, info: InputInfo, name: str) -> np.ndarray:
    """Cast numeric data to the model dtype; refuse strings, objects and lossy float->int."""
    target = np.dtype(info.dtype)
    src_kind = arr.dtype.kind
    ok = src_kind in "biuf" and not (target.kind in "biu" and src_kind == "f")
    check(ok, DataError, f"{name} input '{info.name}' has dtype {arr.dtype}; "
                         f"expected numeric data convertible to {info.dtype}")
    if arr.dtype != target:
        logger.debug("%s input '%s': casting %s -> %s", name, info.name, arr.dtype, target)
    return np.ascontiguousarray(arr, dtype=target)


def _check_finite(arr: np.ndarray, key: str, name: str) -> None:
    if arr.dtype.kind != "f":
        return
    bad = ~np.isfinite(arr)
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{name} input '{key}' has {count} NaN/inf values; the first is at "
                        f"index {first} (sample {first[0]}); clean or drop those samples")


def _as_array(value: Any, name: str, key: str) -> np.ndarray:
    """Convert a numpy array, torch tensor or nested list to an ndarray."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise DataError(f"{name} input '{key}' cannot be converted to an array: {error_line(exc, 'first')}") from exc


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or (hasattr(value, "detach") and hasattr(value, "shape"))


def _names(inputs: list[InputInfo]) -> str:
    return ", ".join(i.name for i in inputs)


