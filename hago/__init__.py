"""hago: hardware-aware post-training quantization on Apache TVM Relax.

The public API::

    import hago

    spec = hago.HardwareSpec.load("x86-avx512-vnni")          # or a path to a spec YAML
    result = hago.compile(model, spec, calib, eval_data=evald, out_dir="out")
    found = hago.search(model, spec, calib, evald, out_dir="out", accuracy_drop="1%")

Each has a numpy-style docstring (``help(hago.compile)``; for the search,
``help(hago.search.run.search)``). ``import hago`` stays light: the names are
resolved on first use (PEP 562 ``__getattr__``), so ``hago --help`` and the
CLI's argument checks never import TVM or torch.
"""

__version__ = "0.1.0"

__all__ = ["HardwareSpec", "compile", "search"]

#: public name -> (module, attribute); ``search`` is the callable package :mod:`hago.search` itself
_LAZY = {
    "compile": ("hago.compiler", "compile"),
    "HardwareSpec": ("hago.hwspec", "HardwareSpec"),
    "search": ("hago.search", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'hago' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
