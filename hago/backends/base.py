"""The interface every backend implements, and the plan realize reads.

A backend holds what differs between devices, so the core never asks which
device it is on (STYLE.md):

* **plan**: which kernel and which activation layout each integer layer
  gets. ``realize`` asks the :class:`Plan` while it emits; the base plan is
  plain Relax integer ops in plain layouts;
* **rewrite**: the kernel swap after realize, before the device build (ARM
  NEON/SDOT, CUDA dp4a: :mod:`hago.backends.int8_swap`);
* **schedule and build**: default schedules of its own kernels, the compile,
  the export;
* **run and time**: the TVM device a build runs on (``device``: what an RPC
  session opens) and whether MetaSchedule tuning applies (``tunable``).

Nothing here imports TVM at module level: :mod:`hago.hwspec` checks a spec's
backend and descriptors through the registry while the CLI is still checking
arguments, before TVM is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import tvm

    from hago.graph import Graph, Node
    from hago.hwspec import HardwareSpec, OpDescriptor
    from hago.qparams import QParams
    from hago.strategy import OpChoice, Strategy


@dataclass(frozen=True)
class Requant:
    """Per-output-channel constants of realize's requantize: fixed point (``shift`` in [1, 62]) or float.

    What realize hands a kernel that requantizes in its own write-back: the
    same arithmetic as realize's element-wise requantize, on the kernel's
    register tile, so the result is bit-identical. Fixed point (a spec's
    ``requantize: fixed_point``): ``p = int64(acc + bias) * multiplier``,
    rounded half away from zero by ``shift``, plus the zero point, clipped to
    ``[qmin, qmax]``. Float (``requantize: float``, ``scale`` set, no
    multiplier): ``round(float32(acc + bias) * scale) + zero point``, clipped,
    as oneDNN and MLAS requantize: a third of the vector work (no 64-bit
    lanes), at fp32's rounding of the scaled accumulator. With an
    ``activation`` (a SiLU that reads the layer, :mod:`hago.realize.silu`):
    ``v = float32(acc + bias) * scale``, ``y = act(v)``, then
    ``round(y / out_scale) + zero point``, clipped: realize's dequantize,
    float op and quantize, op for op.
    """

    bias: np.ndarray  # int32 [O], added to the int32 accumulator (zero-point term folded in)
    multiplier: np.ndarray | None  # [O], < 2**31 (fixed point)
    shift: np.ndarray | None  # [O] (fixed point)
    zero_point: int
    qmin: int
    qmax: int
    dtype: str  # "uint8" | "int8"
    scale: np.ndarray | None = None  # [O] float32 (float requantize)
    #: a float activation applied between dequantize and quantize (``"silu"``): then ``scale`` is the
    #: accumulator's dequantize scale ``s_x * s_w`` and ``out_scale`` the output's step
    activation: str | None = None
    out_scale: float | None = None

    def constants(self, channels: int) -> list:
        """``bias`` int32, ``multiplier`` int32, ``half = 2**(shift-1)`` int64, ``shift`` int64, each ``[channels]``.

        The multiplier stays int32 so the product is a sign-extended 32 x 32
        -> 64 bit one (``vpmuldq``), not a full 64-bit multiply. Channels past
        the per-channel arrays (a blocked layout's padding) get bias 0 and
        multiplier 0, so they requantize to the zero point: real value 0.

        A float requantize has the same four slots (every kernel takes four):
        ``bias``, ``scale`` float32 (0 past the channels), and two unused
        int64 zeros.
        """
        from tvm import relax

        def full(v, dtype, pad):
            a = np.asarray(v).astype(dtype).reshape(-1)
            if a.size == 1:
                return relax.const(np.full(channels, a[0], dtype), dtype)
            return relax.const(np.concatenate([a, np.full(channels - a.size, pad, dtype)]), dtype)

        if self.scale is not None:
            unused = full(0, "int64", 0)
            return [full(self.bias, "int32", 0), full(self.scale, "float32", 0), unused, unused]
        shift = np.asarray(self.shift).astype(np.int64)
        return [full(self.bias, "int32", 0), full(self.multiplier, "int32", 0),
                full(np.int64(1) << (shift - 1), "int64", 1), full(shift, "int64", 1)]


# -- the plan ---------------------------------------------------------------------------
#: what a kernel's emitted value is (:class:`Emitted`)
INT32 = "int32"  # the plain-layout int32 accumulator: realize adds the bias and requantizes
REQUANTIZED = "requantized"  # the integer output in the plain layout
NATIVE = "native"  # the integer output in the plan's native layout (:attr:`Plan.layout`)


@dataclass(frozen=True)
class Emitted:
    """A kernel's result and what it is (``INT32``, ``REQUANTIZED`` or ``NATIVE``)."""

    value: Any  # relax.Expr
    form: str


@dataclass(frozen=True)
class ConvArgs:
    """The attributes of one integer conv2d realize has already decided (padding filled with the zero point)."""

    strides: tuple[int, ...]
    padding: list[int]  # (top, left, bottom, right)
    dilation: tuple[int, ...]
    groups: int
    pad_value: int  # the input zero point
    #: the layout the float consumers of a float output read it in, where the plan knows (None: plain)
    float_out_layout: str | None = None


class ConvKernel:
    """A backend's conv2d kernel for one layer (:meth:`Plan.conv_kernel`).

    ``requantizes``: it takes a :class:`Requant` and writes the integer output
    itself when the layer's output is integer.
    """

    requantizes: bool = False

    def emit(self, bb, x, w_q: np.ndarray, conv: ConvArgs, requant: Requant | None, native_in: bool,
             native_out: Callable[[], bool]) -> Emitted:
        """Emit the conv of ``x`` (native layout if ``native_in``) with int8 ``w_q`` (OIHW).

        ``native_out()`` says whether the output should stay in the native
        layout (some consumer takes it so); asked only when it matters.
        """
        raise NotImplementedError


class NativeLayout:
    """An activation layout a backend keeps integer tensors in between its kernels (x86: NCHW16c).

    ``plain`` is the layout it stands in for: an op of that layout that only
    moves values (max-pool) runs on the native tensor as an op of layout
    ``name``; element-wise ops run on it as they are. Padded channels must
    hold the zero point, so they stay real 0 through every such op.
    """

    name: str = ""
    plain: str = "NCHW"

    def to_native(self, bb, q, zero_point: int):
        """The native value of plain integer ``q`` (padding at ``zero_point``)."""
        raise NotImplementedError

    def to_plain(self, bb, value, channels: int):
        """The plain value of native ``value`` with ``channels`` channels."""
        raise NotImplementedError

    def float_to_native(self, bb, value):
        """Float ``value`` (plain) moved into the native layout, to be quantized there; None: not here.

        Where the build holds the float producer in that layout already, the
        move cancels against the producer's own conversion back to plain.
        """
        return None


class Plan:
    """Which kernel and layout each integer layer gets: the base plan, plain Relax ops only.

    ``realize`` builds one per call (:meth:`Backend.plan`) and asks it per
    layer while it emits; a backend with kernels subclasses it.
    """

    #: the native activation layout, or None: integer tensors stay in their plain layout
    layout: NativeLayout | None = None

    def __init__(self, graph: Graph, strategy: Strategy):
        self.graph, self.strategy = graph, strategy

    def holds_native(self, edge: str) -> bool:
        """Whether ``edge`` may be held in :attr:`layout`."""
        return False

    def takes_native(self, node: Node, choice: OpChoice, edge: str) -> bool:
        """Whether the integer weighted layer ``node`` runs on ``edge`` in :attr:`layout`."""
        return False

    def float_layout_produced(self, edge: str) -> str | None:
        """The layout the build will hold float edge ``edge`` in, where the plan can tell (None: plain).

        Realize quantizes such an edge for a consumer in :attr:`layout` in
        that layout (:meth:`NativeLayout.float_to_native`).
        """
        return None

    def float_layout_consumed(self, edge: str) -> str | None:
        """The layout some float consumer of ``edge`` reads it in after the build's layout passes (None: plain)."""
        return None

    def conv_kernel(self, node: Node, choice: OpChoice, x_qparams: QParams, x_shape: list,
                    w_shape: tuple) -> ConvKernel | None:
        """The kernel for an integer conv2d / depthwise conv2d (``x_shape``: its plain input shape); None: plain ops."""
        return None

    def dense_kernel(self, choice: OpChoice, x_dtype: str, x_shape: list, w_shape: tuple) -> Callable | None:
        """``emit(bb, x, w_q [K, N]) -> int32 [..., N]`` for an integer dense; None: a plain int32 matmul."""
        return None

    def bf16_kernel(self, node: Node, x_shape: list) -> Callable | None:
        """``emit(bb, x) -> float32`` (bias included) for a bf16 conv2d / dense on float ``x``; None: the plain
        Relax op on bfloat16 operands, for the build to lower (a conv, with its neighbours' layout)."""
        return None

    def row_quantize_kernel(self, x_shape: list) -> Callable | None:
        """``emit(bb, x) -> (q, scale, zp)``: a dense input's run-time per-row quantization
        (:func:`hago.dynamic.emit_row_quantize`'s results, bit for bit) as one kernel; None: plain ops."""
        return None


# -- the backend ------------------------------------------------------------------------
class Backend:
    """One device family: its plan, kernel swap, schedules, build, export and how its builds run.

    Subclass it, set the class attributes and override what differs, then
    ``register_backend(name, instance)`` (:mod:`hago.backends.registry`).
    Builds and exports import TVM inside the methods, never at module level.
    """

    #: the registry key; :func:`~hago.backends.registry.register_backend` sets it
    name: str = ""
    #: the TVM target kind it builds for (the spec's ``target.kind``)
    target_kind: str = "llvm"
    #: spec ``intrinsics`` that select it when the spec names no ``backend``
    intrinsics: frozenset[str] = frozenset()
    #: chosen for its target kind when no backend's intrinsics match the spec's
    generic: bool = False
    #: the TVM device its builds run on (``"cpu"``, ``"cuda"``): RPC sessions and measurements open it
    device: str = "cpu"
    #: MetaSchedule tuning applies (kernels can be timed on this machine or over RPC)
    tunable: bool = False
    #: descriptor ``layout`` / ``weight_layout`` values a spec may name (None: unstated)
    layouts: frozenset = frozenset({None, "NCHW"})
    weight_layouts: frozenset = frozenset({None, "OIHW"})
    #: the integer kernels pad a layer's output channels to a multiple of this: extra output channels up to the
    #: next multiple cost neither bytes nor time (multipoint's extra points fill them, :mod:`hago.search.points`)
    output_channel_block: int = 1

    def descriptor_problem(self, op: str, desc: OpDescriptor) -> tuple[str, str] | None:
        """``(key, problem)`` when this backend cannot realize descriptor ``desc`` of ``op``; None when it can."""
        for key, value, known in (("layout", desc.layout, self.layouts),
                                  ("weight_layout", desc.weight_layout, self.weight_layouts)):
            if value not in known:
                valid = ", ".join(sorted(str(v) for v in known if v is not None)) or "none"
                return key, f"backend {self.name} has no {op} kernel for {key} {value!r} (it realizes: {valid})"
        return None

    def bf16_problem(self, op: str, desc: OpDescriptor, target: dict) -> tuple[str, str] | None:
        """``(key, problem)`` when this backend cannot run ``op`` in bf16 for spec target ``target``; None if it can."""
        return "inputs", f"backend {self.name} has no bf16 kernels"

    def bf16_node_problem(self, node) -> str | None:
        """Why graph node ``node`` cannot run in bf16 although the spec declares bf16 for its kind; None if it can."""
        return None

    def host_problem(self, spec: HardwareSpec) -> str | None:
        """Why a build for local spec ``spec`` cannot run on this machine (missing CPU features); None if it can."""
        return None

    def board_problem(self, spec: HardwareSpec, facts: dict) -> str | None:
        """Why a farm board that reports ``facts`` (:func:`hago.measure.board.board_facts`) cannot run builds
        for ``spec``, so its timings must not enter the search; None if it can. The base class knows nothing
        about the device, so it accepts any board."""
        return None

    def host_specs(self) -> tuple[str, ...]:
        """Spec names, best first, this backend would pick for ``--device host`` (the first this machine runs)."""
        return ()

    def integer_problem(self, node) -> str | None:
        """Why graph node ``node`` cannot be integer on this backend although the spec allows its kind; None if it can.

        Annotate asks before it makes a node integer, so a shape the
        backend's kernels do not handle stays float with this reason in the
        report instead of failing the build.
        """
        return None

    def claims(self, target: tvm.target.Target) -> bool:
        """Whether a build for ``target`` that names no backend is this backend's (besides the generic one)."""
        return False

    def plan(self, graph: Graph, strategy: Strategy) -> Plan:
        """The kernel and layout plan realize follows for ``strategy`` on ``graph``."""
        return Plan(graph, strategy)

    def rewrite(self, mod: tvm.IRModule, spec: HardwareSpec, target: tvm.target.Target) -> tvm.IRModule:
        """The device module after realize, before its build (a kernel swap); the host build never gets it."""
        return mod

    def build(self, mod: tvm.IRModule, target: tvm.target.Target, *, what: str = "target", tune=None):
        """Compile ``mod`` for ``target``; returns a ``relax.VMExecutable``. ``tune``: :class:`hago.tune.TuneOptions`."""
        raise NotImplementedError

    def export(self, executable, spec: HardwareSpec, path: Path) -> Path:
        """Write what the device loads (``model.so`` at ``path``, and whatever it needs beside it)."""
        raise NotImplementedError

    # -- its kernels' default schedules (used by its build and by hago.tune) ---------------
    #: TVM's shipped tensor intrinsics whose records need :meth:`fix_shipped_intrinsics`
    shipped_intrinsics: frozenset[str] = frozenset()

    def schedule(self, mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
        """``mod`` with the default schedules of this backend's kernels (before fusion); the rest untouched."""
        return mod

    def prepare_fusion(self, mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
        """``mod`` just before legalization and fusion (the CPU backends block float convs here)."""
        return mod

    def legalizations(self, target: tvm.target.Target) -> dict:
        """Op name -> legalization that replaces TVM's own for this backend's builds."""
        return {}

    def schedule_fused(self, sch, target: tvm.target.Target) -> bool:
        """Schedule a fused PrimFunc (``sch``) holding one of its after-fusion kernels; False when it holds none."""
        return False

    def is_kernel(self, func) -> bool:
        """Whether PrimFunc ``func`` is one of this backend's hand-scheduled kernels (a tuning task of its own)."""
        return False

    def schedule_kernels(self, sch) -> bool:
        """Apply the default schedule of every kernel block in traced schedule ``sch``; False when it holds none."""
        return False

    def register_intrinsics(self, target: tvm.target.Target) -> None:
        """Register the tensor intrinsics its default schedules (and their tuning records) tensorize with."""

    def fix_shipped_intrinsics(self, target: tvm.target.Target) -> None:
        """Re-register shipped intrinsics it needs fixed, after ``tvm.s_tir.tensor_intrin`` was imported."""

    def __repr__(self) -> str:
        return f"<backend {self.name}: {self.target_kind}>"
