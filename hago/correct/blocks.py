"""Blocks for block-wise reconstruction (:mod:`hago.correct.brecq`): which layers learn together.

BRECQ (Li et al. 2021) reconstructs a network one *block* at a time: the
layers between a residual fork and its add interact (the second conv sees the
first one's rounding error), and a block is small enough that matching its
output needs no cross-block information. The rule, on hago's :class:`Graph`:

1. **Residual block.** For every ``add`` of two tensors, its *fork* is the
   latest edge (in topological order) that both operands depend on. The block
   is every node on a path from the fork to the add (both branches: the
   conv-relu-conv body and an identity or projection shortcut). It is kept only when it is *closed*: only its
   output leaves it. Its nodes read the fork, each other, and *side* edges
   computed outside it (a BERT's attention mask, made once from the mask input
   and added in every layer), which the block reads as the FP32 network gives them. Adds are taken in topological order and a block overlapping an earlier
   one is dropped (an inner residual wins over one around it).
2. **Inverted-residual block without a shortcut** (MobileNetV2's stride-2 or
   channel-changing blocks; those with a shortcut are case 1): a depthwise
   conv, the ``conv2d`` before it (the expansion; optional) and the ``conv2d``
   after it (the projection; required), joined through ``relu``/``clip`` only
   and each intermediate tensor read by the next node alone.
3. **Single layer.** Every other integer conv or dense is a block of its own
   (that is AdaRound with BRECQ's loss).

Every block also takes the one ``relu``/``clip`` its output alone feeds
(ResNet's post-add ReLU, a conv's activation): realize quantizes the output
edge with that activation's range, so the block's FP32 target is taken after it.

A block (cases 1, 2) is only used when the reconstruction can run every
node in it (:func:`runnable`: an op :mod:`hago.correct.torch_graph` has a
PyTorch form for) and at least one of its weighted layers is integer;
otherwise its integer layers fall back to case 3. Edges may be static
(calibrated) or quantized per row at run time (:mod:`hago.dynamic`: a
transformer's dense inputs); the block runner fakes both.

**Transformer layers** are case 1: an encoder layer's attention sublayer
(``x + out(softmax(q k^T) v)``) and its MLP (``x + fc2(gelu(fc1(x)))``) each
run from a fork to a residual add, so they are found as residual blocks when
their edges are static. A post-norm layer's ``layer_norm`` follows the add and
belongs to the next block's fork; a pre-norm layer's is inside the block.
"""

from __future__ import annotations

from dataclasses import dataclass

from hago.correct.torch_graph import supported
from hago.graph import ACCUMULATOR_READERS, Graph, Node
from hago.strategy import Strategy

_ACT = ("relu", "clip")


def runnable(node: Node) -> bool:
    """Whether :mod:`hago.correct.brecq` can run ``node`` inside a block as the integer program computes it.

    Any op with a PyTorch form, except a SiLU: an integer one reads its
    producer's int32 accumulator (the conv applies it in its write-back), so that
    edge is never quantized in the integer program, which the per-edge fake
    quantization would not know; a float SiLU is left out with it, for simplicity.
    """
    return supported(node) and node.kind not in ACCUMULATOR_READERS


@dataclass(frozen=True)
class Block:
    """Nodes that learn their rounding together: ``nodes`` in topological order read ``input`` and give ``output``."""

    kind: str  # residual | inverted_residual | layer
    input: str  # the edge the block reads
    nodes: tuple[str, ...]
    output: str  # the edge (node name) the block's result leaves on
    #: other edges from outside that nodes of the block read (an attention mask computed once for every layer)
    side: tuple[str, ...] = ()


def find_blocks(graph: Graph, strategy: Strategy) -> list[Block]:
    """The blocks of ``graph`` (module docstring's rule), in topological order of their outputs."""
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    taken: set[str] = set()
    blocks: list[Block] = []
    for cand in _residual_blocks(graph, order) + _inverted_residual_blocks(graph):
        if taken.isdisjoint(cand.nodes) and _usable(graph, strategy, cand):
            blocks.append(cand)
            taken.update(cand.nodes)
    for node in graph.nodes:
        if node.name not in taken and _learnable(graph, strategy, node.name):
            blocks.append(_with_activation(graph, Block("layer", node.inputs[0], (node.name,), node.name)))
    return sorted(blocks, key=lambda b: order[b.output])


def _learnable(graph: Graph, strategy: Strategy, name: str) -> bool:
    """An integer weighted layer (NCHW/OIHW convs and dense only are weighted in :mod:`hago.graph`)."""
    node = graph.node(name)
    op = strategy.ops.get(name)
    return node.weighted and op is not None and op.mode == "integer" and op.weight_scale_in is None \
        and len(node.inputs) == 1


def _usable(graph: Graph, strategy: Strategy, block: Block) -> bool:
    nodes = [graph.node(n) for n in block.nodes]
    return (all(runnable(n) for n in nodes)
            and all(len(n.inputs) == 1 for n in nodes if n.weighted)
            and any(_learnable(graph, strategy, n.name) for n in nodes))


def _ancestors(graph: Graph) -> dict[str, set[str]]:
    """Every edge each edge depends on, itself included."""
    anc: dict[str, set[str]] = {}
    for node in graph.nodes:
        s = {node.name}
        for e in node.inputs:
            s |= anc.get(e, {e})
        anc[node.name] = s
    return anc


def _residual_blocks(graph: Graph, order: dict[str, int]) -> list[Block]:
    anc = _ancestors(graph)
    out = []
    for add in graph.nodes:
        if add.kind != "add" or len(add.inputs) != 2:
            continue
        common = anc.get(add.inputs[0], {add.inputs[0]}) & anc.get(add.inputs[1], {add.inputs[1]})
        if not common:
            continue
        fork = max(common, key=lambda e: order.get(e, -1))
        body = [n.name for n in graph.nodes
                if order.get(fork, -1) < order[n.name] <= order[add.name]
                and n.name in anc[add.name] and fork in anc[n.name]]
        side = _closed(graph, fork, body, add.name)
        if side is not None:
            out.append(_with_activation(graph, Block("residual", fork, tuple(body), add.name, side)))
    return out


def _with_activation(graph: Graph, block: Block) -> Block:
    """``block`` ending after the ``relu``/``clip`` its output alone feeds, if there is one.

    Its output edge is quantized with that activation's range (annotate moves a
    ReLU's range onto its producer), so the FP32 target must be taken after it.
    """
    act = _sole_consumer(graph, block.output)
    if act is None or act.kind not in _ACT:
        return block
    return Block(block.kind, block.input, (*block.nodes, act.name), act.name, block.side)


def _closed(graph: Graph, fork: str, body: list[str], output: str) -> tuple[str, ...] | None:
    """The side edges ``body`` reads from outside (neither the fork nor its own), or None when a tensor other
    than ``output`` leaves it (the block would not be the only reader of what it computes)."""
    inside = set(body)
    side: list[str] = []
    for name in body:
        side += [e for e in graph.node(name).inputs if e != fork and e not in inside and e not in side]
        if name != output and (name in graph.outputs or not set(graph.consumers.get(name, [])) <= inside):
            return None
    return tuple(side)


def _sole_consumer(graph: Graph, edge: str):
    users = graph.consumers.get(edge, [])
    return graph.node(users[0]) if len(users) == 1 and edge not in graph.outputs else None


def _inverted_residual_blocks(graph: Graph) -> list[Block]:
    out = []
    for dw in graph.nodes:
        if dw.kind != "depthwise_conv2d":
            continue
        chain = [dw.name]
        # back to the expansion conv through activations, each tensor read by the next node alone
        start, prev = dw, dw
        while (src := graph.producer(prev.inputs[0]) if len(prev.inputs) == 1 else None) is not None \
                and _sole_consumer(graph, src.name) is prev and src.kind in _ACT + ("conv2d",):
            chain.insert(0, src.name)
            prev = src
            if src.kind == "conv2d":
                start = src
                break
        if start is dw:  # no expansion: the block starts at the depthwise conv
            chain = [dw.name]
        nxt, proj = dw, None
        tail = []
        while (user := _sole_consumer(graph, nxt.name)) is not None and user.kind in _ACT + ("conv2d",):
            tail.append(user.name)
            nxt = user
            if user.kind == "conv2d":
                proj = user
                break
        if proj is None:
            continue
        out.append(_with_activation(graph, Block("inverted_residual", start.inputs[0], tuple(chain + tail),
                                                 proj.name)))
    return out
