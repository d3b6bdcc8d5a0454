"""BRECQ (Li et al. 2021, "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction").

AdaRound learns each layer's rounding to match that layer's output. In a
residual block the second conv sees the first conv's rounding error, and what
the network needs is the *block's* output, not each layer's: BRECQ learns the
rounding of all weighted layers of a block jointly, minimising

    || block_fp32(x) - block_q(x_q; s * clip(floor(W_l / s_l) + h(V_l))) ||^2
        + lam * sum_l sum(1 - |2 h(V_l) - 1|^beta)

with AdaRound's rectified sigmoid ``h``, ``beta`` annealed 20 -> 2 after a 20%
warm-up and ``lam = 0.01`` (the released code's settings; its loss is this
plain MSE, the paper's Fisher-weighted loss is off there and not offered here).
``block_q`` runs the block in PyTorch with every edge inside it fake-quantized
as ``realize`` quantizes it (straight-through gradient), so the rounding also
absorbs the activations' rounding.

**Block input.** ``x`` is the block's FP32 input, ``x_q`` that input
fake-quantized with its edge's parameters, exactly as :mod:`hago.correct.adaround`
does per layer. The reference code feeds the output of the quantized model so
far instead; the FP32 input keeps the correction *local* (one probe pass, no
rebuild per block, and ``hago search`` can reuse it like AdaRound's). In a
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

import logging
import time

import numpy as np

from hago.correct import rounding
from hago.correct.adaround import GAMMA, ZETA, _fake_quant, fp32_edges, torch_layer, torch_threads
from hago.correct.base import Correction, CorrectionContext, register
from hago.correct.blocks import Block, find_blocks
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

    def __init__(self, iters: int = 600, max_samples: int = 32, batch: int = 8, lam: float = 0.01,
                 lr: float = 1e-2, seed: int = 0, threads: int = 1):
        self.iters, self.max_samples, self.batch = iters, max_samples, batch
        self.lam, self.lr, self.seed, self.threads = lam, lr, seed, threads

    def run(self, ctx: CorrectionContext) -> dict:
        try:
            import torch
        except ImportError:
            raise QuantizeError("correction brecq needs PyTorch (pip install torch==2.13.0)") from None
        blocks = find_blocks(ctx.graph, ctx.strategy)
        if not blocks:
            return {"blocks": 0}
        t0 = time.perf_counter()
        tensors = fp32_edges(ctx, sorted({e for b in blocks for e in (b.input, b.output)}), self.max_samples,
                             "brecq probe")
        gen = torch.Generator().manual_seed(self.seed)  # the caller's global torch RNG stays untouched
        with torch_threads(torch, self.threads):
            ratios, learned = self._learn_all(torch, gen, ctx, blocks, tensors)
        seconds = round(time.perf_counter() - t0, 1)
        log.info("brecq: %d blocks in %.1f s", len(blocks), seconds)
        kinds = {k: sum(b.kind == k for b in blocks) for k in ("residual", "inverted_residual", "layer")}
        return {"blocks": len(blocks), **kinds, "learned": learned,
                "mse_vs_nearest": round(float(np.mean(ratios)), 4), "seconds": seconds}

    def _learn_all(self, torch, gen, ctx, blocks, tensors) -> tuple[list[float], int]:
        """Learn every block in turn, write the roundings that help; (each block's MSE ratio, how many helped)."""
        ratios, learned = [], 0
        for block in blocks:
            tb = time.perf_counter()
            ups, ratio = self.learn_block(torch, gen, ctx, block, tensors[block.input], tensors[block.output])
            if ratio < 1.0:
                for name, up in ups.items():
                    ctx.strategy.ops[name].weight_round = rounding.encode(up)
                learned += 1
            ratios.append(ratio)
            log.info("brecq %s block -> %s (%d layers): output MSE x%.3f of nearest, %.1f s", block.kind,
                     block.output, len(ups), ratio, time.perf_counter() - tb)
        return ratios, learned

    def learn_block(self, torch, gen, ctx: CorrectionContext, block: Block, x_np: np.ndarray,
                    target_np: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        """({layer: rounding bits}, hard-rounded block-output MSE / nearest's) for one block."""
        run = BlockRunner(torch, ctx, block)
        soft = {n: SoftRounding(torch, ctx.graph.node(n), ctx.strategy.ops[n].weight_bits, ctx.strategy.ops[n].weight_scale)
                for n in run.learned}
        x = block_input(torch, ctx.strategy, block, x_np)
        target = torch.from_numpy(target_np)
        opt = torch.optim.Adam([s.v for s in soft.values()], lr=self.lr)
        n = len(x)
        warm = self.iters // 5
        for it in range(self.iters):
            idx = torch.randint(0, n, (min(self.batch, n),), generator=gen)
            out = run(x[idx], {name: s.soft() for name, s in soft.items()})
            loss = _rec(out, target[idx])
            if it >= warm:
                beta = 2 + 18 * (1 - (it - warm) / max(1, self.iters - warm))
                loss = loss + self.lam * sum(s.regulariser(beta) for s in soft.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            ups = {name: s.hard_up() for name, s in soft.items()}
            learned = _rec(run(x, {name: s.hard(ups[name]) for name, s in soft.items()}), target)
            near = _rec(run(x, {name: s.hard(s.nearest) for name, s in soft.items()}), target)
        return ups, float(learned) / max(float(near), 1e-30)


def block_input(torch, strategy, block: Block, x_np: np.ndarray):
    """The block's FP32 input fake-quantized with its edge's parameters (as realize quantizes it)."""
    qp = strategy.resolved(block.input).qparams if block.input in strategy.edges else None
    return _fake_quant(torch, torch.from_numpy(x_np), qp)


def _rec(out, target):
    """BRECQ's reconstruction loss: squared error summed over channels, averaged over the rest."""
    return (out - target).pow(2).sum(1).mean()


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
    where its edge owns parameters, with a straight-through gradient.
    """

    def __init__(self, torch, ctx: CorrectionContext, block: Block):
        self.torch, self.block = torch, block
        graph, strategy = ctx.graph, ctx.strategy
        self.nodes = [graph.node(n) for n in block.nodes]
        self.learned = [n.name for n in self.nodes if n.weighted and strategy.ops[n.name].mode == "integer"
                        and strategy.ops[n.name].weight_scale_in is None
                        and strategy.ops[n.name].weight_codes is None]
        self.layer = {n.name: torch_layer(torch, n) for n in self.nodes if n.weighted}
        self.fp32_w = {n.name: torch.from_numpy(n.weight.astype(np.float32)) for n in self.nodes if n.weighted}
        self.bias = {n.name: torch.from_numpy(n.bias.reshape(_bias_shape(n))) for n in self.nodes
                     if n.weighted and n.bias is not None}
        self.qp = {n.name: _edge_qparams(strategy, n.name) for n in self.nodes}
        self.clip = {n.name: (float(n.call.args[1].value), float(n.call.args[2].value))
                     for n in self.nodes if n.kind == "clip"}

    def __call__(self, x, weights: dict):
        torch = self.torch
        env = {self.block.input: x}
        for n in self.nodes:
            args = [env[e] for e in n.inputs]
            if n.weighted:
                y = self.layer[n.name](args[0], weights.get(n.name, self.fp32_w[n.name]))
                if n.name in self.bias:
                    y = y + self.bias[n.name]
            elif n.kind == "relu":
                y = torch.relu(args[0])
            elif n.kind == "clip":
                y = args[0].clamp(*self.clip[n.name])
            else:  # add; ``x + x`` has one input edge
                y = args[0] + args[-1]
            qp = self.qp[n.name]
            if qp is not None:
                y = y + (_fake_quant(torch, y, qp) - y).detach()  # straight-through
            env[n.name] = y
        return env[self.block.output]


def _bias_shape(node) -> tuple[int, ...]:
    c = rounding.weight_axis(node.kind)
    channels = node.weight.shape[c]
    return (channels,) if node.kind == "dense" else (1, channels, 1, 1)
