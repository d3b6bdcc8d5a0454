"""annotate: decide, from the hardware spec, which ops run in integer and how
each edge is quantized.

Runs after ``prepare`` on the op graph of :mod:`hago.graph`; its output is a
:class:`~hago.strategy.Strategy` without calibrated ranges (``calibrate``
fills those, ``realize`` consumes them). Decisions follow HAGO's rule: an edge
is quantized when a consumer runs in integer, and its width is the smaller of
what the producer can emit and what the consumer accepts. All device facts
come from the spec; nothing here names a device.

Rules, in the order they are applied per node:

* a node the caller asks to run in bf16 (``bf16_ops``, ``all_bf16``) does
  so where the spec declares bf16 for its kind and the backend's kernels
  take its shape, else fp32; its input edges stay float (it converts them
  itself);
* an op the spec lists no integer descriptor for, or that hago cannot realize
  (no handler in :mod:`hago.realize`'s registry), stays float and the reason
  is recorded (the report shows it);
* an integer op gets the first of the spec's descriptors for it whose input
  dtypes hold its edges' bits and its weights' bits;
* a SiLU (``nn.silu``, :func:`hago.prepare.fuse_silu`) is integer only when
  it reads an integer conv: it then reads the conv's int32 accumulator, not
  a quantized tensor (its input edge stays float), and quantizes its own
  output; the backend applies it in the conv's requantizing write-back
  (:mod:`hago.realize.silu`);
* a pass-through op (relu, clip, max-pool, reshape) is integer only when its
  input already arrives in integer: quantizing just to run a ReLU on integers
  would add work, not remove it; an add is integer only when *all* its inputs
  are, so a float residual stream (BERT) is not re-quantized at every add;
* a global average pool and a channel scale (``x * g`` by a float
  ``[N, C, 1, 1]`` gate, squeeze-excitation) are integer only when their
  integer operand arrives in integer too, and quantize their output at its
  own scale; the gate is never quantized;
* a pass-through op, pool, channel scale or SiLU whose consumers all run in
  float goes back to float (a producing conv then dequantizes from the int32
  accumulator, one rounding fewer), and so does a pool, channel scale or
  SiLU that is the network's output (quantizing it would only round and
  clip the result);
* an edge whose only consumer is an integer relu/clip is calibrated at that
  op's output, so the producer's requantize clips for free and the ReLU keeps
  the full 8-bit resolution for the non-negative range;
* an embedding lookup (``take`` on a constant table) stores its table 4-bit
  row-wise (:mod:`hago.embedding4`) when ``embedding_bits=4`` is asked and
  the spec lists ``take`` under ``weights.rowwise_4bit``; it still outputs
  float32, and its row ids are never quantized;
* a float op's output read only by integer ops the spec lists under
  ``activations.dynamic`` (dense on x86 VNNI) is quantized per row at run
  time (:mod:`hago.dynamic`) instead of with one calibrated range.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from .backends import backend_of
from .graph import ACCUMULATOR_READERS, PASSTHROUGH, Graph, quantized_inputs
from .hwspec import HardwareSpec, OpDescriptor
from .realize import realizable_kinds
from .strategy import EdgeChoice, OpChoice, Strategy

log = logging.getLogger(__name__)

#: the producers such an op can read the accumulator of (in their write-back)
_ACCUMULATING = ("conv2d", "depthwise_conv2d")
#: integer only when their (quantized) input arrives integer; back to float when only float ops read them
_INPUT_GATED = (*PASSTHROUGH, "global_avg_pool2d", "multiply")
#: integer ops with no accumulator to dequantize from: their output edge is always quantized, at its own scale
_OWN_SCALE = ("add", "global_avg_pool2d", "multiply", *ACCUMULATOR_READERS)
#: of those, the ones that go float as the network's output (quantizing it would only round and clip the result)
_FLOAT_AT_OUTPUT = ("global_avg_pool2d", "multiply", *ACCUMULATOR_READERS)

#: bits a value of each integer dtype holds (a descriptor input holds an edge of at most that many bits)
_DTYPE_BITS = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int16": 16, "int32": 32}


@dataclass(frozen=True)
class AnnotateConfig:
    """What a caller (the CLI, or the search) may force on top of the spec.

    ``activation_bits`` and ``weight_bits`` are defaults; the per-name maps
    override them for single edges or nodes; ``float_ops`` pins nodes to float.
    """

    activation_bits: int | None = None
    weight_bits: int | None = None
    edge_bits: dict[str, int] = field(default_factory=dict)
    node_weight_bits: dict[str, int] = field(default_factory=dict)
    float_ops: frozenset[str] = frozenset()
    #: nodes to run in bf16 (where the spec declares bf16 for their kind and the backend's kernels take them)
    bf16_ops: frozenset[str] = frozenset()
    #: every weighted node in bf16 where it can be, fp32 elsewhere: the bf16 build (no integer layer)
    all_bf16: bool = False
    dynamic: bool = True  # allow run-time per-row ranges where the spec lists them (hago.dynamic)
    #: 4: store embedding tables (``take`` nodes) row-wise at 4 bits where the spec's ``weights.rowwise_4bit``
    #: allows it (:mod:`hago.embedding4`); None keeps them float32
    embedding_bits: int | None = None


def _node_mode(node, graph: Graph, spec: HardwareSpec, backend, integer_edges: set[str], cfg: AnnotateConfig,
               act_bits: int, accumulators: set[str]) -> OpChoice:
    descs = spec.descriptors(node.kind)
    if node.kind == "take":
        return _take_choice(node, spec, cfg)
    if node.kind == "other":
        return OpChoice(node.kind, "float", reason=f"unsupported op {node.relax_op}: runs in float")
    if node.name in cfg.bf16_ops or (cfg.all_bf16 and node.weighted):
        return _bf16_choice(node, spec, backend)
    if cfg.all_bf16:
        return OpChoice(node.kind, "float", reason="bf16 build: no integer layers")
    if not descs:
        return OpChoice(node.kind, "float", reason=f"{spec.name} has no integer {node.kind}")
    if node.kind not in realizable_kinds():
        return OpChoice(node.kind, "float", reason=f"hago cannot realize {node.kind} in integer yet")
    if (problem := backend.integer_problem(node)) is not None:
        return OpChoice(node.kind, "float", reason=problem)
    if node.name in cfg.float_ops:
        return OpChoice(node.kind, "float", reason="pinned to float by the strategy")
    if node.weighted and cfg.node_weight_bits.get(node.name, 8) == 0:
        return OpChoice(node.kind, "float", reason="weight bits 0 (float) in the strategy")
    if node.kind in ACCUMULATOR_READERS and node.inputs[0] not in accumulators:
        return OpChoice(node.kind, "float", reason="its input is not an integer conv's accumulator: runs in float")
    if node.kind in _INPUT_GATED and not any(e in integer_edges for e in quantized_inputs(graph, node)):
        return OpChoice(node.kind, "float", reason="inputs are float: nothing to gain")
    if node.kind == "add" and not all(e in integer_edges for e in node.inputs):
        # a float residual stream (BERT's) would be quantized twice, once per add, for no integer consumer
        return OpChoice(node.kind, "float", reason="an input is float: the add stays in float")
    wbits = None
    if node.weighted:
        wbits = cfg.node_weight_bits.get(node.name) or cfg.weight_bits or max(spec.bits.weight)
        if spec.weights.range_bits:
            wbits = min(wbits, spec.weights.range_bits)
    in_bits = [cfg.edge_bits.get(e, act_bits) for e in node.inputs]
    desc = _descriptor(descs, in_bits, wbits)
    if desc is None:
        widths = "/".join(map(str, in_bits)) + "-bit inputs" + (f", {wbits}-bit weights" if wbits else "")
        return OpChoice(node.kind, "float", reason=f"{spec.name} has no integer {node.kind} for {widths}")
    return OpChoice(node.kind, "integer", descriptor=desc.model_dump(), weight_bits=wbits)


def _take_choice(node, spec: HardwareSpec, cfg: AnnotateConfig) -> OpChoice:
    """An embedding lookup: its table 4-bit row-wise when asked and the spec allows it, else float.

    Integer here means the *table* is stored in integer (codes, fp16 scale and
    bias per row); the lookup still produces float32, so its output edge is
    treated like a float op's (:func:`_emits_integer`) and its row ids are
    never quantized.
    """
    allowed = "take" in spec.weights.rowwise_4bit
    if cfg.embedding_bits != 4 or cfg.all_bf16 or node.name in cfg.float_ops:
        hint = " (embedding_bits=4 would store its table 4-bit row-wise)" if allowed else ""
        return OpChoice(node.kind, "float", reason=f"unsupported op {node.relax_op}: runs in float{hint}")
    if not allowed:
        return OpChoice(node.kind, "float", reason=f"{spec.name} allows no 4-bit row-wise take (weights.rowwise_4bit)")
    if node.kind not in realizable_kinds():
        return OpChoice(node.kind, "float", reason=f"hago cannot realize {node.kind} in integer yet")
    return OpChoice(node.kind, "integer", weight_bits=4,
                    reason="table 4-bit row-wise, fp16 scale and bias per row; float32 rows out")


def _emits_integer(node, choice: OpChoice) -> bool:
    """Whether ``node``'s output is an integer tensor: an integer op other than a 4-bit embedding lookup."""
    return choice.mode == "integer" and node.kind != "take"


def _bf16_choice(node, spec: HardwareSpec, backend) -> OpChoice:
    """bf16 for ``node`` when the spec declares it for its kind and the backend's kernels take its shape."""
    desc = spec.bf16_descriptor(node.kind)
    if desc is None:
        return OpChoice(node.kind, "float", reason=f"{spec.name} has no bf16 {node.kind}")
    if (problem := backend.bf16_node_problem(node)) is not None:
        return OpChoice(node.kind, "float", reason=problem)
    return OpChoice(node.kind, "bf16", descriptor=desc.model_dump(), reason="bf16, float32 accumulation")


def _descriptor(descs: list[OpDescriptor], in_bits: list[int], wbits: int | None) -> OpDescriptor | None:
    """The first of the spec's descriptors whose input dtypes hold the edges' bits and the weights' bits.

    The spec lists an op's integer implementations in order of preference
    (cuda-t4: int8 first, then int4); an 8-bit dtype also holds narrower
    values (4 bits in an int8 container), so the first descriptor that fits
    wins. A weighted op's second input is its weight.
    """
    bits = in_bits[:1] + [wbits] if wbits is not None else in_bits
    for desc in descs:
        if all(b is None or _DTYPE_BITS.get(dt, 0) >= b for dt, b in zip(desc.inputs, bits)):
            return desc
    return None


def annotate(graph: Graph, spec: HardwareSpec, graph_hash: str, config: AnnotateConfig | None = None) -> Strategy:
    """Return the uncalibrated strategy for ``graph`` on ``spec``."""
    cfg = config or AnnotateConfig()
    # a float edge forces its consumers to float before modes propagate downstream
    forced = {c for e, b in cfg.edge_bits.items() if b == 0 for c in graph.consumers.get(e, [])}
    if forced:
        cfg = replace(cfg, float_ops=frozenset(cfg.float_ops | forced))
    strategy = Strategy(graph_hash=graph_hash, device=spec.name,
                        sparq=spec.sparq.model_dump() if getattr(spec, "sparq", None) else None)
    act_bits = cfg.activation_bits or max(spec.bits.activation)
    backend = backend_of(spec)  # it may refuse integer for a node its kernels do not handle
    integer_edges: set[str] = set()
    accumulators: set[str] = set()  # edges of integer convs: an accumulator reader may apply itself there
    for node in graph.nodes:
        choice = _node_mode(node, graph, spec, backend, integer_edges, cfg, act_bits, accumulators)
        strategy.ops[node.name] = choice
        if _emits_integer(node, choice):
            integer_edges.add(node.name)
            if node.kind in _ACCUMULATING:
                accumulators.add(node.name)
        elif choice.reason.startswith("unsupported"):
            log.warning("%s: %s", node.name, choice.reason)
    _float_dead_end_passthroughs(graph, strategy)

    for edge in graph.edge_var:
        strategy.edges[edge] = _edge_choice(edge, graph, strategy, spec, cfg, act_bits)
    return strategy


def _float_dead_end_passthroughs(graph: Graph, strategy: Strategy) -> None:
    """Turn back to float every integer pass-through op whose consumers all run in float.

    Its output would be dequantized straight away, so running it in integer
    only adds an 8-bit rounding: the producer's requantize. In float, the
    producing conv/dense dequantizes from its int32 accumulator instead. In a
    BERT this is each Q/K/V projection's reshape into the float attention.
    Runs backwards to a fixed point, so chains of reshapes unwind together.
    """
    changed = True
    while changed:
        changed = False
        for node in reversed(graph.nodes):
            consumers = graph.consumers.get(node.name, [])
            output = node.kind in _FLOAT_AT_OUTPUT and node.name in graph.outputs
            if (node.kind in (*_INPUT_GATED, *ACCUMULATOR_READERS) and strategy.ops[node.name].mode == "integer"
                    and (consumers or output) and all(strategy.ops[c].mode != "integer" for c in consumers)):
                strategy.ops[node.name] = OpChoice(node.kind, "float",
                                                   reason="feeds only float ops: runs on the dequantized tensor")
                changed = True


def _edge_choice(edge, graph: Graph, strategy: Strategy, spec, cfg: AnnotateConfig, act_bits: int) -> EdgeChoice:
    producer = graph.producer(edge)
    if producer is not None and producer.kind in PASSTHROUGH and strategy.ops[producer.name].mode == "integer":
        return EdgeChoice(alias_of=producer.inputs[0])
    # a take reads its row ids as they are, a SiLU its producer's accumulator, a channel scale its gate: none
    # is quantized for them
    int_consumers = [c for c in graph.consumers[edge]
                     if strategy.ops[c].mode == "integer" and edge in quantized_inputs(graph, graph.node(c))]
    int_add = producer is not None and producer.kind in _OWN_SCALE and strategy.ops[producer.name].mode == "integer"
    if not int_consumers and not int_add:
        return EdgeChoice()  # an integer conv/dense feeding float is dequantized from its accumulator
    bits = cfg.edge_bits.get(edge, act_bits)
    if _dynamic_edge(graph, strategy, spec, cfg, edge, bits):
        return EdgeChoice(bits=bits, dtype="uint8", symmetric=False, dynamic=True)
    if int_consumers:
        dtype = strategy.ops[int_consumers[0]].descriptor["inputs"][0]
    else:  # an integer add, pool, scale or SiLU has no accumulator to dequantize from: its own output type
        dtype = strategy.ops[producer.name].descriptor["output"]
    observe_at = None
    only = graph.consumers[edge]
    if len(only) == 1 and producer is not None and _emits_integer(producer, strategy.ops[producer.name]):
        consumer = graph.node(only[0])
        if consumer.kind in ("relu", "clip") and strategy.ops[consumer.name].mode == "integer":
            observe_at = consumer.name
    return EdgeChoice(bits=bits, dtype=dtype, symmetric=spec.activations.symmetric, observe_at=observe_at)


def _dynamic_edge(graph: Graph, strategy: Strategy, spec, cfg: AnnotateConfig, edge: str, bits: int) -> bool:
    """Whether ``edge`` gets run-time per-row parameters instead of a calibrated range.

    Only at a float-to-integer boundary inside the graph (the producer is a
    float op, so the tensor is float anyway and its range costs one pass),
    only when every consumer is an integer op the spec lists under
    ``activations.dynamic``, and only at 8 bits (the uint8 grid of
    :mod:`hago.dynamic`). Graph inputs keep static ranges: their
    distribution is the calibration set's.
    """
    allowed = set(spec.activations.dynamic)
    producer = graph.producer(edge)
    if not (cfg.dynamic and allowed and bits == 8 and producer is not None):
        return False
    if _emits_integer(producer, strategy.ops[producer.name]):
        return False
    consumers = graph.consumers[edge]
    return bool(consumers) and all(
        strategy.ops[c].mode == "integer" and graph.node(c).kind in allowed for c in consumers)
