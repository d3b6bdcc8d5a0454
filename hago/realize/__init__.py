"""realize: lower a calibrated strategy to a true integer Relax program.

Runs last among the passes (after ``annotate`` and ``calibrate``). Every op
the strategy marks ``integer`` becomes integer arithmetic, through the
handler of its op family (:mod:`.registry`, which annotate reads too):

* conv2d / dense (:mod:`.weighted`): uint8|int8 activations x int8 weights
  with int32 accumulation. Asymmetric inputs are padded with their zero
  point so ``(x - zp)`` is exactly 0 in the padding, and ``zp * sum(w)`` is
  folded with the bias into one int32 constant;
* requantize: the real scale ``s_x * s_w / s_y`` as an int32 multiplier and
  a right shift in int64, rounding half away from zero, then the output zero
  point and a clip (the ReLU floor rides on that clip);
* add (:mod:`.add`): each input rescaled to the output scale by its own
  fixed-point multiplier, summed in int64, clipped;
* relu / clip / max-pool / reshape (:mod:`.passthrough`) run on the integer
  tensor and keep its scale;
* a SiLU (:mod:`.silu`) reads the conv before it in float, from its int32
  accumulator, and quantizes its output, in the conv kernel's write-back
  where the backend's kernel requantizes;
* a global average pool (:mod:`.pool`) sums the codes in int32 and
  requantizes; a channel scale ``x * g`` by a float gate (:mod:`.scale`,
  squeeze-excitation) runs on ``x``'s codes; both on the blocked layout;
* an embedding lookup (:mod:`.embedding`) whose table annotate stores 4-bit
  row-wise gathers and dequantizes only the rows it reads, and produces float;
* a dense whose input edge is ``dynamic`` (:mod:`.dynamic_dense`) quantizes
  that float input per row at run time (:mod:`hago.dynamic`) and produces
  float.

Which kernel and which activation layout each integer layer gets is the
backend's plan (:meth:`hago.backends.Backend.plan`): the x86 one puts VNNI
and depthwise kernels in the plain ops' place and keeps activations blocked
(NCHW16c) between them; the base plan keeps plain Relax ops.

Quantize and dequantize appear only where a float op meets an integer one,
and an integer layer that feeds only float ops is dequantized straight from
its int32 accumulator (no rounding to 8 bits on the way out).
"""

from __future__ import annotations

from hago.backends import Backend, Plan
from hago.errors import QuantizeError
from hago.graph import Graph
from hago.strategy import Strategy

from .add import Add
from .dynamic_dense import DynamicDense
from .embedding import RowwiseTake
from .passthrough import PassThrough
from .realizer import LayerConstants, Realized, Realizer
from .registry import HANDLERS, OpHandler, handler_for, realizable_kinds, register_handler
from .pool import GlobalAvgPool
from .scale import ChannelScale
from .silu import SiLU
from .weighted import Weighted

# the handlers, one per op family; a kind's handlers are tried in this order
register_handler(DynamicDense())  # before Weighted: it takes the dense layers whose input is dynamic
register_handler(Weighted())
register_handler(Add())
register_handler(PassThrough())
register_handler(SiLU())
register_handler(GlobalAvgPool())
register_handler(ChannelScale())
register_handler(RowwiseTake())  # take: only where annotate stores its table 4-bit row-wise

__all__ = ["HANDLERS", "LayerConstants", "OpHandler", "Realized", "handler_for", "realizable_kinds", "realize",
           "register_handler"]


def realize(graph: Graph, strategy: Strategy, requantize: str = "fixed_point",
            backend: Backend | None = None) -> Realized:
    """Lower ``graph`` under a calibrated ``strategy`` to an integer Relax module.

    ``backend`` (:func:`hago.backends.backend_of` of the spec) plans the
    kernels and layouts; None keeps plain Relax integer ops everywhere.
    """
    if requantize not in ("fixed_point", "float", "power_of_two"):
        raise QuantizeError(f"unknown requantize style {requantize!r}")
    missing = set(strategy.ops) ^ {n.name for n in graph.nodes}
    if missing:
        raise QuantizeError(f"strategy does not match the graph (nodes {sorted(missing)[:3]}...)")
    plan = backend.plan(graph, strategy) if backend is not None else Plan(graph, strategy)
    return Realizer(graph, strategy, requantize, plan).run()
