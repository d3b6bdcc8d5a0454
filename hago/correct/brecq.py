"""BRECQ (Li et al. 2021, "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction").

AdaRound learns each layer's rounding to match that layer's output. In a
residual block the second conv sees the first conv's rounding error, and what
the network needs is the *block's* output, not each layer's: BRECQ learns the
rounding of all weighted layers of a block jointly, minimising

    || block_fp32(x) - block_q(x_q; s * clip(floor(W_l / s_l) + h(V_l))) ||^2
        + lam * sum_l sum(1 - |2 h(V_l) - 1|^beta)

with AdaRound's rectified sigmoid ``h``, ``beta`` annealed 20 -> 2 after a 20%
warm-up and ``lam = 0.01`` (the released code's settings; its default loss is
this plain MSE).

**Fisher loss** (``brecq_fisher``): the paper's diagonal-Fisher reconstruction
loss, ``sum(((block_q - block_fp32) * g)^2)`` with ``g = |dKL/dz| + 1`` per
output element: the gradient of ``KL(softmax(fp32 logits) || softmax(logits))``
with respect to the block's output ``z``, taken where ``z`` is the block's
round-to-nearest output and the rest of the network runs FP32 after it, so
the error goes where it moves the network's output most. The reference code
(``save_grad_data``) takes the same gradient with everything *up to* the
block quantized and a KL averaged over batches of 32 (``batchmean``), damped
by ``+ 1``; here the network before the block is FP32 (the block input is
local, as below) and the KL is averaged over the same batches of 32. The
softmax runs over the output's last axis (the classes of ``[N, classes]``).
It needs the whole network in PyTorch (:mod:`hago.correct.torch_graph`): a
model with an op that has no PyTorch form there is refused in one line.

**Activation steps** (``brecq_lsq``): after a block's rounding is learned,
the reference's second pass learns the step size of every activation the
block quantizes, LSQ-style (Esser et al. 2020: ``s * (clip(round_ste(x / s)
+ zp) - zp)``, the gradient reaching ``s`` through the straight-through
rounding), with Adam at lr 4e-4 on an Lp loss with p = 2.4, the zero points
fixed. A block keeps its learned steps when they lower its output loss with
the learned rounding in place; they go into the strategy as the edges'
``qparams`` and ``range``, so later blocks read the new grid. This changes
edges other layers read, so ``brecq_lsq`` is not local (``hago compile``
only, as ``lapq``).
``block_q`` runs the block in PyTorch with its input fake-quantized as
``realize`` quantizes it and, by default, the edges *inside* the block left
float while the rounding is learned: the reference's weight stage
(``act_quant=False``; activations come in the second stage). Fake-quantizing
them too (``act_quant=True``, straight-through gradient) lets the rounding
absorb the activations' rounding in principle, but at 4-bit activations their
straight-through noise swamps the rounding's own signal: Fashion-MNIST W4A4
mean KL 0.0147 with them against 0.0094 without (round to nearest 0.029), W4A8
0.0013 against 0.0010 (docs/STATUS.md, session 23). The activation steps
(``brecq_lsq``) are always learned with the activations quantized.

**Block input.** ``x`` is the block's FP32 input, ``x_q`` that input
fake-quantized with its edge's parameters, exactly as :mod:`hago.correct.adaround`
does per layer. The reference code feeds the output of the quantized model so
far instead; the FP32 input keeps the correction *local* (one probe pass, no
rebuild per block, and ``hago search`` can reuse it like AdaRound's).
``brecq_sequential`` is the reference's mode: ``x_q`` is the block's input in
the simulated quantized network with every earlier block's learned rounding in
place (:class:`hago.correct.quantized_inputs.QuantizedInputs`: one build, then
one pass over the samples per block), the target still the FP32 output, so a
block also learns to undo the error that reaches it; not local (``hago
compile`` only). In a
search the rounding a layer learned with its block at the widest setting is
copied to every candidate that quantizes that layer the same way, even where a
neighbour in the block differs: an approximation; ``hago compile`` learns the
candidate exactly.

Blocks are found by :func:`hago.correct.blocks.find_blocks` (residual,
inverted-residual, else single layers). The result is AdaRound's: one bit per
weight in ``OpChoice.weight_round``. A block keeps round-to-nearest for all its
layers when the learned rounding does not lower the block's output error on
all the samples used. ``iters`` is the Adam step budget *per block*; the report
gives the seconds the whole correction took.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from hago.correct import rounding
from hago.correct.adaround import GAMMA, ZETA, _fake_quant, fp32_edges, torch_threads
from hago.correct.base import Correction, CorrectionContext, register
from hago.correct.blocks import Block, find_blocks
from hago.correct.quantized_inputs import QuantizedInputs, rounding_in_place
from hago.correct.torch_graph import TorchGraph
from hago.dynamic import QMAX
from hago.errors import QuantizeError

log = logging.getLogger(__name__)


@register("brecq")
class Brecq(Correction):
    """Learn the weight rounding of every integer layer block by block on the calibration samples.

    ``iters`` Adam steps per block on mini-batches of ``batch`` samples drawn
    from at most ``max_samples``; ``lam`` weighs the rounding regulariser. The
    report gives the block counts, how many blocks kept a learned rounding, the
    mean block-output MSE relative to round-to-nearest, and the seconds taken.

    ``threads``: PyTorch threads while learning (restored after). One by default: the
    tensors are small, and on a shared, loaded 2-core machine OpenMP's spinning threads
    made the test net's corrections about 15x slower with two (121 s against 8 s).
    """

    local = True  # each block learns on its FP32 input (module docstring: what a search reuses)
    writes_weights = True
    #: ``mse`` or ``fisher`` (module docstring); ``brecq_fisher`` is this class with ``fisher``
    loss = "mse"
    #: learn the block's activation steps too (``brecq_lsq``; module docstring)
    act_steps = False
    act_lr, act_p = 4e-4, 2.4
    #: each block's input from the quantized network so far (``brecq_sequential``; module docstring)
    sequential = False

    def __init__(self, iters: int = 600, max_samples: int = 32, batch: int = 8, lam: float = 0.01,
                 lr: float = 1e-2, seed: int = 0, threads: int = 1, act_quant: bool = False):
        self.act_quant = act_quant  # fake-quantize the block's inner edges while learning the rounding
        self.iters, self.max_samples, self.batch = iters, max_samples, batch
        self.lam, self.lr, self.seed, self.threads = lam, lr, seed, threads
        self.network: FisherNetwork | None = None

    def run(self, ctx: CorrectionContext) -> dict:
        try:
            import torch
        except ImportError:
            raise QuantizeError("correction brecq needs PyTorch (pip install torch==2.13.0)") from None
        blocks = find_blocks(ctx.graph, ctx.strategy)
        if not blocks:
            return {"blocks": 0}
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed)  # the caller's global torch RNG stays untouched
        with torch_threads(torch, self.threads):
            if self.loss == "fisher":  # first: a network it cannot run is refused before any probe
                self.network = FisherNetwork(torch, ctx, self.max_samples)
            tensors = fp32_edges(ctx, sorted({e for b in blocks for e in (b.input, b.output, *b.side)}),
                                 self.max_samples, "brecq probe")
            quantized = None
            if self.sequential:
                layers = [n for b in blocks for n in b.nodes if _learns(ctx, n)]
                quantized = QuantizedInputs(ctx, layers, sorted({b.input for b in blocks}), self.max_samples,
                                            "brecq quantized inputs")
            ratios, learned = self._learn_all(torch, gen, ctx, blocks, tensors, quantized)
        network, self.network = self.network, None  # its samples and activations are not kept past the run
        seconds = round(time.perf_counter() - t0, 1)
        log.info("brecq: %d blocks in %.1f s", len(blocks), seconds)
        kinds = {k: sum(b.kind == k for b in blocks) for k in ("residual", "inverted_residual", "layer")}
        report = {"blocks": len(blocks), **kinds, "learned": learned, "loss": self.loss,
                  "mse_vs_nearest": round(float(np.mean(ratios)), 4), "seconds": seconds}
        if network is not None and network.grad_means:  # how far the Fisher weights |g| + 1 are from the MSE's 1
            report["mean_abs_grad"] = float(np.mean(network.grad_means))
            report["max_block_mean_abs_grad"] = float(np.max(network.grad_means))
        return report

    def _learn_all(self, torch, gen, ctx, blocks, tensors, quantized=None) -> tuple[list[float], int]:
        """Learn every block in turn, write the roundings that help; (each block's MSE ratio, how many helped).

        ``quantized`` (:class:`~hago.correct.quantized_inputs.QuantizedInputs`): blocks read their input from
        the quantized network, which is told each block's kept rounding before the next block reads."""
        ratios, learned = [], 0
        for block in blocks:
            tb = time.perf_counter()
            side = {e: tensors[e] for e in block.side}
            x = tensors[block.input] if quantized is None else quantized.inputs([block.input])[block.input]
            try:
                ups, ratio = self.learn_block(torch, gen, ctx, block, x, tensors[block.output], side)
            except QuantizeError as e:  # an op's attributes or shapes PyTorch cannot take here: keep nearest
                log.warning("brecq: %s block -> %s kept round to nearest: %s", block.kind, block.output, e)
                ratios.append(1.0)
                continue
            if ratio < 1.0:
                for name, up in ups.items():
                    ctx.strategy.ops[name].weight_round = rounding.encode(up)
                    if quantized is not None:
                        quantized.set_rounding(name, up)
                learned += 1
            if self.act_steps:
                kept = {n: ups[n] if ratio < 1.0 else rounding_in_place(ctx, n) for n in ups}
                self.learn_steps(torch, gen, ctx, block, tensors[block.input], tensors[block.output], kept, side)
            ratios.append(ratio)
            log.info("brecq %s block -> %s (%d layers): output MSE x%.3f of nearest, %.1f s", block.kind,
                     block.output, len(ups), ratio, time.perf_counter() - tb)
        return ratios, learned

    def learn_block(self, torch, gen, ctx: CorrectionContext, block: Block, x_np: np.ndarray,
                    target_np: np.ndarray, side: dict | None = None) -> tuple[dict[str, np.ndarray], float]:
        """({layer: rounding bits}, hard-rounded block-output loss / nearest's) for one block.

        The loss is the one learned: the MSE, or the Fisher-weighted error when
        :attr:`network` holds the whole network (``brecq_fisher``).
        """
        run = BlockRunner(torch, ctx, block, side, act_quant=self.act_quant)
        soft = {n: SoftRounding(torch, ctx.graph.node(n), ctx.strategy.ops[n].weight_bits, ctx.strategy.ops[n].weight_scale)
                for n in run.learned}
        x = block_input(torch, ctx.strategy, block, x_np)
        target = torch.from_numpy(target_np)
        weight = None
        if self.network is not None:
            with torch.no_grad():
                nearest = run(x, {name: s.hard(s.nearest) for name, s in soft.items()})
            grad = self.network.output_gradient(block.output, nearest).abs_()
            self.network.grad_means.append(float(grad.mean()))
            weight = grad + 1.0
        opt = torch.optim.Adam([s.v for s in soft.values()], lr=self.lr)
        n = len(x)
        warm = self.iters // 5
        for it in range(self.iters):
            idx = torch.randint(0, n, (min(self.batch, n),), generator=gen)
            out = run(x[idx], {name: s.soft() for name, s in soft.items()}, rows=idx)
            loss = _rec(out, target[idx], None if weight is None else weight[idx])
            if it >= warm:
                beta = 2 + 18 * (1 - (it - warm) / max(1, self.iters - warm))
                loss = loss + self.lam * sum(s.regulariser(beta) for s in soft.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            ups = {name: s.hard_up() for name, s in soft.items()}
            learned = _rec(run(x, {name: s.hard(ups[name]) for name, s in soft.items()}), target, weight)
            near = _rec(run(x, {name: s.hard(s.nearest) for name, s in soft.items()}), target, weight)
        return ups, float(learned) / max(float(near), 1e-30)


    def learn_steps(self, torch, gen, ctx: CorrectionContext, block: Block, x_np: np.ndarray,
                    target_np: np.ndarray, ups: dict[str, np.ndarray], side: dict | None = None) -> dict[str, float]:
        """Learn the step of every per-tensor activation edge ``block`` quantizes, its layers rounded as ``ups``
        says; write them into the strategy when they lower the block's MSE. {edge: new / old step}."""
        run = BlockRunner(torch, ctx, block, side)
        edges = [n for n, qp in run.qp.items() if qp is not None and np.ndim(qp.scale) == 0]
        if not edges:
            return {}
        ops = ctx.strategy.ops
        weights = {n: torch.from_numpy(rounding.rounded_weight(ctx.graph.node(n).weight, ctx.graph.node(n).kind,
                                                               ops[n].weight_bits, up, ops[n].weight_scale))
                   for n, up in ups.items()}
        x = block_input(torch, ctx.strategy, block, x_np)
        target = torch.from_numpy(target_np)
        steps = {e: torch.tensor(float(run.qp[e].scale), requires_grad=True) for e in edges}
        with torch.no_grad():
            before = _rec(run(x, weights), target)
        opt = torch.optim.Adam(list(steps.values()), lr=self.act_lr)
        n = len(x)
        for _ in range(self.iters):
            idx = torch.randint(0, n, (min(self.batch, n),), generator=gen)
            loss = (run(x[idx], weights, steps, rows=idx) - target[idx]).abs().pow(self.act_p).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for s in steps.values():
                    s.clamp_(min=1e-8)
        steps = {e: s.detach() for e, s in steps.items()}
        with torch.no_grad():
            after = _rec(run(x, weights, steps), target)
        if float(after) >= float(before):
            return {}
        moved = {}
        for e, s in steps.items():
            c, qp = ctx.strategy.edges[e], run.qp[e]
            new = float(s)
            zp = float(qp.zero_point)
            c.qparams = dataclasses.replace(qp, scale=np.asarray(new, np.asarray(qp.scale).dtype))
            c.range = ((qp.qmin - zp) * new, (qp.qmax - zp) * new)
            moved[e] = new / float(qp.scale)
        log.info("brecq %s block -> %s: %d activation steps learned (x%.3f-%.3f), loss x%.3f", block.kind,
                 block.output, len(moved), min(moved.values()), max(moved.values()), float(after) / float(before))
        return moved


def _learns(ctx: CorrectionContext, name: str) -> bool:
    """Whether a block learns ``name``'s rounding: an integer weighted layer no other correction fixed the
    weights of (DF-MPC's input scales, GPTQ's codes)."""
    node, op = ctx.graph.node(name), ctx.strategy.ops.get(name)
    return (node.weighted and op is not None and op.mode == "integer" and op.weight_scale_in is None
            and op.weight_codes is None)


def block_input(torch, strategy, block: Block, x_np: np.ndarray, edge: str | None = None):
    """The block's FP32 input (or side ``edge``) fake-quantized with its edge's parameters (as realize
    quantizes it)."""
    edge = edge or block.input
    qp = strategy.resolved(edge).qparams if edge in strategy.edges else None
    return _fake_quant(torch, torch.from_numpy(x_np), qp)


def _rec(out, target, weight=None):
    """BRECQ's reconstruction loss: squared error summed over channels, averaged over the rest.

    ``weight``: the Fisher loss's per-element ``|g| + 1`` (the error is scaled by it before squaring).
    """
    err = out - target if weight is None else (out - target) * weight
    return err.pow(2).sum(1).mean()


class FisherNetwork:
    """The whole FP32 network in PyTorch over the first ``max_samples`` calibration samples, for the Fisher loss.

    :meth:`output_gradient` gives ``dKL/dz`` at a block's output ``z``: the
    network from its inputs to its first output by edge name (a classifier's only one), with ``z`` put in place of
    that edge, the KL against the FP32 output averaged over batches of
    :data:`FISHER_BATCH` samples (the reference's ``batchmean`` over 32).
    """

    def __init__(self, torch, ctx: CorrectionContext, max_samples: int):
        self.torch = torch
        try:
            self.graph = TorchGraph(torch, ctx.graph)
        except QuantizeError as e:
            raise QuantizeError(f"correction brecq_fisher needs the whole network in PyTorch: {e}; use brecq "
                                "(the MSE loss) for this model") from None
        self.output = ctx.graph.outputs[0]  # by edge name: the one output of a classifier
        arrays = ctx.samples.arrays  # the samples the probe reads: the first max_samples
        self.inputs = {f"input:{p.name}": torch.from_numpy(np.ascontiguousarray(arrays[p.name][:max_samples]))
                       for p in ctx.graph.params}
        try:
            with torch.no_grad():
                self.fp32 = torch.log_softmax(self._run(self.inputs)[self.output], -1)
        except QuantizeError as e:
            raise QuantizeError(f"correction brecq_fisher needs the whole network in PyTorch: {e}; use brecq "
                                "(the MSE loss) for this model") from None
        self.grad_means: list[float] = []  # mean |dKL/dz| of each block so far, for the report

    def _run(self, inputs, replace=None):
        after = None if replace is None else (lambda node, y: replace[1] if node.name == replace[0] else y)
        return self.graph.run(dict(inputs), after=after)

    def output_gradient(self, edge: str, z):
        """``dKL/dz`` (one value per element of ``z``, ``[samples, ...]``) with ``z`` put at ``edge``."""
        torch = self.torch
        grads = []
        for start in range(0, len(z), FISHER_BATCH):
            part = slice(start, start + FISHER_BATCH)
            leaf = z[part].detach().clone().requires_grad_(True)
            out = self._run({k: v[part] for k, v in self.inputs.items()}, (edge, leaf))[self.output]
            loss = torch.nn.functional.kl_div(torch.log_softmax(out, -1), self.fp32[part], log_target=True,
                                              reduction="batchmean")
            (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
            grads.append(torch.zeros_like(leaf) if grad is None else grad)  # an edge the output does not read
        return torch.cat(grads)


#: samples per KL average in the Fisher loss's gradient (the reference's calibration batch)
FISHER_BATCH = 32


@register("brecq_lsq")
class BrecqLsq(Brecq):
    """``brecq`` then, per block, LSQ activation steps (module docstring); not local: ``hago compile`` only."""

    local = False
    act_steps = True


@register("brecq_sequential")
class BrecqSequential(Brecq):
    """``brecq`` with each block's input from the quantized network so far, as the reference code feeds it
    (module docstring); not local: ``hago compile`` only."""

    local = False
    sequential = True


@register("brecq_fisher")
class BrecqFisher(Brecq):
    """``brecq`` with the paper's diagonal-Fisher reconstruction loss (module docstring)."""

    loss = "fisher"


def fake_quantize_rows(torch, x):
    """``x`` on its per-row uint8 grid and back, as :func:`hago.dynamic.emit_row_quantize` computes it."""
    zero = torch.zeros((), dtype=x.dtype)
    lo = torch.minimum(x.amin(-1, keepdim=True), zero)
    hi = torch.maximum(x.amax(-1, keepdim=True), zero)
    span = hi - lo
    scale = torch.where(span > 0, span / QMAX, torch.ones_like(span))
    zp = torch.round(-lo / scale).clamp(0, QMAX)
    q = (torch.round(x * (1 / scale)) + zp).clamp(0, QMAX)
    return (q - zp) * scale


def _edge_dtype(graph, edge: str) -> str:
    """The dtype ``edge`` has in the graph (float32 where the graph does not say)."""
    var = graph.edge_var.get(edge)
    return str(getattr(getattr(var, "ty", None), "dtype", "float32") or "float32")


def _edge_qparams(strategy, edge: str):
    """The parameters realize quantizes ``edge`` with where it owns them (not an alias), else None (float)."""
    e = strategy.edges.get(edge)
    if e is None or not e.bits or e.alias_of is not None or e.dynamic:
        return None
    return e.qparams


class SoftRounding:
    """One layer's relaxed rounding: ``V`` per weight, ``h(V)`` AdaRound's rectified sigmoid, on realize's grid."""

    def __init__(self, torch, node, bits: int, step=None):
        self.torch, self.node, self.bits, self.step = torch, node, bits, step  # step: weight_clip's, or None
        ws, s, self.qp = rounding.grid(node.weight, node.kind, bits, step)
        self.s = torch.from_numpy(s)
        self.floor = torch.from_numpy(np.floor(ws))
        self.nearest = rounding.nearest_up(node.weight, node.kind, bits, step)
        rest = (torch.from_numpy(ws) - self.floor).clamp(0.01, 0.99)
        self.v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)

    def h(self):
        return (self.torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def soft(self):
        return self.s * (self.floor + self.h()).clamp(self.qp.qmin, self.qp.qmax)

    def regulariser(self, beta: float):
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def hard_up(self) -> np.ndarray:
        return (self.v >= 0).detach().numpy()  # h(V) > 0.5

    def hard(self, up: np.ndarray):
        return self.torch.from_numpy(rounding.rounded_weight(self.node.weight, self.node.kind, self.bits, up, self.step))


class BlockRunner:
    """``runner(x_q, weights)``: a block's quantized forward in PyTorch, as the integer program computes it.

    ``weights`` gives the (soft or hard) quantized weight of each learned
    layer; other weighted layers (float, or integer ones with a correction this
    does not learn) use their FP32 weight. Every node's output is fake-quantized
    where its edge owns parameters, with a straight-through gradient; the nodes
    themselves run through :class:`hago.correct.torch_graph.TorchGraph`, so a
    transformer sublayer (matmuls, softmax, layer norm, GELU) runs as well as a conv block.
    """

    def __init__(self, torch, ctx: CorrectionContext, block: Block, side: dict | None = None,
                 act_quant: bool = True):
        self.torch, self.block = torch, block
        #: False: the static edges inside the block stay float (the weight stage, :class:`Brecq`); learnable
        #: steps (LSQ) quantize their edges either way, and a dense input rounded per row at run time is rounded
        self.act_quant = act_quant
        #: the block's side edges (``Block.side``), their FP32 values fake-quantized as realize reads them
        self.side = {e: block_input(torch, ctx.strategy, block, v.astype(_edge_dtype(ctx.graph, e)), e)
                     for e, v in (side or {}).items()}  # the probe gives float32; a mask may be bool or int
        graph, strategy = ctx.graph, ctx.strategy
        self.nodes = [graph.node(n) for n in block.nodes]
        self.learned = [n for n in block.nodes if _learns(ctx, n)]
        self.graph = TorchGraph(torch, graph, self.nodes)
        self.qp = {n.name: _edge_qparams(strategy, n.name) for n in self.nodes}
        self._steps: dict = {}
        #: integer dense layers whose float input is quantized per row at run time (:mod:`hago.dynamic`)
        self.rows = {n.name for n in self.nodes if n.weighted and strategy.ops[n.name].mode == "integer"
                     and n.inputs[0] in strategy.edges and strategy.resolved(n.inputs[0]).dynamic}

    def _rows(self, node, args):
        if node.name in self.rows:  # a dense input rounded per row at run time: part of the layer, kept
            x = args[0]
            args = [x + (fake_quantize_rows(self.torch, x) - x).detach(), *args[1:]]  # straight-through
        return args

    def _fake_quant(self, node, y):
        qp = self.qp[node.name]
        if qp is None:
            return y
        step = self._steps.get(node.name)
        if step is None and not self.act_quant:
            return y
        if step is not None:  # LSQ: the rounding straight-through, the step differentiable
            zp = float(qp.zero_point)
            r = y / step
            return ((r + (self.torch.round(r) - r).detach()) + zp).clamp(qp.qmin, qp.qmax).sub(zp).mul(step)
        return y + (_fake_quant(self.torch, y, qp) - y).detach()  # straight-through

    def __call__(self, x, weights: dict, steps: dict | None = None, rows=None):
        """The block's output; ``steps``: learnable per-tensor steps for some of its edges (LSQ); ``rows``:
        the samples ``x`` holds, where it is a mini-batch (the side edges are indexed with them)."""
        self._steps = steps or {}
        env = {e: v if rows is None else v[rows] for e, v in self.side.items()}
        env[self.block.input] = x
        env = self.graph.run(env, weights, before=self._rows, after=self._fake_quant)
        return env[self.block.output]
