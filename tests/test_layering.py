"""No device names in the core: only ``hago/backends/`` knows devices.

Read from the source (``ast``, nothing imported), every module of the
package outside ``hago/backends/``:

* imports only ``hago.backends`` itself (the names it exports) or its
  registry, never a backend's own modules (``hago.backends.x86.plan``,
  ``hago.backends.cuda.build``, ``hago.backends.int8_swap`` ...);
* compares no string to ``"cuda"``, ``"llvm"`` or ``"aarch64"`` (``==``,
  ``!=``, ``in``, ``startswith``): which device a build is for is asked of
  the backend (``backend_of(spec)``, its ``device``, ``tunable``,
  ``target_kind``), not spelled out. ``hwspec``'s valid target kinds are
  the registry's (``target_kinds()``, ``cpu_kinds()``), not a literal list.
"""

from __future__ import annotations

import ast
from pathlib import Path

import hago.backends

PACKAGE = Path(hago.backends.__file__).resolve().parent.parent
BACKENDS = PACKAGE / "backends"
DEVICE_NAMES = {"cuda", "llvm", "aarch64"}
#: what the core may import from ``hago.backends``: its public names, and the registry module
ALLOWED = set(hago.backends.__all__) | {"registry"}


def _core_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if BACKENDS not in p.parents and "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of a ``from ... import`` in ``module`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _backend_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """The backend internals ``source`` (the text of ``module``) imports."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names
                    if a.name.startswith("hago.backends.") and a.name != "hago.backends.registry"]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, is_package)
            if target.startswith("hago.backends.") and target != "hago.backends.registry":
                bad.append(target)
            elif target == "hago.backends":
                bad += [f"hago.backends.{a.name}" for a in node.names if a.name not in ALLOWED]
    return bad


def _device_names(node: ast.AST) -> set[str]:
    """The device names among the string constants of ``node`` (a constant, or a tuple/list/set of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & DEVICE_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(set(), *(_device_names(e) for e in node.elts))
    return set()


def _device_comparisons(source: str) -> list[tuple[int, list[str]]]:
    """``(line, names)`` of every comparison of a string with a device name in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: set[str] = set()
        if isinstance(node, ast.Compare):
            names = set().union(*(_device_names(n) for n in [node.left, *node.comparators]))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith")):
            names = set().union(set(), *(_device_names(a) for a in node.args))
        if names:
            found.append((node.lineno, sorted(names)))
    return sorted(found)


def test_the_scan_sees_the_core_and_not_the_backends():
    modules = {_module_name(p) for p in _core_modules()}
    assert {"hago.build", "hago.cli", "hago.realize.weighted", "hago.search.engine", "hago.tune.tuner"} <= modules
    assert not any(m.startswith("hago.backends") for m in modules)
    # the old homes of the device code are gone
    assert not any((PACKAGE / old).exists() for old in ("kernels", "arm", "cuda"))


def test_core_imports_no_backend_internals():
    bad = {_module_name(p): _backend_imports(p.read_text(), _module_name(p), p.name == "__init__.py")
           for p in _core_modules()}
    assert not {k: v for k, v in bad.items() if v}


def test_core_compares_nothing_to_a_device_name():
    found = [f"{p.relative_to(PACKAGE.parent)}:{line}: {names}" for p in _core_modules()
             for line, names in _device_comparisons(p.read_text())]
    assert not found, "\n".join(found)


def test_the_scans_find_what_they_look_for():
    """The scanners themselves: planted imports and comparisons are found, allowed ones are not."""
    source = ("from .backends.x86 import plan\nfrom .backends import registry, backend_of, int8_swap\n"
              "import hago.backends.cuda.build\nfrom ..backends import Plan\n"
              "if target.kind.name == 'cuda':\n    pass\nok = kind in ('llvm', 'c')\n"
              "x = triple.startswith('aarch64')\ny = {'kind': 'llvm'}\n")
    assert _backend_imports(source, "hago.build") == ["hago.backends.x86", "hago.backends.int8_swap",
                                                      "hago.backends.cuda.build"]
    assert _backend_imports("from ..backends import Plan, realize\n", "hago.realize.weighted") == [
        "hago.backends.realize"]
    assert _device_comparisons(source) == [(5, ["cuda"]), (7, ["llvm"]), (8, ["aarch64"])]
