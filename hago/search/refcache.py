"""Data-only files for the search's reference caches (calibration statistics, corrections, FP32 outputs).

The cache directory may be shared, so nothing in it is ever executed: no
pickle. A cache file is either JSON (``.json``) or an ``.npz`` read with
``allow_pickle=False`` whose JSON tree sits in a 0-d unicode array
``__meta__`` and whose numeric arrays are referenced from the tree as
``{"__array__": name}``. Every file carries an envelope, as the tuning cache's
``meta.json`` does (:mod:`hago.tune.cache`)::

    {"schema": "hago.search.reference", "version": 1, "kind": "calibration",
     "key": {...what the content was computed from...}, "data": ...}

:func:`load_npz` and :func:`load_json` return ``None`` (and log a warning)
for a file that is missing, unreadable, of another schema, version, kind or
key, or malformed: the caller recomputes and overwrites it. A cache never
makes a search fail.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import error_line

log = logging.getLogger(__name__)

SCHEMA = "hago.search.reference"
VERSION = 1
_META = "__meta__"
_ARRAY = "__array__"
_NUMERIC = "biuf"  # bool, int, uint, float: what an array in a cache may hold


class CacheFormatError(ValueError):
    """A cache file is not what it should be (internal: it is logged and recomputed, never shown as an error)."""


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _plain(value: Any, arrays: dict[str, np.ndarray] | None) -> Any:
    """``value`` as JSON data; arrays go to ``arrays`` (npz) or become lists (``arrays`` None)."""
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("cache keys must be strings")
        return {k: _plain(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, arrays) for v in value]
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _NUMERIC:
            raise TypeError(f"cannot cache an array of dtype {value.dtype}")
        if arrays is None:
            return value.tolist()
        name = f"a{len(arrays)}"
        arrays[name] = np.ascontiguousarray(value)
        return {_ARRAY: name}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot cache a {type(value).__name__}")


def _envelope(kind: str, key: dict, data: Any) -> dict:
    return {"schema": SCHEMA, "version": VERSION, "kind": kind, "key": key, "data": data}


def _open_envelope(meta: Any, kind: str, key: dict) -> Any:
    if not isinstance(meta, dict):
        raise CacheFormatError("not a hago cache file")
    if meta.get("schema") != SCHEMA or meta.get("version") != VERSION:
        raise CacheFormatError(f"schema {meta.get('schema')!r} version {meta.get('version')!r}, "
                               f"expected {SCHEMA!r} version {VERSION}")
    if meta.get("kind") != kind:
        raise CacheFormatError(f"holds {meta.get('kind')!r}, expected {kind!r}")
    if meta.get("key") != json.loads(json.dumps(_plain(key, None))):
        raise CacheFormatError("computed from other inputs (key mismatch)")
    if "data" not in meta:
        raise CacheFormatError("no data")
    return meta["data"]


def save_json(path: str | Path, kind: str, key: dict, data: Any) -> None:
    """Write ``data`` (dicts, lists, numbers, strings, numeric arrays as lists) under an envelope."""
    text = json.dumps(_envelope(kind, _plain(key, None), _plain(data, None)), allow_nan=True)
    _write_atomic(Path(path), text.encode())


def load_json(path: str | Path, kind: str, key: dict) -> Any | None:
    """The ``data`` of a :func:`save_json` file of this ``kind`` and ``key``; None (warned) otherwise."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return _open_envelope(json.loads(path.read_bytes().decode("utf-8")), kind, key)
    except Exception as e:  # nothing in the file can run: any failure just means a bad file
        log.warning("ignoring cache %s (%s): recomputing it", path, _one_line(e))
        return None


def save_npz(path: str | Path, kind: str, key: dict, data: Any) -> None:
    """Write ``data`` under an envelope; numeric arrays are stored as arrays, everything else as JSON."""
    arrays: dict[str, np.ndarray] = {}
    meta = json.dumps(_envelope(kind, _plain(key, None), _plain(data, arrays)), allow_nan=True)
    buf = io.BytesIO()
    np.savez(buf, **{_META: np.array(meta)}, **arrays)  # a unicode array and numeric ones: no pickle inside
    _write_atomic(Path(path), buf.getvalue())


def load_npz(path: str | Path, kind: str, key: dict) -> Any | None:
    """The ``data`` of a :func:`save_npz` file of this ``kind`` and ``key``; None (warned) otherwise.

    The file is read with ``allow_pickle=False``: a pickle, or an npz holding
    an object array, is refused by numpy before anything in it is built.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files") or _META not in z.files:
                raise CacheFormatError("not a hago cache file")
            meta = z[_META]
            if meta.dtype.kind != "U" or meta.shape != ():
                raise CacheFormatError("malformed header")
            data = _open_envelope(json.loads(str(meta[()])), kind, key)
            return _restore(data, z)
    except Exception as e:  # BadZipFile, zlib.error, ValueError for pickled data...: a bad file, never run
        log.warning("ignoring cache %s (%s): recomputing it", path, _one_line(e))
        return None


def _restore(value: Any, z) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY}:
            name = value[_ARRAY]
            if not isinstance(name, str) or name == _META or name not in z.files:
                raise CacheFormatError(f"missing array {name!r}")
            arr = z[name]  # raises ValueError for an object array (allow_pickle=False)
            if arr.dtype.kind not in _NUMERIC:
                raise CacheFormatError(f"array {name!r} has dtype {arr.dtype}")
            return arr
        return {k: _restore(v, z) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v, z) for v in value]
    return value


def _one_line(e: BaseException) -> str:
    if isinstance(e, ValueError) and "pickle" in str(e):  # numpy's refusal suggests loading it unsafely: no
        return "holds pickled data, which is never loaded"
    return error_line(e, with_type=True)
