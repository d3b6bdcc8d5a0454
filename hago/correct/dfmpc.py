"""DF-MPC: data-free mixed-precision compensation (after Chen et al., arXiv 2307.00498), derived here.

A low-bit layer ``L1`` (2-4 bit weights) feeding, through a ReLU, a higher-bit layer ``L2`` (8 bit):
``L1``'s weight rounding error is absorbed by a closed-form per-input-channel rescaling ``c`` of ``L2``'s
weights plus a bias shift ``beta`` of ``L2``, computed from the batch-norm statistics folded into ``L1``
(``Node.bn_stats``) and the two layers' weights only. No data, no fine-tuning. No reference code is
public; the derivation follows.

**Model of L1's error.** For one output channel ``k`` of ``L1`` with FP32 filter ``w`` (BN folded,
flattened), bias ``b`` and quantized filter ``w_q = w + d`` (the weight realize uses: its bits, its
per-channel scale), the FP32 and quantized pre-activations are ``a = w.x + b`` and ``q = w_q.x + b``.
The BN statistics say ``a ~ N(mu, sigma^2)`` (``mu = beta_bn``, ``sigma = |gamma_bn|``). Split the
error filter along ``w``: ``d = lam w + r`` with ``lam = (w.d) / |w|^2`` and ``r`` orthogonal to ``w``.
Then exactly ``q = (1 + lam) a - lam b + r.x``. Assume ``L1``'s input patches have an isotropic
covariance ``s^2 I`` (an assumption that needs no data; ``Var a`` then fixes ``s^2 = sigma^2 / |w|^2``). Then ``Cov(a, r.x) = s^2 w.r = 0`` and ``Var(r.x) = tau^2 sigma^2`` with
``tau^2 = |r|^2 / |w|^2``; with a Gaussian input the noise ``e = r.x ~ N(m_e, tau^2 sigma^2)`` is
independent of ``a``. ``m_e = r.E[x]`` comes from the statistics of the layer before ``L1`` when it has
them (:func:`hago.correct.bias_data_free.expected_input`), else 0. A bias delta an earlier correction
stored on ``L1`` adds to ``q``. So, per channel, the pair ``(a, q)`` is jointly Gaussian with

    q = (1 + lam) a - lam b + db + e,   a ~ N(mu, sigma^2),   e ~ N(m_e, tau^2 sigma^2) independent.

**Loss.** ``L2`` sees ``h = relu(a)`` in FP32 and ``g = relu(q)`` in the mixed-precision model. With
``L2``'s weights scaled per input channel by ``c`` and its bias shifted by ``beta``, the output error is
``D_out = W2 (c * g - h) + beta`` (each input channel's spatial taps summed). Minimise
``E |W2 (c * g - h) + beta|^2``. BN gives per-channel statistics only, so take the channels as
independent: ``E[D_k D_l] = E[D_k] E[D_l]`` for ``k != l`` (``D_k = c_k g_k - h_k``). Then

    E|W2 D + beta|^2 = |W2 E[D] + beta|^2 + sum_k G_kk Var(D_k),    G = W2^T W2,

and the minimiser is separable and exact under the model: ``beta = -W2 E[D]`` removes the first term,
and each ``Var(c_k g_k - h_k)`` is a 1-D least-squares problem:

    c_k = Cov(h_k, g_k) / Var(g_k),    beta = -W2 (c * E[g] - E[h]).

Without the bias shift (``bias=False``) the cross terms of the means do not vanish; the per-channel
approximation (drop ``G``'s off-diagonal) gives ``c_k = E[h_k g_k] / E[g_k^2]``.

**The moments.** ``q`` is Gaussian, so ``E[g]``, ``E[g^2]`` are clipped-normal moments in closed form;
``E[h]`` likewise. The cross moment ``E[relu(a) relu(q)]`` is a truncated bivariate-normal moment:
conditioning on ``a``, ``E[relu(q) | a] = m Phi(m/s) + s phi(m/s)`` with ``m = (1 + lam) a - lam b + db
+ m_e``, ``s = tau sigma``, so ``E[h g] = int_{a>0} a phi_a(a) E[relu(q)|a] da``, a smooth 1-D integral
evaluated with 128-point Gauss-Legendre quadrature on ``a > 0`` (the test checks all the moments
against Monte Carlo). A dead channel (``P(a > 0) < 1e-6``) or a degenerate one keeps ``c = 1``.

**The norm-ratio form.** DF-MPC's paper rescales ``L2``'s input channel ``k`` by ``|w_k| / |w_q,k|``
(``form="norm"``). Under the model above, when ``r = 0`` and ``mu = b = 0`` (ReLU is positively
homogeneous) ``g = (1 + lam) h`` and the moment form gives ``c = 1/(1 + lam) = |w|^2 / (w.w_q)``, which
equals the norm ratio only when ``w_q`` is parallel to ``w``. The norm form ignores the bias (a
channel with ``mu != 0`` shifts differently from how it scales), the ReLU's truncation, and the
orthogonal rounding noise ``r``, which inflates ``|w_q|`` and makes the norm form shrink channels that
should not shrink. Measured (``tests/test_dfmpc.py``, conv3x3(3->16)-BN-ReLU-conv3x3(16->8), second
conv's output MSE relative to the uncompensated pair, on data the method never sees):

    L1 bits   moments+bias   moments, no bias   norm ratio   per-channel optimum fitted on the data
    2         0.727          0.732              0.751        0.727
    3         0.929          0.944              0.956        0.929

The moment form's scales match the per-channel optimum fitted on the data to 1.3% (the norm ratio is up
to 31% off); the realized integer program's output MSE drops 0.0323 -> 0.0236 (2 bits). ``moments`` is
the default. With a correlated input with an unknown mean (the isotropy assumption broken) the 2-bit
ratio is 0.742 (norm 0.777, fitted optimum 0.644).

**Limits.** A per-channel compensation cannot undo the rounding noise ``r.x`` orthogonal to each filter,
which is most of the error at 3 bits; that part is correlated *across* channels (they share ``x``), so
a full input-channel mixing matrix in ``L2`` fitted on data reaches 0.54 at 2 bits (this pair, input
mean 0.3), but predicting it without data needs the input's covariance, which batch norms do not record.

**Where it is stored.** ``c`` goes into ``OpChoice.weight_scale_in`` of ``L2`` (one float per input
channel of its weight: ``C_in`` of a conv, ``K`` of a dense ``[K, N]``; a flatten between the ReLU and a
dense repeats each channel's ``c``), ``beta`` into ``L2``'s ``bias_delta``.
:func:`hago.correct.base.corrected_graph` scales the weights before they are quantized, so realize,
simulate and a replayed ``strategy.json`` all quantize the compensated weights.

**Eligible pairs** (the search's pair constraint): ``L1`` integer with batch-norm statistics, then
``relu`` (optionally a flatten), then ``L2`` integer with *more* weight bits than ``L1``. An ``L2`` with
adaround's learned rounding is left alone, and adaround after ``dfmpc`` on the same ``L2`` is refused
(``corrected_graph``: adaround learns on the unscaled weights). ``bias_data_free`` or ``bias`` before or
after is fine (measured: the same error either way).
With no eligible pair the correction logs one line and changes nothing.
"""

from __future__ import annotations

import logging

import numpy as np

from hago.correct.base import Correction, CorrectionContext, corrected_graph, register, scale_input_channels
from hago.correct.bias_data_free import _Phi, _phi, _flatten_repeat, expected_input, output_shift
from hago.graph import Graph, Node
from hago.realize.quant import fake_quantized_weight, weight_axis

log = logging.getLogger(__name__)

FORMS = ("moments", "norm")
_LEG_U, _LEG_W = np.polynomial.legendre.leggauss(128)
#: the compensation a channel may get; outside it the model is not to be trusted
C_MIN, C_MAX = 0.25, 4.0


# -- the Gaussian model's moments ------------------------------------------------------------------
def relu_moments(mu, sigma) -> tuple[np.ndarray, np.ndarray]:
    """``(E[relu(z)], E[relu(z)^2])`` for ``z ~ N(mu, sigma^2)``, elementwise."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    safe = np.where(sigma > 0, sigma, 1.0)
    t = mu / safe
    m1 = mu * _Phi(t) + sigma * _phi(t)
    m2 = (mu * mu + sigma * sigma) * _Phi(t) + mu * sigma * _phi(t)
    pos = np.maximum(mu, 0.0)
    return np.where(sigma > 0, m1, pos), np.where(sigma > 0, m2, pos * pos)


def pair_moments(mu, sigma, slope, offset, noise_mean, noise_std) -> dict[str, np.ndarray]:
    """Moments of ``h = relu(a)`` and ``g = relu(q)`` with ``a ~ N(mu, sigma^2)``,
    ``q = slope * a + offset + e``, ``e ~ N(noise_mean, noise_std^2)`` independent of ``a`` (per channel).

    Returns ``Eh, Eh2, Eg, Eg2, Ehg`` and ``alive`` (``P(a > 0) >= 1e-6`` and ``sigma > 0``).
    """
    mu, sigma, slope, offset, nm, ns = (np.asarray(v, np.float64) for v in
                                        (mu, sigma, slope, offset, noise_mean, noise_std))
    Eh, Eh2 = relu_moments(mu, sigma)
    qmu = slope * mu + offset + nm
    Eg, Eg2 = relu_moments(qmu, np.sqrt((slope * sigma) ** 2 + ns ** 2))
    safe = np.where(sigma > 0, sigma, 1.0)
    lo = -mu / safe  # a > 0  <=>  u > lo (standardized)
    alive = (sigma > 0) & (lo < 4.75)  # P(a > 0) >= ~1e-6
    lo = np.clip(lo, -12.0, 4.75)
    hi = np.maximum(lo, 0.0) + 12.0
    # Gauss-Legendre nodes on [lo, hi] per channel: u [C, n], du weights [C, n]
    half = (hi - lo)[..., None] / 2
    u = (lo[..., None] + hi[..., None]) / 2 + half * _LEG_U
    wts = half * _LEG_W
    a = mu[..., None] + safe[..., None] * u
    m = slope[..., None] * a + offset[..., None] + nm[..., None]
    s = ns[..., None]
    sm = np.where(s > 0, s, 1.0)
    cond = np.where(s > 0, m * _Phi(m / sm) + s * _phi(m / sm), np.maximum(m, 0.0))  # E[relu(q) | a]
    Ehg = (wts * a * _phi(u) * cond).sum(axis=-1)
    return {"Eh": Eh, "Eh2": Eh2, "Eg": Eg, "Eg2": Eg2, "Ehg": np.where(alive, Ehg, 0.0), "alive": alive}


def compensation(mom: dict, bias: bool = True) -> np.ndarray:
    """``c`` per channel from :func:`pair_moments`: ``Cov(h, g) / Var(g)`` with the bias shift, else
    ``E[hg] / E[g^2]``; 1 for dead or degenerate channels, clipped to ``[C_MIN, C_MAX]``."""
    if bias:
        num, den = mom["Ehg"] - mom["Eh"] * mom["Eg"], mom["Eg2"] - mom["Eg"] ** 2
    else:
        num, den = mom["Ehg"], mom["Eg2"]
    ok = mom["alive"] & (den > 1e-12 * np.maximum(mom["Eh2"], 1e-30)) & (num > 0)
    c = np.where(ok, num / np.where(ok, den, 1.0), 1.0)
    return np.clip(c, C_MIN, C_MAX)


# -- the layers ------------------------------------------------------------------------------------
def _filters(node: Node, w: np.ndarray) -> np.ndarray:
    """``[out channels, fan-in]``: each output channel's filter, flattened."""
    return np.moveaxis(w, weight_axis(node), 0).reshape(w.shape[weight_axis(node)], -1)


def _in_size(node: Node) -> int:
    if node.kind == "dense":
        return node.weight.shape[0]
    return node.weight.shape[1] * int(node.call.attrs.groups)


def find_pairs(graph: Graph, strategy) -> tuple[list[tuple[Node, Node, int]], dict[str, int]]:
    """``([(L1, L2, repeat)], skipped)``: the low-bit -> relu (-> flatten) -> higher-bit pairs."""
    pairs, skipped = [], {}

    def skip(why):
        skipped[why] = skipped.get(why, 0) + 1

    for second in graph.nodes:
        op2 = strategy.ops.get(second.name)
        if not second.weighted or op2 is None or op2.mode != "integer" or op2.weight_bits is None:
            continue
        edge, repeat, ops = second.inputs[0], 1, []
        p = graph.producer(edge)
        if p is not None and p.kind == "reshape":
            ops.append(p)
            p = graph.producer(p.inputs[0])
        if p is None or p.kind != "relu":
            continue
        first = graph.producer(p.inputs[0])
        if first is None or not first.weighted:
            continue
        op1 = strategy.ops.get(first.name)
        if op1 is None or op1.mode != "integer" or op1.weight_bits is None or op1.weight_bits >= op2.weight_bits:
            continue  # not a low-bit -> high-bit pair
        channels = first.weight.shape[weight_axis(first)]
        if ops:
            repeat = _flatten_repeat(graph, ops[0], channels)
            if repeat is None or second.kind != "dense":
                skip("reshape")
                continue
        if channels * repeat != _in_size(second):
            skip("shape")
        elif first.bn_stats is None:
            skip("no batch norm")
        elif op2.weight_round is not None or op2.weight_scale_in is not None or op2.weight_scale is not None:
            skip("already corrected")
        else:
            pairs.append((first, second, repeat))
    return pairs, skipped


def _input_scale(strategy, node: Node) -> float | None:
    edge = strategy.resolved(node.inputs[0])
    if edge.qparams is not None and np.asarray(edge.qparams.scale).size == 1 and not edge.dynamic:
        return float(np.asarray(edge.qparams.scale).ravel()[0])
    return None


def layer_model(base: Graph, fp32: Node, strategy) -> dict[str, np.ndarray]:
    """Per output channel of ``L1``: ``mu, sigma`` (BN) and the model's ``slope, offset, noise_mean,
    noise_std`` of ``q = slope * a + offset + e``, plus the filter norms ``|w|``, ``|w_q|``."""
    node = base.node(fp32.name)  # the corrected L1 (an earlier rounding or bias delta is part of q)
    op = strategy.ops[fp32.name]
    w = fp32.weight.astype(np.float64)
    wq = fake_quantized_weight(node, op.weight_bits, _input_scale(strategy, node), op.weight_scale).astype(np.float64)
    W, Q = _filters(fp32, w), _filters(fp32, wq)
    D = Q - W
    n2 = np.maximum((W * W).sum(axis=1), 1e-30)
    lam = (W * D).sum(axis=1) / n2
    R = D - lam[:, None] * W
    tau = np.sqrt((R * R).sum(axis=1) / n2)
    mu, sigma = (np.asarray(v, np.float64) for v in fp32.bn_stats)
    b = fp32.bias.astype(np.float64) if fp32.bias is not None else np.zeros_like(mu)
    db = np.asarray(op.bias_delta, np.float64) if op.bias_delta is not None else 0.0
    ex, _ = expected_input(base, node)
    noise_mean = np.zeros_like(mu)
    if ex is not None:
        shift = output_shift(fp32, np.moveaxis(R.reshape(np.moveaxis(w, weight_axis(fp32), 0).shape), 0,
                                               weight_axis(fp32)), ex)
        if shift is not None:
            noise_mean = shift
    return {"mu": mu, "sigma": sigma, "slope": 1.0 + lam, "offset": -lam * b + db, "noise_mean": noise_mean,
            "noise_std": tau * sigma, "norm_w": np.sqrt(n2), "norm_q": np.sqrt((Q * Q).sum(axis=1))}


def pair_compensation(base: Graph, first: Node, strategy, form: str = "moments",
                      bias: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """``(c, E[D])`` per channel of ``L1`` (``first``: its FP32 node): the compensation and, with ``bias``,
    the mean error ``c E[g] - E[h]`` that ``L2`` maps to its bias shift (else None)."""
    mdl = layer_model(base, first, strategy)
    mom = pair_moments(mdl["mu"], mdl["sigma"], mdl["slope"], mdl["offset"], mdl["noise_mean"], mdl["noise_std"])
    if form == "norm":
        c = np.clip(mdl["norm_w"] / np.maximum(mdl["norm_q"], 1e-30), C_MIN, C_MAX)
    else:
        c = compensation(mom, bias)
    return c, (mom["Eg"] * c - mom["Eh"] if bias else None)


@register("dfmpc")
class DataFreeMixedPrecisionCompensation(Correction):
    """Absorb a low-bit layer's weight error into the next, higher-bit layer's per-input-channel scales and
    bias, in closed form from batch-norm statistics (no data)."""

    per_candidate = True  # closed form, no data: a search runs it on each candidate (its pairs are the search's)

    def __init__(self, form: str = "moments", bias: bool = True):
        if form not in FORMS:
            raise ValueError(f"dfmpc form must be one of {FORMS}, got {form!r}")
        self.form, self.bias = form, bias

    def run(self, ctx: CorrectionContext) -> dict:
        g, s = ctx.graph, ctx.strategy
        pairs, skipped = find_pairs(g, s)
        if not pairs:
            msg = ("no low-bit -> relu -> higher-bit pair with batch-norm statistics: nothing compensated"
                   + (f" (skipped {skipped})" if skipped else ""))
            log.warning("dfmpc: %s", msg)
            return {"pairs": 0, "note": msg}
        base = corrected_graph(g, s)
        done, spread = 0, []
        for first, second, repeat in pairs:
            c, mean_err = pair_compensation(base, first, s, self.form, self.bias)
            cin = np.repeat(c, repeat)
            op2 = s.ops[second.name]
            op2.weight_scale_in = [float(v) for v in cin.astype(np.float32)]
            if mean_err is not None:
                shift = output_shift(second, second.weight.astype(np.float64), np.repeat(mean_err, repeat))
                if shift is not None:
                    prev = np.asarray(op2.bias_delta, np.float64) if op2.bias_delta is not None else 0.0
                    op2.bias_delta = [float(v) for v in (prev - shift).astype(np.float32)]
            done += 1
            spread.append(float(np.abs(np.log(c)).max()))
        report = {"pairs": done, "form": self.form, "bias": self.bias,
                  "max_abs_log_c": round(max(spread), 4)}
        if skipped:
            report["skipped"] = skipped
        return report


__all__ = ["DataFreeMixedPrecisionCompensation", "compensation", "find_pairs", "pair_compensation",
           "pair_moments", "relu_moments", "scale_input_channels"]
