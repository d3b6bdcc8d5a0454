"""gptq: each layer's integer weights chosen to keep its *output*, with the error of each rounded weight fed forward.

Rounding to nearest (and AdaRound's up/down choice) treats a layer's weights
one at a time. GPTQ (Frantar et al. 2023, after OBQ, Frantar & Alistarh 2022)
minimises the layer's output error ``||W X - Q X||^2`` over its calibration
inputs ``X`` directly: it rounds the weights of each output channel one input
column at a time and moves the columns not yet rounded to absorb the error,
through the inverse of ``H = X X^T / n``:

    q_i = round(w_i / s)            err = (w_i - s q_i) / U_ii
    w_j -= err * U_ij  for j > i    (U: the upper Cholesky factor of H^-1)

Columns go in order of falling ``H_ii`` (the reference's ``act_order``), with
1% of the mean diagonal added to ``H`` (its ``percdamp``), or ``d / rows`` of
it where the calibration gives fewer rows than inputs (:func:`shrunk`).

**Why it matters for the CNNs here.** A depthwise 3x3 filter has 9 weights per
channel; at 4 bits a max-abs step rounds most of them to 0 or 1 step.
Neighbouring pixels are strongly correlated, so an error in one tap can be
cancelled by the next: on EfficientNet-Lite0's first depthwise layer (4-bit,
32 calibration images) the output's relative squared error is 0.21 rounded to
nearest, 0.089 with the step below, and 0.010 with GPTQ. The whole network at
W4A8 (``gptq,bias``): mean KL from FP32 0.28 on the photo views, against 0.39
for AdaRound + bias, in a fifth of the time (``benchmarks/RESULTS.md``).

**The step.** Each output channel's step is the one, among the max-abs range
shrunk 1% a step over 80 steps, whose round-to-nearest output error
``(w - Q(w))^T H (w - Q(w))`` is least: :mod:`hago.correct.weight_clip`'s search
weighted by the layer's inputs (it takes EfficientNet-Lite0's first 1x1
projection from 0.032 to 0.002 before any error feedback). That step is the
best one for rounding to nearest, not for GPTQ, whose error feedback changes
what a finer or coarser grid costs: GPTQ is run at 17 multiples of it
(0.6-1.4, :data:`STEP_FACTORS`) and each row keeps the step whose GPTQ codes
leave the least output error (:func:`fitted_steps`; rows are independent, so
all candidates run as one stacked problem). On EfficientNet-Lite0 at W4A8
the network's KL from FP32 drops by a fifth to a quarter
(``benchmarks/RESULTS.md``; docs/STATUS.md, session 17, on other sets of
multiples). Only layers of at most :data:`FIT_STEPS_MAX_BITS` bits: at 8 bits it
made the KL worse (it fits the calibration samples' noise). Every step is
floored as weight_clip floors it (the quantized bias must fit the int32
accumulator).

**Groups.** A conv with ``G`` groups is ``G`` independent problems, each with
its own ``H`` over its ``C/G * KH * KW`` patch inputs: a depthwise layer solves
one 9x9 (3x3) problem per channel. A dense layer's ``H`` is over its ``K`` inputs.

**Sequential** (``gptq_sequential``; not local, so ``hago compile`` only). In the
quantized network a layer's input carries every earlier layer's error. After
the local pass, each layer in topological order is refit on the input the
quantized network gives it (every earlier layer already refit): the weights
that best map that input ``X_q`` onto FP32's output ``W X`` (:func:`refit`),
then GPTQ on ``H_q``. One simulated build serves all layers: the weights are
run-time inputs (``simulate(weight_inputs=)``), so each layer costs one pass
over the samples. Refitting every layer at once from one pass instead
double-counts: each layer undoes an upstream error that the upstream layer's
own refit removes too (EfficientNet-Lite0: KL 4.2).

**What is stored**: the step in ``OpChoice.weight_scale`` and the codes in
``OpChoice.weight_codes`` (error feedback moves some codes more than one step
from the weight, past what AdaRound's up/down bits can say). Like AdaRound the
inputs are each layer's FP32 input, fake-quantized by its edge, so the
correction is *local* (``hago search`` computes it once per layer setting).
Run ``bias`` after it (``--corrections gptq,bias``) to remove the mean shift
that is left. Dynamic-input layers (quantized per row at run time) keep
round to nearest.
"""

from __future__ import annotations

import time

import numpy as np

from hago.correct import rounding
from hago.correct.adaround import _fake_quant, _fp32_inputs, vm_outputs
from hago.correct.base import Correction, CorrectionContext, register
from hago.correct.weight_clip import SHRINKS, floored
from hago.errors import QuantizeError
from hago.qparams import integer_range

#: the reference's percdamp: this fraction of H's mean diagonal is added to its diagonal
DAMP = 0.01
#: calibration samples whose patches go into H at once (memory: EfficientNet-Lite0's first depthwise
#: layer is 32 channels x 9 taps x 12544 positions x 8 bytes = 29 MB a sample)
CHUNK = 4
#: columns rounded before their error is passed on to the rest in one product (the reference's blocksize):
#: the same codes as one column at a time, 2-3x faster on a 3136-input dense layer
BLOCK = 128


def grouped_weight(node, weight: np.ndarray | None = None) -> np.ndarray:
    """``[G, R, d]``: the layer's weight (or ``weight``, in its layout) as ``G`` groups of ``R`` rows over ``d`` inputs."""
    w = np.asarray(node.weight if weight is None else weight, np.float64)
    if node.kind == "dense":  # hago's dense is x @ W with W [K, N]
        return w.T[None]
    groups = int(node.call.attrs.groups)
    out_ch = w.shape[0]
    return w.reshape(groups, out_ch // groups, -1)


def ungrouped(node, g: np.ndarray) -> np.ndarray:
    """The inverse of :func:`grouped_weight`."""
    if node.kind == "dense":
        return np.ascontiguousarray(g[0].T)
    return g.reshape(node.weight.shape)


def hessian(torch, node, x: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``([G, d, d], n)``: ``E[p p^T]`` over the ``n`` input patches ``p`` of each group, from inputs ``x`` (float64).

    With ``y`` (the same samples through another network): the cross moments ``E[p_x p_y^T]``.
    """
    if node.kind == "dense":
        rows = torch.from_numpy(x.reshape(-1, x.shape[-1])).double()
        other = rows if y is None else torch.from_numpy(y.reshape(-1, y.shape[-1])).double()
        return (rows.T @ other).numpy()[None] / max(1, rows.shape[0]), rows.shape[0]
    total, count = None, 0
    for i in range(0, len(x), CHUNK):
        p = _patches(torch, node, x[i:i + CHUNK])
        q = p if y is None else _patches(torch, node, y[i:i + CHUNK])
        h = p @ q.transpose(1, 2)
        total = h if total is None else total + h
        count += p.shape[2]
    return total.numpy() / max(1, count), count


def _patches(torch, node, x: np.ndarray):
    """``[G, d, n]``: every input patch of each group (float64), as the conv reads them."""
    F = torch.nn.functional
    attrs = node.call.attrs
    top, left, bottom, right = (int(p) for p in attrs.padding)
    kh, kw = node.weight.shape[2:]
    groups = int(attrs.groups)
    xt = F.pad(torch.from_numpy(x), (left, right, top, bottom))
    u = F.unfold(xt, (kh, kw), stride=tuple(int(s) for s in attrs.strides),
                 dilation=tuple(int(d) for d in attrs.dilation))  # [N, C*kh*kw, L], channel-major
    n, _, positions = u.shape
    return u.reshape(n, groups, -1, positions).permute(1, 2, 0, 3).reshape(groups, -1, n * positions).double()


def shrunk(h: np.ndarray, rows: int, damp: float = DAMP) -> np.ndarray:
    """``H`` plus ``max(damp, d / rows)`` of its mean diagonal on the diagonal.

    With fewer patches than inputs (a dense layer at batch 1 sees one row per
    sample: 32 rows for ``d`` = 1280 inputs) ``H`` is singular and GPTQ would
    move weights along directions the calibration data never saw, which the
    test data does (MNIST at 8 bits: KL 3e-5 rounded to nearest, 4e-3 with a
    1% damp). Shrinking toward the diagonal in proportion to ``d / rows``
    leaves a well-sampled conv as it is and makes an under-sampled layer's
    GPTQ close to round to nearest. An input that never fired gets the mean
    diagonal as its own (its weight is kept, not zeroed as the reference does:
    32 samples do not show it is dead).
    """
    d = h.shape[-1]
    h = h.astype(np.float64).copy()
    diag = np.einsum("gii->gi", h)
    mean = np.maximum(diag.mean(axis=1), 1e-30)
    g_idx, i_idx = np.nonzero(diag <= 0)
    h[g_idx, i_idx, i_idx] = mean[g_idx]
    return h + max(damp, d / max(1, rows)) * mean[:, None, None] * np.eye(d)


def output_steps(w: np.ndarray, h: np.ndarray, qmax: int, shrinks: np.ndarray = SHRINKS) -> np.ndarray:
    """``[G, R]``: each row's step with the least round-to-nearest output error ``d^T H d``."""
    amax = np.abs(w).max(axis=2)
    best = np.full(amax.shape, np.inf)
    step = np.where(amax > 0, amax / qmax, 1.0)
    h32 = h.astype(np.float32)  # only compared between shrinks: float32's products are 2x faster than float64's
    for a in shrinks:
        s = np.where(amax > 0, a * amax / qmax, 1.0)
        d = (w - s[:, :, None] * np.clip(np.round(w / s[:, :, None]), -qmax, qmax)).astype(np.float32)
        err = ((d @ h32) * d).sum(axis=2, dtype=np.float64)
        better = err < best
        best = np.where(better, err, best)
        step = np.where(better, s, step)
    return step


def gptq_codes(w: np.ndarray, h: np.ndarray, step: np.ndarray, qmax: int) -> np.ndarray:
    """``[G, R, d]`` integer codes for weights ``w`` ``[G, R, d]`` on per-row ``step`` ``[G, R]``.

    ``h`` ``[G, d, d]``: the inputs' second moments, already :func:`shrunk` (positive definite).
    """
    w, h = w.astype(np.float64).copy(), h.astype(np.float64)
    d = w.shape[2]
    order = np.argsort(-np.einsum("gii->gi", h), axis=1, kind="stable")  # act_order
    w = np.take_along_axis(w, order[:, None, :], axis=2)
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], axis=2)
    u = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)  # upper: H^-1 = U^T U
    codes = np.zeros_like(w)
    for b0 in range(0, d, BLOCK):  # the reference's lazy batch: columns past the block get its error at once
        b1 = min(d, b0 + BLOCK)
        errs = np.zeros(w.shape[:2] + (b1 - b0,))
        for i in range(b0, b1):
            q = np.clip(np.round(w[:, :, i] / step), -qmax, qmax)
            codes[:, :, i] = q
            err = (w[:, :, i] - q * step) / u[:, i, i][:, None]
            w[:, :, i:b1] -= err[:, :, None] * u[:, None, i, i:b1]
            errs[:, :, i - b0] = err
        if b1 < d:
            w[:, :, b1:] -= errs @ u[:, b0:b1, b1:]
    back = np.argsort(order, axis=1)
    return np.take_along_axis(codes, back[:, None, :], axis=2)


#: the multiples of each row's round-to-nearest step at which GPTQ itself is run, each row keeping its best
#: (:func:`fitted_steps`): 0.60, 0.65, ..., 1.40
STEP_FACTORS = tuple(round(0.6 + 0.05 * i, 2) for i in range(17))
#: the widest weights whose steps are fitted so: at 8 bits the grid is fine enough that the choice only fits the
#: calibration samples' noise (EfficientNet-Lite0 W8A8 KL 0.0076 -> 0.0089 with it, while W4A8 0.280 -> 0.213)
FIT_STEPS_MAX_BITS = 4
#: the most bytes of stacked float64 weights :func:`fitted_steps` hands GPTQ at once (a 4096 x 4096 dense layer's 17
#: candidates would be 2.3 GB; it runs in row chunks instead)
STACK_BYTES = 256 << 20


#: calibration samples per layer when none are given. 128 instead left EfficientNet-Lite0 W4A8 where it was
#: (KL 0.209 sequential, 0.282 local; ``benchmarks/accuracy_table.py --gptq-samples 128``), at 2-4x the seconds
DEFAULT_SAMPLES = 32


@register("gptq")
class Gptq(Correction):
    """Output-aware steps and GPTQ codes for every integer conv and dense layer with a static input.

    ``max_samples`` calibration samples build each layer's ``H`` (default
    :data:`DEFAULT_SAMPLES`); ``max_bits``: only layers with at most this many
    weight bits (8: all).
    """

    local = True  # each layer works on its own FP32 input, quantized by its own input edge
    writes_weights = True

    def __init__(self, max_samples: int | None = None, max_bits: int = 8, sequential: bool = False):
        self.max_samples = DEFAULT_SAMPLES if max_samples is None else max_samples
        self.max_bits, self.sequential = max_bits, sequential

    def _selected(self, ctx: CorrectionContext) -> list:
        out = []
        for node in ctx.graph.nodes:
            op = ctx.strategy.ops.get(node.name)
            if (not node.weighted or op is None or op.mode != "integer" or not op.weight_bits
                    or op.weight_bits > self.max_bits or op.multipoint is not None
                    or op.weight_scale_in is not None or op.weight_scale is not None or op.weight_round is not None):
                continue
            if node.kind != "dense":
                attrs = node.call.attrs
                if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW":
                    continue
            edge = ctx.strategy.resolved(node.inputs[0])
            if edge.dynamic or edge.qparams is None or np.asarray(edge.qparams.scale).size != 1:
                continue
            out.append(node)
        return out

    def run(self, ctx: CorrectionContext) -> dict:
        try:
            import torch  # the patch products (unfold) only
        except ImportError:
            raise QuantizeError("correction gptq needs PyTorch (pip install torch==2.13.0)") from None
        nodes = self._selected(ctx)
        if not nodes:
            return {"layers": 0}
        t0 = time.perf_counter()
        inputs = _fp32_inputs(ctx, nodes, self.max_samples)
        gains = []
        for node in nodes:
            qp = ctx.strategy.resolved(node.inputs[0]).qparams
            x = _fake_quant(torch, torch.from_numpy(inputs[node.inputs[0]]), qp).numpy()
            h, rows = hessian(torch, node, x)
            gains.append(_store(ctx.strategy.ops[node.name], node, grouped_weight(node), shrunk(h, rows), qp))
        report = {"layers": len(nodes), "output_error_vs_nearest": round(float(np.mean(gains)), 4)}
        if self.sequential:
            report["sequential_vs_local"] = self._sequential(torch, ctx, nodes, inputs)
        return {**report, "seconds": round(time.perf_counter() - t0, 1)}

    def _sequential(self, torch, ctx: CorrectionContext, nodes, fp32_inputs) -> float:
        """Refit every layer, in topological order, on the input the quantized network gives it (module
        docstring); the mean over layers of the refit's error over the local codes' on that input."""
        import tvm
        from tvm import relax

        from hago import build as build_mod
        from hago.correct.base import corrected_graph
        from hago.simulate import simulate

        names = [n.name for n in nodes]
        edges = sorted({n.inputs[0] for n in nodes})
        base = corrected_graph(ctx.graph, ctx.strategy)  # the local pass's codes, as constants nobody reads
        bs = max(1, min(ctx.batch_size, 8, len(ctx.samples)))
        mod = build_mod.static_batch(simulate(base, ctx.strategy, weight_inputs=names, edge_taps=edges), bs)
        vm = relax.VirtualMachine(build_mod.build(mod, ctx.target, "gptq sequential"), tvm.cpu())
        weights = {n.name: np.ascontiguousarray(base.node(n.name).weight, np.float32) for n in nodes}
        ratios = []
        for node in nodes:  # topological: every layer before this one already refit
            src = node.inputs[0]
            extra = [tvm.runtime.tensor(weights[n]) for n in names]
            xq = vm_outputs(ctx, vm, bs, [edges.index(src)], self.max_samples, extra)[0]
            x = fp32_inputs[src]
            hx, _ = hessian(torch, node, x)
            hq, rows = hessian(torch, node, xq)
            cross, _ = hessian(torch, node, x, xq)  # E[p p_q^T]
            op = ctx.strategy.ops[node.name]
            w, local = grouped_weight(node), _coded(node, op)
            hs = shrunk(hq, rows)
            _store(op, node, refit(w, cross, hq, hs), hs, ctx.strategy.resolved(src).qparams)
            refitted = _coded(node, op)
            ratios.append(_target_error(w, refitted, hx, hq, cross) / max(_target_error(w, local, hx, hq, cross),
                                                                          1e-30))
            weights[node.name] = np.ascontiguousarray(ungrouped(node, refitted), np.float32)
        return round(float(np.mean(ratios)), 4)


def fitted_steps(w: np.ndarray, h: np.ndarray, start: np.ndarray, qmax: int, floor=None,
                 factors=STEP_FACTORS) -> tuple[np.ndarray, np.ndarray]:
    """``(step [G, R], codes [G, R, d])``: each row's step among ``start * factors`` whose GPTQ codes leave the
    least output error ``d^T H d`` (module docstring, "The step"), and those codes.

    Rows are independent problems in GPTQ (one row's error feeds only its own
    later columns), so every candidate is run in one :func:`gptq_codes` call
    on the rows stacked ``len(factors)`` times, and each row keeps its best.
    ``floor``: applied to each candidate's ``[G, R]`` steps (the bias's floor).
    """
    g, r, d = w.shape
    k = len(factors)
    steps = np.stack([start * f if floor is None else floor(start * f) for f in factors], axis=1)  # [G, K, R]
    best_steps, best_codes = np.empty(start.shape), np.empty(w.shape)
    rows = max(1, STACK_BYTES // (8 * g * k * d))  # rows per call: the stacked float64 copy stays under STACK_BYTES
    for r0 in range(0, r, rows):
        sl = slice(r0, min(r, r0 + rows))
        wc, sc = w[:, sl], steps[:, :, sl]
        n = wc.shape[1]
        stacked = np.broadcast_to(wc[:, None], (g, k, n, d)).reshape(g, k * n, d)
        codes = gptq_codes(stacked, h, sc.reshape(g, k * n), qmax).reshape(g, k, n, d)
        err = _row_errors((wc[:, None] - codes * sc[..., None]).reshape(g, k * n, d), h).reshape(g, k, n)
        pick = np.argmin(err, axis=1)[:, None, :]  # [G, 1, n]; ties: the first, the smallest factor
        best_steps[:, sl] = np.take_along_axis(sc, pick, axis=1)[:, 0]
        best_codes[:, sl] = np.take_along_axis(codes, pick[..., None], axis=1)[:, 0]
    return best_steps, best_codes


def _store(op, node, w: np.ndarray, h: np.ndarray, qp) -> float:
    """GPTQ on grouped weights ``w`` with shrunk ``h``: step and codes into ``op``; their error over nearest's
    (at the round-to-nearest step)."""
    _, qmax = integer_range("int8", op.weight_bits, narrow=True)

    def floor(step):  # [G, R] -> one per output channel, in order, and back
        return floored(node, step.reshape(-1), float(qp.scale)).reshape(step.shape)

    start = floor(output_steps(w, h, qmax))
    if op.weight_bits <= FIT_STEPS_MAX_BITS:
        step, codes = fitted_steps(w, h, start, qmax, floor)
    else:
        step, codes = start, gptq_codes(w, h, start, qmax)
    op.weight_scale = [float(v) for v in step.reshape(-1).astype(np.float32)]
    op.weight_codes = rounding.encode_codes(ungrouped(node, codes).astype(np.int8))
    return _error(w, h, codes, step) / max(_error(w, h, _nearest(w, start, qmax), start), 1e-30)


def refit(w: np.ndarray, cross: np.ndarray, hq: np.ndarray, hs: np.ndarray) -> np.ndarray:
    """The weights that best map the quantized input onto FP32's output, pulled toward ``w`` where ``X_q`` is thin.

    ``argmin E||W p - W* p_q||^2 + ||W* - W||^2_(Hs - Hq)`` = ``(W C + W (Hs - Hq)) Hs^-1``,
    ``C = E[p p_q^T]``, ``Hs`` the shrunk ``Hq``: the penalty is the shrinkage
    :func:`shrunk` added (shrinking toward 0 instead, ``W C Hs^-1``, was worse
    than ``W`` itself on a test block). With ``X_q = X`` the refit is ``W``.
    """
    return (w @ cross + w @ (hs - hq)) @ np.linalg.inv(hs)


def _coded(node, op) -> np.ndarray:
    """The grouped float weights ``op``'s codes stand for."""
    return grouped_weight(node, rounding.coded_weight(node.kind, op.weight_bits, op.weight_codes, op.weight_scale,
                                                      node.weight.shape))


def _target_error(w, wq, hx, hq, cross) -> float:
    """``E||W p - W_q p_q||^2`` summed over rows, from the moments (the sequential pass's objective)."""
    return float(((w @ hx) * w).sum() + ((wq @ hq) * wq).sum() - 2 * ((w @ cross) * wq).sum())


def _nearest(w: np.ndarray, step: np.ndarray, qmax: int) -> np.ndarray:
    return np.clip(np.round(w / step[:, :, None]), -qmax, qmax)


def _row_errors(d: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``[G, R]``: ``d_r^T H_g d_r`` for weight errors ``d`` ``[G, R, d]`` (a batched matmul, not a 3-operand einsum)."""
    return ((d @ h) * d).sum(axis=2)


def _error(w: np.ndarray, h: np.ndarray, codes: np.ndarray, step: np.ndarray) -> float:
    """The summed output error ``d^T H d`` of ``codes`` against the FP32 weights ``w``."""
    return float(_row_errors(w - codes * step[:, :, None], h).sum())





@register("gptq_sequential")
class GptqSequential(Gptq):
    """``gptq``, then each layer in turn refit on the input the quantized network gives it (not local)."""

    local = False  # a layer's refit depends on every layer before it

    def __init__(self, **options):
        super().__init__(sequential=True, **options)
