"""Hardware specs: what a device can run in integer, loaded from ``hwspecs/*.yaml``.

Pure data (no TVM import), so annotate, build and the CLI read device facts cheaply and
device quirks live in YAML, not in ``if target == ...`` branches. Any bad spec raises a
one-line :class:`~hago.errors.SpecError` ``<file>:<line>: <key.path>: <problem>``, the
line taken from the YAML node marks so a user can jump straight to the bad key.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Union, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from hago.backends import registry as backends
from hago.errors import SpecError, error_line

Dtype = Literal["int4", "uint4", "int8", "uint8", "int16", "int32", "bfloat16", "float16", "float32"]
INT_DTYPES = frozenset({"int4", "uint4", "int8", "uint8", "int16", "int32"})
#: precisions a layer may run in, fastest first (fp32 is always available)
PRECISIONS = ("int4", "int8", "bf16", "fp32")
OpName = Literal["conv2d", "depthwise_conv2d", "dense", "batch_matmul", "add", "multiply",
                 "relu", "clip", "silu", "max_pool2d", "avg_pool2d", "global_avg_pool2d", "reshape",
                 "concatenate", "default"]
_TRACKER = re.compile(r"^[A-Za-z0-9._-]+:(\d{1,5})$")


class _Problem(ValueError):
    """A validator error that points below its field (``target.kind``), for a precise line."""

    def __init__(self, msg: str, *sub: str | int):
        super().__init__(msg)
        self.sub = sub


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OpDescriptor(_Frozen):
    """One implementation of an op below fp32: input/accumulator/output dtypes and layouts.

    Integer (integer inputs and accumulator) or bf16 (``bfloat16`` inputs,
    ``float32`` accumulator and output: ``vdpbf16ps`` and friends).
    ``weight_layout`` names the packed weight layout the fast kernel wants, e.g.
    ``OIHW4i16o4i`` for VNNI conv or ``NK16n4k`` ([N/16, K/4, 16, 4]) for VNNI dense.
    """

    inputs: list[Dtype] = Field(min_length=1)
    accum: Dtype | None = None
    output: Dtype
    layout: str | None = None
    weight_layout: str | None = None

    @model_validator(mode="after")
    def _integer_or_bf16(self) -> OpDescriptor:
        if self.inputs[0] == "bfloat16":
            for i, dt in enumerate(self.inputs):
                if dt != "bfloat16":
                    raise _Problem(f"a bf16 op takes bfloat16 inputs only, got {dt!r}", "inputs", i)
            for key in ("accum", "output"):
                if getattr(self, key) != "float32":
                    raise _Problem(f"a bf16 op accumulates and outputs float32, got {getattr(self, key)!r}", key)
            return self
        for i, dt in enumerate([*self.inputs, self.accum]):
            if dt is not None and dt not in INT_DTYPES:
                key = ("inputs", i) if i < len(self.inputs) else ("accum",)
                raise _Problem(f"integer op needs an integer dtype here, got {dt!r}", *key)
        return self

    @property
    def is_bf16(self) -> bool:
        """A bf16 implementation (bfloat16 inputs, float32 accumulation), not an integer one."""
        return self.inputs[0] == "bfloat16"


class QuantScheme(_Frozen):
    """How a tensor class is quantized. ``range_bits`` < bits narrows the stored range,
    e.g. 7 on AVX2 where ``vpmaddubsw`` saturates int16 for full-range u8 x s8."""

    granularity: Literal["per_channel", "per_tensor"] = "per_tensor"
    symmetric: bool
    range_bits: int | None = Field(default=None, ge=2, le=16)
    # ops whose float inputs may be quantized per row at run time (hago.dynamic) instead of with a
    # calibrated range; only meaningful for activations
    dynamic: list[Literal["dense"]] = Field(default_factory=list)
    # ops whose constant table may be stored at 4 bits per value with an fp16 scale and bias per row
    # (hago.embedding4: FBGEMM's fused rowwise format, read by a gather that dequantizes the rows it
    # fetches); only meaningful for weights, and used only when asked (AnnotateConfig.embedding_bits=4)
    rowwise_4bit: list[Literal["take"]] = Field(default_factory=list)


class Bits(_Frozen):
    """Bit widths the search may choose from; stored sorted ascending."""

    weight: list[int]
    activation: list[int]

    @field_validator("weight", "activation")
    @classmethod
    def _bit_set(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("must list at least one bit width (4 or 8)")
        for i, b in enumerate(v):
            if b not in (4, 8):
                raise _Problem(f"bit width must be 4 or 8, got {b!r}", i)
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate bit widths in {v}")
        return sorted(v)


class RpcSpec(_Frozen):
    """Where a remote board is reached: a tracker ``host:port`` (or None for a direct
    connection configured on the command line) and the device key."""

    key: str = Field(min_length=1)
    tracker: str | None = None

    @field_validator("tracker")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        m = _TRACKER.match(v or "")
        if v is not None and not (m and 0 < int(m.group(1)) < 65536):
            raise ValueError(f"must be 'host:port', got {v!r}")
        return v


class SparqSpec(_Frozen):
    """SPARQ (:mod:`hago.sparq`): the activation datapath keeps a 4-bit window of each uint8 code.

    ``mode``: bsparq (every code trimmed) or vsparq (a code whose channel
    pair partner is 0 keeps 8 bits); ``options``: how many window positions
    the hardware offers (5, 3 or 2); ``rounding``: round (the next lower bit,
    clamped) or raw (truncate).
    """

    mode: Literal["bsparq", "vsparq"]
    options: Literal[5, 3, 2] = 5
    rounding: Literal["round", "raw"] = "round"


def _op_tag(v: Any) -> str:
    return "literal[float32]" if isinstance(v, str) else "list[descriptor]"


OpEntry = Annotated[
    Union[Annotated[list[OpDescriptor], Field(min_length=1), Tag("list[descriptor]")],
          Annotated[Literal["float32"], Tag("literal[float32]")]],
    Discriminator(_op_tag)]


class HardwareSpec(_Frozen):
    """One device: its TVM target, how to reach it, and which ops run in integer."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str
    target: dict
    host: dict | None = None
    cross_compiler: str | None = None
    execution: Literal["local", "remote"]
    rpc: RpcSpec | None = None
    intrinsics: list[str]
    ops: dict[OpName, OpEntry]
    bits: Bits
    weights: QuantScheme
    activations: QuantScheme
    requantize: Literal["fixed_point", "float", "power_of_two"]
    rounding: Literal["half_away_from_zero", "half_to_even"] = "half_away_from_zero"
    #: a registered backend (``hago.backends``); None: derived from the target kind and ``intrinsics``
    backend: str | None = None
    #: SPARQ activation trimming (:mod:`hago.sparq`) on every integer conv/dense input; None: plain 8-bit
    sparq: SparqSpec | None = None
    #: how hago's latency numbers relate to this device: ``measured`` on it, or ``modelled`` (a device
    #: simulated on another machine, e.g. a SPARQ accelerator built for the host: every latency is labelled so)
    latency: Literal["measured", "modelled"] = "measured"

    @field_validator("target", "host")
    @classmethod
    def _target_kind(cls, v: dict | None, info: ValidationInfo) -> dict | None:
        """TVM 0.27 takes target dicts only; ``kind`` is one a backend builds for (host: a CPU backend's)."""
        kinds = backends.cpu_kinds() if info.field_name == "host" else backends.target_kinds()
        for k in v or {}:
            if not isinstance(k, str):
                raise _Problem("target keys must be strings", k)
        if v is not None and v.get("kind") not in kinds:
            got = f"got {v['kind']!r}" if "kind" in v else "missing"
            raise _Problem(f"must be one of {', '.join(kinds)}, {got}", "kind")
        for key, value in (v or {}).items():
            problem = _target_value_problem(key, value)
            if problem:
                raise _Problem(problem, key)
        return v

    @field_validator("rpc")
    @classmethod
    def _rpc_matches_execution(cls, v: RpcSpec | None, info: ValidationInfo) -> RpcSpec | None:
        execution = info.data.get("execution")
        if execution == "remote" and v is None:
            raise ValueError("execution is remote, so rpc {key, tracker} is required")
        if execution == "local" and v is not None:
            raise ValueError("execution is local, so rpc must be null")
        return v

    @field_validator("ops")
    @classmethod
    def _default_float(cls, v: dict) -> dict:
        if v.get("default", "float32") != "float32":
            raise _Problem("must be 'float32' (unlisted ops stay float)", "default")
        return v

    @model_validator(mode="after")
    def _dynamic_is_for_activations(self) -> HardwareSpec:
        if self.weights.dynamic:
            raise _Problem("weights are constants: only activations can be quantized dynamically",
                           "weights", "dynamic")
        if self.activations.rowwise_4bit:
            raise _Problem("activations have no constant table: only weights can be stored row-wise",
                           "activations", "rowwise_4bit")
        return self

    @model_validator(mode="after")
    def _sparq_needs_unsigned_8bit(self) -> HardwareSpec:
        """SPARQ trims unsigned 8-bit codes (the reference refuses signed ones), computed per tensor."""
        if self.sparq is None:
            return self
        if self.bits.activation != [8]:
            raise _Problem("SPARQ trims 8-bit activations: bits.activation must be [8]", "sparq")
        if self.activations.dynamic:
            raise _Problem("SPARQ needs calibrated activation codes: activations.dynamic must be empty", "sparq")
        for op in ("conv2d", "depthwise_conv2d", "dense"):
            for desc in self.descriptors(op):
                if desc.inputs[0] != "uint8":
                    raise _Problem(f"SPARQ trims unsigned activations: ops.{op} must take uint8, "
                                   f"got {desc.inputs[0]}", "sparq")
        return self

    @model_validator(mode="after")
    def _range_fits_bits(self) -> HardwareSpec:
        for field in ("weights", "activations"):
            rb = getattr(self, field).range_bits
            widest = max(getattr(self.bits, field[:-1]))
            if rb is not None and rb > widest:
                raise _Problem(f"{rb} exceeds the widest {field[:-1]} bits {widest}",
                               field, "range_bits")
        return self

    @model_validator(mode="after")
    def _backend_realizes_descriptors(self) -> HardwareSpec:
        """The backend (named, or derived from the target kind and intrinsics) exists and realizes every descriptor."""
        try:
            backend = backends.resolve(self.backend, self.target["kind"], self.intrinsics)
        except SpecError as exc:
            raise _Problem(str(exc), "backend" if self.backend is not None else "intrinsics") from None
        for op, entry in self.ops.items():
            for i, desc in enumerate([] if entry == "float32" else entry):
                problem = (backend.bf16_problem(op, desc, self.target) if desc.is_bf16
                           else backend.descriptor_problem(op, desc))
                if problem is not None:
                    raise _Problem(problem[1], "ops", op, i, problem[0])
        return self

    # -- queries -------------------------------------------------------------
    def descriptors(self, op: str) -> list[OpDescriptor]:
        """Integer implementations of ``op``; empty means it has none (bf16 or fp32 only, or unknown)."""
        entry = self.ops.get(op, "float32")
        return [] if entry == "float32" else [d for d in entry if not d.is_bf16]

    def bf16_descriptor(self, op: str) -> OpDescriptor | None:
        """The bf16 implementation of ``op``, None when the spec declares none."""
        entry = self.ops.get(op, "float32")
        return None if entry == "float32" else next((d for d in entry if d.is_bf16), None)

    def integer_ops(self) -> list[str]:
        """Op names with at least one integer descriptor, in file order."""
        return [op for op in self.ops if self.descriptors(op)]

    def bf16_ops(self) -> list[str]:
        """Op names with a bf16 descriptor, in file order."""
        return [op for op in self.ops if self.bf16_descriptor(op) is not None]

    def precisions(self) -> list[str]:
        """The precisions some layer may run in, from :data:`PRECISIONS` (fp32 always)."""
        have = {f"int{b}" for b in self.bits.weight if self.integer_ops()}
        if self.bf16_ops():
            have.add("bf16")
        return [p for p in PRECISIONS if p in have or p == "fp32"]

    def activation_dtype(self, op: str) -> str | None:
        """Dtype of the data input of ``op``'s preferred descriptor, None if float only."""
        descs = self.descriptors(op)
        return descs[0].inputs[0] if descs else None

    @property
    def cores(self) -> int | None:
        """The target's ``num-cores``: threads a measurement on this device should use (None: unstated)."""
        n = self.target.get("num-cores")
        return int(n) if n else None

    @property
    def is_local(self) -> bool:
        """Whether builds for this device run on this machine (no cross compiler, no RPC board or GPU host)."""
        return self.execution == "local" and not self.cross_compiler

    def target_summary(self) -> str:
        """Short human description of the target, e.g. ``llvm cascadelake x2``."""
        t = self.target
        parts = [t["kind"], t.get("mtriple", "").split("-")[0], t.get("mcpu", ""),
                 t.get("arch", "")]
        if "num-cores" in t:
            parts.append(f"x{t['num-cores']}")
        return " ".join(p for p in parts if p)

    # -- loading -------------------------------------------------------------
    @classmethod
    def load(cls, path_or_name: str | os.PathLike) -> HardwareSpec:
        """Load a spec from a YAML path or a device name in :func:`spec_dir`.

        Parameters
        ----------
        path_or_name : str | os.PathLike
            A path to a ``.yaml`` file, or a bare device name such as ``"rpi4"``
            (``hago devices`` lists them).

        Returns
        -------
        HardwareSpec
            The frozen spec: target, how to reach the device, integer ops.

        Raises
        ------
        SpecError
            One line ``<file>:<line>: <key>: <problem>`` for any missing file,
            YAML syntax error, unknown key/op/dtype or bad value.
        """
        text = str(path_or_name)
        if text == "host":
            return host_spec()
        path = Path(text)
        if not (isinstance(path_or_name, os.PathLike) or "/" in text or os.sep in text
                or path.suffix in (".yaml", ".yml")):
            path = spec_dir() / f"{text}.yaml"
            if not path.is_file():
                names = ", ".join(p.stem for p in _spec_files()) or "none"
                raise SpecError(f"unknown device {text!r}; valid: {names} (or a .yaml path)")
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            raise SpecError(f"{path}: cannot read spec file ({type(exc).__name__})") from None
        return cls.from_yaml(content, source=str(path), stem=path.stem)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>", stem: str | None = None
                  ) -> HardwareSpec:
        """Parse YAML text; ``stem``, if given, must equal the spec's ``name``."""
        data, lines = _parse(text, source)
        try:
            spec = cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError(_format_error(exc, data, lines, source)) from None
        # checked only once the structure is sound, so a real fault is never hidden behind it
        if stem is not None and spec.name != stem:
            where = f"{source}:{lines[('name',)]}" if ("name",) in lines else source
            raise SpecError(f"{where}: name: {spec.name!r} must match the file name {stem!r}")
        return spec


def _target_value_problem(key: str, value: Any) -> str | None:
    """Type rules for the target keys TVM reads, so ``num-cores: two`` fails at its line, not in compile."""
    if key == "num-cores" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return f"must be a positive integer, got {value!r}"
    if key in ("kind", "mcpu", "mtriple", "arch", "mabi", "mfloat-abi") and not isinstance(value, str):
        return f"must be a string, got {value!r}"
    if key == "mattr" and not (isinstance(value, list) and all(isinstance(a, str) for a in value)):
        return f"must be a list of strings like ['+neon'], got {value!r}"
    return None


# -- what only TVM and LLVM know --------------------------------------------------
#: LLVM triple spellings whose arch is not a prefix of LLVM's architecture names
_ARCH_ALIASES = {"i486": "i386", "i586": "i386", "i686": "i386", "amd64": "x86_64", "arm64": "aarch64"}


def check_target(spec: HardwareSpec, source: str | None = None) -> None:
    """Check the spec's target (and host) against TVM and LLVM; raise a one-line SpecError.

    The YAML rules cannot know which CPU names LLVM has: ``mcpu: notacpu``
    passes them, and a build then prints dozens of LLVM error lines and falls
    back to a generic CPU. So the CPU is looked up in LLVM's list for the
    target's triple (the list is read for a target without ``mcpu``, which
    LLVM accepts silently). An unknown triple is refused before LLVM sees it:
    asking LLVM about one crashes the process. Imports TVM, so it is kept
    out of :meth:`HardwareSpec.load`.
    """
    import tvm

    where = source or spec.name
    for field_name, target in (("target", spec.target), ("host", spec.host)):
        if target is None:
            continue
        if target.get("kind") in backends.cpu_kinds():  # CPU backends build through LLVM: LLVM's CPU names
            _check_llvm(target, f"{where}: {field_name}")
        try:  # after the LLVM checks: TVM logs LLVM's complaints about an unknown CPU on stderr
            tvm.target.Target(dict(target))
        except Exception as exc:  # TVM's ValueError/TVMError for a bad key or value
            raise SpecError(f"{where}: {field_name}: TVM rejects it: {error_line(exc, 'first', 300)}") from None


def _check_llvm(target: dict, where: str) -> None:
    """The triple's architecture and the CPU must be known to the LLVM inside TVM."""
    import tvm
    from tvm.target import codegen

    triple = target.get("mtriple")
    probe = {"kind": target["kind"]}
    if triple:
        arch = triple.split("-")[0]
        arch = _ARCH_ALIASES.get(arch, arch)
        known = [str(t) for t in codegen.llvm_get_targets()]
        if not any(arch.startswith(k) for k in known):
            raise SpecError(f"{where}.mtriple: LLVM has no target for {triple!r} "
                            f"(architectures: {', '.join(known)})")
        probe["mtriple"] = triple
    cpu = target.get("mcpu")
    if cpu:
        cpus = sorted(str(c) for c in codegen.llvm_get_cpu_archlist(tvm.target.Target(probe)))
        if cpu not in cpus:
            near = difflib.get_close_matches(cpu, cpus, n=3)
            hint = f"did you mean {', '.join(near)}?" if near else f"valid: {', '.join(cpus[:12])}, ..."
            raise SpecError(f"{where}.mcpu: LLVM does not know CPU {cpu!r} for "
                            f"{triple or 'this machine'}; {hint}")




# -- YAML with line numbers ---------------------------------------------------
def _parse(text: str, source: str) -> tuple[dict, dict[tuple, int]]:
    """Load YAML and record the 1-based line of every key and list item by key path."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
        problem = " ".join((", ".join(str(p) for p in parts if p) or str(exc)).split())
        raise SpecError(f"{where}: YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        raise SpecError(f"{source}{line}: <top>: spec must be a mapping of keys, got {got}")
    lines: dict[tuple, int] = {}
    _record_lines(node, (), lines, source)
    return data, lines


def _record_lines(node: yaml.Node, path: tuple, out: dict[tuple, int], source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            p = path + (str(key_node.value),)
            if p in out:
                raise SpecError(f"{source}:{key_node.start_mark.line + 1}: {_dotted(p)}: "
                                f"duplicate key (first on line {out[p]})")
            out[p] = key_node.start_mark.line + 1
            _record_lines(value_node, p, out, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _record_lines(item, path + (i,), out, source)


def _dotted(path: Iterable) -> str:
    s = ""
    for part in path:
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else str(part))
    return s or "<top>"


def _data_path(data: Any, loc: tuple) -> tuple:
    """Map a pydantic ``loc`` onto keys of the data: drop union tags and ``[key]``."""
    out: list = []
    cur = data
    for part in loc:
        if isinstance(part, str) and "[" in part:
            continue                                   # union tag or "[key]"
        if isinstance(cur, dict):
            match = next((k for k in cur if str(k) == str(part)), None)
            out.append(str(part))
            cur = cur[match] if match is not None else None
        elif isinstance(cur, list) and isinstance(part, int):
            out.append(part)
            cur = cur[part] if 0 <= part < len(cur) else None
    return tuple(out)


def _message(err: dict, path: tuple) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        model = _model_at(path[:-1])
        valid = f" (valid: {', '.join(model.model_fields)})" if model else ""
        return f"unknown key{valid}"
    if kind == "missing":
        return "required key missing"
    if "[key]" in err["loc"]:
        return f"unknown op (valid: {', '.join(get_args(OpName))})"
    if path[:1] == ("ops",) and len(path) == 2 and kind in ("literal_error", "list_type"):
        return "must be a list of op descriptors or 'float32'"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {err['input']!r}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    got = err.get("input")
    got = f", got {got!r}" if isinstance(got, (str, int, float, bool)) else ""
    return f"{err['msg']}{got}"


def _model_at(path: tuple) -> type[BaseModel] | None:
    sub = {"rpc": RpcSpec, "bits": Bits, "weights": QuantScheme, "activations": QuantScheme, "sparq": SparqSpec}
    if path[:1] == ("ops",):
        return OpDescriptor if len(path) == 3 else None
    return HardwareSpec if not path else sub.get(path[0]) if len(path) == 1 else None


def _format_error(exc: ValidationError, data: dict, lines: dict[tuple, int], source: str) -> str:
    """One line for the most specific pydantic error, with file, line and key path."""
    errors = exc.errors()
    for err in errors:
        problem = (err.get("ctx") or {}).get("error")
        err["path"] = _data_path(data, err["loc"]) + getattr(problem, "sub", ())
    err = max(errors, key=lambda e: len(e["path"]))   # first of the deepest
    path = err["path"]
    line = next((lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines), None)
    where = f"{source}:{line}" if line else source
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return " ".join(f"{where}: {_dotted(path)}: {_message(err, path)}{more}".split())


# -- the spec folder ----------------------------------------------------------
def spec_dir() -> Path:
    """The ``hwspecs/`` folder beside the package, or ``$HAGO_SPEC_DIR`` if set."""
    env = os.environ.get("HAGO_SPEC_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "hwspecs"


def _spec_files() -> list[Path]:
    return sorted(spec_dir().glob("*.yaml"))


def list_devices() -> list[HardwareSpec]:
    """Every spec in :func:`spec_dir`, sorted by name; a broken file raises SpecError."""
    return [HardwareSpec.load(p) for p in _spec_files()]


def check_spec_file(path: str | os.PathLike) -> str:
    """Validate one spec file; return a one-line OK summary or raise SpecError."""
    spec = HardwareSpec.load(Path(path))
    check_target(spec, str(path))
    return (f"{path}: OK ({spec.name}: {spec.target_summary()}, {spec.execution}, "
            f"{len(spec.integer_ops())} integer ops)")


def why_not_here(spec: HardwareSpec) -> str | None:
    """Short reason this machine cannot run a local spec's builds (``lacks CPU flags ...``); None if it can or remote."""
    return backends.backend_of(spec).host_problem(spec) if spec.is_local else None


def runs_here(spec: HardwareSpec) -> str | None:
    """One line: why this machine cannot run a local spec's builds; None if it can (or the spec is remote)."""
    reason = why_not_here(spec)
    if reason is None:
        return None
    return (f"{spec.name} (mcpu {spec.target.get('mcpu')}) cannot run on this machine: it {reason} "
            f"(`hago devices` marks the specs it runs; --device host picks the best)")


def host_spec() -> HardwareSpec:
    """``--device host``: the best spec this machine runs, in the backends' order of preference."""
    names = list(dict.fromkeys(n for b in backends.BACKENDS.values() for n in b.host_specs()))
    for name in names:
        spec = HardwareSpec.load(name)
        if runs_here(spec) is None:
            return spec
    raise SpecError(f"--device host: this machine runs none of {', '.join(names) or 'the known specs'}; "
                    f"name a spec (hago devices)")


def device_table(specs: Iterable[HardwareSpec]):
    """A ``rich.table.Table`` for ``hago devices``; rich is imported only here."""
    from rich.table import Table

    table = Table(title="hago devices")
    for col in ("name", "target", "execution", "here", "precisions", "integer", "intrinsics", "bits"):
        table.add_column(col, no_wrap=col == "name")
    for s in specs:
        execution = f"remote ({s.rpc.key})" if s.execution == "remote" and s.rpc else s.execution
        mm = s.descriptors("conv2d") or s.descriptors("dense")
        kinds = "/".join(dict.fromkeys("x".join(d.inputs) for d in mm)) or "no matmul"
        bits = (f"w{','.join(map(str, s.bits.weight))} "
                f"a{','.join(map(str, s.bits.activation))}")
        reason = why_not_here(s)
        here = "-" if not s.is_local else "yes" if reason is None else f"no: {reason}"
        table.add_row(s.name, s.target_summary(), execution, here, " ".join(s.precisions()),
                      f"{len(s.integer_ops())} ops, {kinds}", ", ".join(s.intrinsics), bits)
    return table
