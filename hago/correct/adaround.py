"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Rounding each weight to nearest minimises the error of the *weights*, not of
the layer's *output*. AdaRound learns, per weight, whether to round up or down
so that the layer's output on calibration data stays closest to FP32. It
relaxes the choice to ``h(V) in [0, 1]`` (a rectified sigmoid), minimises

    || conv(x, W) - conv(x_q, s * clip(floor(W / s) + h(V))) ||^2
        + lam * sum(1 - |2 h(V) - 1|^beta)

with ``beta`` annealed from 20 to 2 so that ``h`` ends at 0 or 1, and keeps
``h > 0.5`` as the rounding. Here ``x`` is the layer's FP32 input and ``x_q``
the same input fake-quantized with its edge's parameters, so the learned
rounding also absorbs part of the input's quantization error (the paper's
asymmetric reconstruction, measured locally like :mod:`hago.correct.bias`).

On EfficientNet-Lite0 the 8-bit per-channel *depthwise* weights are the
largest single error source (3x3/5x5 kernels with few weights per channel),
so ``layers="depthwise"`` is the default; ``"conv"`` takes every integer conv.
Dense layers are left alone (their inputs are often dynamic per row).

The result is one bit per weight in ``OpChoice.weight_round``
(:mod:`hago.correct.rounding`); a layer keeps round-to-nearest when the
learned rounding does not lower its output error on all the samples used.
Run it before ``bias`` (``--corrections adaround,bias``) so the bias
correction measures the rounding that will ship.
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import tvm
from tvm import relax

from hago import build as build_mod
from hago.correct import rounding
from hago.correct.base import Correction, CorrectionContext, register
from hago.errors import QuantizeError
from hago.observe import probe_module

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (paper, sec. 4)


@contextlib.contextmanager
def torch_threads(torch, n: int | None):
    """PyTorch's intra-op threads set to ``n`` (None: unchanged) inside the ``with``, restored after.

    The learning loops run thousands of tiny steps (a layer's weights, a few
    samples): a second thread only adds synchronisation. On a loaded 2-core
    machine the BRECQ test net's corrections took 121 s with two threads and
    about 8 s with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@register("adaround")
class AdaRound(Correction):
    """Learn each integer conv weight's rounding direction on the calibration samples.

    ``layers``: ``depthwise`` (default) or ``conv``. ``iters`` Adam steps per layer
    on mini-batches of ``batch`` samples drawn from at most ``max_samples``;
    ``lam`` weighs the rounding regulariser. The report gives, per layer
    averaged, the output MSE of the learned rounding relative to nearest.
    """

    local = True  # each layer learns on its own FP32 input, quantized by its own input edge
    writes_weights = True

    def __init__(self, layers: str = "depthwise", iters: int = 600, max_samples: int = 32, batch: int = 4,
                 lam: float = 0.01, lr: float = 1e-2, seed: int = 0):
        if layers not in ("depthwise", "conv"):
            raise ValueError(f"adaround layers {layers!r}: use depthwise or conv")
        self.layers, self.iters, self.max_samples, self.batch = layers, iters, max_samples, batch
        self.lam, self.lr, self.seed = lam, lr, seed

    def _selected(self, ctx: CorrectionContext) -> list:
        kinds = ("depthwise_conv2d",) if self.layers == "depthwise" else ("depthwise_conv2d", "conv2d")
        out = []
        for node in ctx.graph.nodes:
            op = ctx.strategy.ops.get(node.name)
            if (op is None or op.mode != "integer" or node.kind not in kinds or op.weight_codes is not None
                    or op.multipoint is not None):
                continue  # (gptq's codes, or multipoint's points fitted on its rounding, are already chosen)
            attrs = node.call.attrs
            if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW":
                continue
            if ctx.strategy.resolved(node.inputs[0]).dynamic:
                continue
            out.append(node)
        return out

    def run(self, ctx: CorrectionContext) -> dict:
        try:
            import torch
        except ImportError:
            raise QuantizeError("correction adaround needs PyTorch (pip install torch==2.13.0)") from None
        nodes = self._selected(ctx)
        if not nodes:
            return {"layers": 0}
        t0 = time.perf_counter()
        inputs = _fp32_inputs(ctx, nodes, self.max_samples)
        gen = torch.Generator().manual_seed(self.seed)  # the caller's global torch RNG stays untouched
        ratios = []
        with torch_threads(torch, 1):
            for node in nodes:
                op = ctx.strategy.ops[node.name]
                up, ratio = self._learn(torch, gen, node, op.weight_bits, ctx.strategy, inputs[node.inputs[0]])
                if ratio < 1.0:
                    op.weight_round = rounding.encode(up)
                ratios.append(ratio)
                log.debug("adaround %s: output MSE x%.3f of nearest", node.name, ratio)
        return {"layers": len(nodes), "learned": int(sum(r < 1.0 for r in ratios)),
                "mse_vs_nearest": round(float(np.mean(ratios)), 4), "seconds": round(time.perf_counter() - t0, 1)}

    def _learn(self, torch, gen, node, bits: int, strategy, x_np: np.ndarray) -> tuple[np.ndarray, float]:
        """(rounding bits, hard-rounded output MSE / nearest's) for one layer."""
        conv = torch_layer(torch, node)
        step = strategy.ops[node.name].weight_scale  # weight_clip's step, if it ran first
        ws_np, s_np, qp = rounding.grid(node.weight, node.kind, bits, step)
        x = torch.from_numpy(x_np)
        xq = _fake_quant(torch, x, strategy.resolved(node.inputs[0]).qparams)
        w = torch.from_numpy(node.weight.astype(np.float32))
        s = torch.from_numpy(s_np)
        w_floor = torch.from_numpy(np.floor(ws_np))
        with torch.no_grad():
            target = conv(x, w)
        rest = (torch.from_numpy(ws_np) - w_floor).clamp(0.01, 0.99)
        v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
        opt = torch.optim.Adam([v], lr=self.lr)
        n = len(x)
        warm = self.iters // 5
        for it in range(self.iters):
            idx = torch.randint(0, n, (min(self.batch, n),), generator=gen)
            h = (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
            wq = s * (w_floor + h).clamp(qp.qmin, qp.qmax)
            rec = (conv(xq[idx], wq) - target[idx]).pow(2).sum(1).mean()
            loss = rec
            if it >= warm:
                beta = 2 + 18 * (1 - (it - warm) / max(1, self.iters - warm))
                loss = loss + self.lam * (1 - (2 * h - 1).abs().pow(beta)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            up = (v >= 0).numpy()  # h(V) > 0.5
            learned = _mse(conv(xq, torch.from_numpy(rounding.rounded_weight(node.weight, node.kind, bits, up, step))),
                           target)
            near = _mse(conv(xq, torch.from_numpy(rounding.rounded_weight(
                node.weight, node.kind, bits, rounding.nearest_up(node.weight, node.kind, bits, step), step))), target)
        return up, learned / max(near, 1e-30)


def _mse(a, b) -> float:
    return float((a - b).pow(2).mean())


def _fake_quant(torch, x, qp):
    """``dequantize(quantize(x))`` with per-tensor parameters (``simulate._fake_quant``'s numbers)."""
    if qp is None:
        return x
    scale, zp = float(qp.scale), float(qp.zero_point)
    return ((torch.round(x / scale) + zp).clamp(qp.qmin, qp.qmax) - zp) * scale


def torch_layer(torch, node):
    """``f(x, w)``: ``node``'s conv (NCHW/OIHW, its padding, strides, dilation, groups) or dense in PyTorch, no bias."""
    if node.kind == "dense":
        return torch.matmul  # hago's dense is ``matmul(x, W)`` with ``W`` stored ``[K, N]``
    F = torch.nn.functional
    attrs = node.call.attrs
    top, left, bottom, right = (int(p) for p in attrs.padding)
    stride = tuple(int(s) for s in attrs.strides)
    dilation = tuple(int(d) for d in attrs.dilation)
    groups = int(attrs.groups)

    def conv(x, w):
        return F.conv2d(F.pad(x, (left, right, top, bottom)), w, stride=stride, dilation=dilation, groups=groups)

    return conv


def _fp32_inputs(ctx: CorrectionContext, nodes, max_samples: int) -> dict[str, np.ndarray]:
    """The FP32 input tensor of each node over the first ``max_samples`` calibration samples.

    All inputs are held at once (one probe pass): memory is ``max_samples`` x the sum of the
    selected layers' input sizes x 4 bytes (EfficientNet-Lite0, every conv, 32 samples: ~0.8 GB).
    """
    return fp32_edges(ctx, sorted({n.inputs[0] for n in nodes}), max_samples)


def fp32_edges(ctx: CorrectionContext, edges: list[str], max_samples: int,
               label: str = "adaround probe") -> dict[str, np.ndarray]:
    """The FP32 tensor of each named edge over the first ``max_samples`` calibration samples (one probe pass)."""
    bs = max(1, min(ctx.batch_size, 8, len(ctx.samples)))
    mod = build_mod.static_batch(probe_module(ctx.fp32, ctx.graph, edges), bs)
    vm = relax.VirtualMachine(build_mod.build(mod, ctx.target, label), tvm.cpu())
    outs = vm_outputs(ctx, vm, bs, range(len(edges)), max_samples)
    return dict(zip(edges, outs))


def vm_outputs(ctx: CorrectionContext, vm, bs: int, indices, max_samples: int, extra=()) -> list[np.ndarray]:
    """Outputs ``indices`` of ``vm``'s main over the first ``max_samples`` calibration samples, in batches of
    ``bs`` (the last one padded, its real rows kept); ``extra``: arguments after the model inputs."""
    names = [p.name for p in ctx.graph.params]
    indices = list(indices)
    got: list[list] = [[] for _ in indices]
    taken = 0
    for batch in ctx.samples.batches(bs):
        k = len(next(iter(batch.values())))
        if k < bs:  # static batch: pad the last one, keep its real rows
            batch = {m: np.concatenate([v, np.zeros((bs - k, *v.shape[1:]), v.dtype)]) for m, v in batch.items()}
        outs = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(batch[m])) for m in names], *extra)
        for j, i in enumerate(indices):
            got[j].append(outs[i].numpy()[:k])
        taken += k
        if taken >= max_samples:
            break
    return [np.ascontiguousarray(np.concatenate(v)[:max_samples], np.float32) for v in got]


@register("adaround_conv")
class AdaRoundConv(AdaRound):
    """``adaround`` on every integer conv, not only the depthwise ones (slower; 4-bit nets gain most)."""

    def __init__(self, **options):
        super().__init__(layers="conv", **options)
