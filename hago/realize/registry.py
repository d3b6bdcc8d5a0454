"""The op-handler registry: one handler per op family, read by realize, simulate and annotate.

A handler says how realize lowers its op kinds to integer code, whether it
can run on a backend's native layout, and what simulate puts in the op's
place (its fake-quantized constants). ``annotate`` makes an op integer only
if its kind has a handler (:func:`realizable_kinds`), so adding an integer
op is a graph kind (``hago.graph``) plus a handler registered in
``hago.realize``'s ``__init__`` (or at run time with :func:`register_handler`).

Among the handlers of one kind the first registered that :meth:`applies`
wins, so a special case (a dense whose input is quantized per row at run
time) registers before the general one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from tvm import relax

    from hago.graph import Node
    from hago.strategy import OpChoice, Strategy

    from .realizer import Realizer


class OpHandler:
    """How one op family becomes integer code. Subclass, set ``kinds``, register an instance."""

    #: the graph kinds (spec op names) it realizes
    kinds: tuple[str, ...] = ()

    def applies(self, strategy: Strategy, node: Node) -> bool:
        """Whether this handler takes ``node`` (of one of its kinds) under ``strategy``."""
        return True

    def realize(self, r: Realizer, node: Node, choice: OpChoice) -> None:
        """Emit the integer ``node`` into ``r`` and record its value (``r.qval`` / ``r.native`` / ``r.fval``)."""
        raise NotImplementedError

    def takes_native(self, r: Realizer, node: Node, edge: str) -> bool:
        """Whether integer ``node`` would run on ``edge`` in the plan's native layout rather than the plain one."""
        return False

    def simulated_call(self, node: Node, call: relax.Call, strategy: Strategy) -> relax.Call:
        """``node``'s FP32 call as simulate runs it for an integer ``node`` (its constants fake-quantized)."""
        return call


#: kind -> its handlers, in registration order
HANDLERS: dict[str, list[OpHandler]] = {}


def register_handler(handler: OpHandler) -> OpHandler:
    """Add ``handler`` for each of its kinds, after the ones already there."""
    for kind in handler.kinds:
        HANDLERS.setdefault(kind, []).append(handler)
    return handler


def handler_for(strategy: Strategy, node: Node) -> OpHandler | None:
    """The handler that realizes ``node`` under ``strategy``; None when its kind has none."""
    return next((h for h in HANDLERS.get(node.kind, ()) if h.applies(strategy, node)), None)


def realizable_kinds() -> frozenset[str]:
    """The op kinds some handler lowers to integer code: what annotate may make integer."""
    return frozenset(HANDLERS)
