"""Tests of the independent integer reference (tests/intref.py) itself.

The reference is checked against *different* computations: float64 torch
conv/matmul/pool, exact rational arithmetic (fractions.Fraction), and TVM's
compiled relax.op.quantize / dequantize.
"""

from fractions import Fraction

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from intref import (  # noqa: E402
    add_int_exact,
    add_int_fixed,
    avg_pool2d_int,
    conv2d_int,
    conv2d_requant_reference,
    decompose_scale,
    dense_int,
    dequantize,
    global_avg_pool_int,
    infer_int_dtype,
    matmul_requant_reference,
    max_pool2d_int,
    quantize,
    relu_int,
    requantize_fixed_point,
    rescale_fixed_point,
    rounding_divide,
)


def _frac_round_half_away(fr: Fraction) -> int:
    """Exact rational rounding, ties away from zero."""
    mag = abs(fr)
    r = int(mag + Fraction(1, 2))  # floor for non-negative
    return -r if fr < 0 else r


def _frac_round_half_even(fr: Fraction) -> int:
    fl = fr.numerator // fr.denominator
    rem = fr - fl
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and fl % 2 == 1):
        return fl + 1
    return fl


# ---------------------------------------------------------------- conv / dense
def _torch_conv(xc, w, stride, padding, dilation, groups):
    """float64 conv of the zero-centred x with zero padding (t, l, b, r)."""
    t, l, b, r = padding
    xt = torch.from_numpy(xc.astype(np.float64))
    xt = F.pad(xt, (l, r, t, b), value=0.0)
    wt = torch.from_numpy(w.astype(np.float64))
    y = F.conv2d(xt, wt, stride=stride, dilation=dilation, groups=groups)
    return y.numpy()


CONV_CASES = [
    # (N, C, H, W, O, KH, KW, stride, padding, dilation, groups)
    (2, 16, 14, 14, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (2, 16, 14, 14, 32, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1),
    (2, 16, 14, 14, 32, 3, 3, (2, 2), (0, 1, 1, 0), (1, 1), 1),  # asymmetric pad
    (1, 8, 13, 11, 8, 3, 3, (1, 2), (2, 2, 2, 2), (2, 2), 1),  # dilation
    (2, 16, 14, 14, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 16),  # depthwise
    (2, 16, 14, 14, 16, 3, 3, (2, 2), (0, 0, 1, 1), (1, 1), 16),  # depthwise s2 (TF SAME)
    (2, 16, 9, 9, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4),  # grouped
    (2, 16, 14, 14, 32, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),  # pointwise
    (1, 3, 15, 15, 8, 7, 5, (2, 3), (3, 2, 3, 2), (1, 1), 1),  # non-square kernel
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("xdtype,x_zp", [("uint8", 0), ("int8", 0), ("uint8", 128), ("uint8", 37), ("int8", -5)])
def test_conv2d_int_vs_float(case, xdtype, x_zp):
    N, C, H, W, O, KH, KW, stride, padding, dilation, groups = case
    rng = np.random.default_rng(hash((case, xdtype, x_zp)) % 2**32)
    info = np.iinfo(xdtype)
    x = rng.integers(info.min, info.max + 1, (N, C, H, W)).astype(xdtype)
    w = rng.integers(-128, 128, (O, C // groups, KH, KW)).astype(np.int8)
    got = conv2d_int(x, w, x_zp, stride=stride, padding=padding, dilation=dilation, groups=groups)
    assert got.dtype == np.int32
    ref = _torch_conv(x.astype(np.int64) - x_zp, w, stride, padding, dilation, groups)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got.astype(np.float64), ref)


def test_conv2d_int_padding_is_real_zero():
    # a 1x1 image of value x_zp (real 0) padded: every output must be 0;
    # a 1x1 image of value x_zp+1 with an all-ones 3x3 kernel gives 1 everywhere
    x = np.full((1, 1, 1, 1), 100, np.uint8)
    w = np.ones((1, 1, 3, 3), np.int8)
    np.testing.assert_array_equal(conv2d_int(x, w, 100, padding=(1, 1, 1, 1)), np.zeros((1, 1, 1, 1)))
    np.testing.assert_array_equal(conv2d_int(x, w, 99, padding=(1, 1, 1, 1)), np.ones((1, 1, 1, 1)))


def test_conv2d_int_speed():
    import time

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 16, 14, 14)).astype(np.uint8)
    w = rng.integers(-128, 128, (32, 16, 3, 3)).astype(np.int8)
    t0 = time.perf_counter()
    conv2d_int(x, w, 128, padding=(1, 1, 1, 1))
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("xdtype,x_zp", [("uint8", 0), ("uint8", 128), ("int8", 0), ("int8", 7)])
def test_dense_int_vs_float(xdtype, x_zp):
    rng = np.random.default_rng(3)
    info = np.iinfo(xdtype)
    x = rng.integers(info.min, info.max + 1, (7, 300)).astype(xdtype)
    w = rng.integers(-128, 128, (300, 33)).astype(np.int8)
    got = dense_int(x, w, x_zp)
    assert got.dtype == np.int32
    ref = (x.astype(np.float64) - x_zp) @ w.astype(np.float64)
    np.testing.assert_array_equal(got.astype(np.float64), ref)


# ---------------------------------------------------------------- requantize
def _requant_frac(acc, mult, shift, zp, qmin, qmax):
    v = _frac_round_half_away(Fraction(int(acc) * int(mult), 2 ** int(shift))) + int(zp)
    return min(max(v, qmin), qmax)


def test_requantize_vs_fraction_with_ties():
    rng = np.random.default_rng(1234)
    n = 10000
    shift = rng.integers(1, 63, n)
    mult = rng.integers(2**30, 2**31, n)
    acc = rng.integers(-(2**31), 2**31, n)
    # half of the samples: exact .5 ties.  For shift s <= 31 use
    # mult = r * 2**(s-1) with r odd and acc odd: acc*mult/2**s = acc*r/2.
    tie = np.zeros(n, bool)
    tie[: n // 2] = True
    shift[tie] = rng.integers(1, 32, tie.sum())
    s = shift[tie]
    r = 2 * rng.integers(0, 2 ** (31 - s)) + 1  # odd, < 2**(32-s)
    mult[tie] = r * 2 ** (s - 1)
    a = rng.integers(-(2**20), 2**20, tie.sum())
    acc[tie] = 2 * a + 1
    # also exercise small accumulators and extremes
    acc[n // 2 : n // 2 + 1000] = rng.integers(-300, 300, 1000)
    acc[-1], mult[-1], shift[-1] = -(2**31), 2**31 - 1, 62
    acc[-2], mult[-2], shift[-2] = 2**31 - 1, 2**31 - 1, 1
    assert np.all(mult < 2**31) and np.all(mult >= 1)

    zp = rng.integers(-128, 128, n)
    for qmin, qmax in [(-128, 127), (0, 255), (-(2**31), 2**31 - 1)]:
        got = requantize_fixed_point(
            acc.astype(np.int32), mult.astype(np.int32), shift.astype(np.int32), zp, qmin, qmax,
            out_dtype=np.int64,
        )
        ref = np.array([_requant_frac(*t, qmin, qmax) for t in zip(acc, mult, shift, zp)], np.int64)
        np.testing.assert_array_equal(got, ref)

    # ties really are ties and both signs occur
    p = acc[tie].astype(object) * mult[tie].astype(object)
    assert all(Fraction(int(v), 2 ** int(k)).denominator == 2 for v, k in zip(p, shift[tie]))
    assert (acc[tie] < 0).sum() > 1000 and (acc[tie] > 0).sum() > 1000
    # unclipped spot checks of the half-away-from-zero tie rule
    assert rescale_fixed_point(np.array([1, -1, 3, -3]), 2**30, 31).tolist() == [1, -1, 2, -2]
    assert rescale_fixed_point(np.array([5, -5]), 1, 1).tolist() == [3, -3]


def test_requantize_per_channel_and_dtype():
    rng = np.random.default_rng(5)
    acc = rng.integers(-(2**24), 2**24, (2, 4, 3, 3)).astype(np.int32)
    mult, shift = decompose_scale(rng.uniform(1e-5, 1e-2, 4))
    zp = 3
    got = requantize_fixed_point(acc, mult, shift, zp, -128, 127, axis=1)
    assert got.dtype == np.int8
    # equivalent explicit broadcasting
    got2 = requantize_fixed_point(acc, mult[None, :, None, None], shift[None, :, None, None], zp, -128, 127)
    np.testing.assert_array_equal(got, got2)
    for c in range(4):
        ref = [_requant_frac(a, mult[c], shift[c], zp, -128, 127) for a in acc[:, c].ravel()]
        np.testing.assert_array_equal(got[:, c].ravel(), ref)
    assert requantize_fixed_point(acc, mult, shift, 128, 0, 255, axis=1).dtype == np.uint8
    assert infer_int_dtype(0, 255) == np.uint8 and infer_int_dtype(-128, 127) == np.int8
    assert infer_int_dtype(-(2**31), 2**31 - 1) == np.int32
    with pytest.raises(ValueError):
        requantize_fixed_point(acc, mult, np.zeros(4, np.int32), 0, -128, 127, axis=1)


# ---------------------------------------------------------------- decompose
def test_decompose_scale():
    rng = np.random.default_rng(7)
    scales = np.concatenate([
        10.0 ** rng.uniform(-9, 9, 5000),
        [0.5, 0.25, 1.0, 2.0, 1 - 2.0**-40, 0.75, 2.0**-32, 2.0**29, 1e-5, 3.7],
    ])
    scales = scales[(scales >= 2.0**-32) & (scales < 2.0**30)]
    mult, shift = decompose_scale(scales)
    assert mult.dtype == np.int32 and mult.shape == scales.shape
    assert np.all(mult >= 2**30) and np.all(mult.astype(np.int64) < 2**31)
    assert np.all(shift >= 1) and np.all(shift <= 62)
    for sc, m, s in zip(scales, mult, shift):
        exact = Fraction(float(sc))
        approx = Fraction(int(m), 2 ** int(s))
        assert abs(approx - exact) / exact < Fraction(1, 2**30)
    m, s = decompose_scale(0.5)
    assert (int(m), int(s)) == (2**30, 31)
    m, s = decompose_scale(1 - 2.0**-40)  # rounds up to 2**31 -> renormalised
    assert (int(m), int(s)) == (2**30, 30)
    m, s = decompose_scale(3.0)
    assert Fraction(int(m), 2 ** int(s)) == 3
    # per-channel 2-D shape preserved
    m2, s2 = decompose_scale(np.full((2, 3), 0.1))
    assert m2.shape == (2, 3) and s2.shape == (2, 3)
    for bad in [0.0, -1.0, np.nan, np.inf, 2.0**31, 2.0**-40, [0.1, 2.0**40]]:
        with pytest.raises(ValueError):
            decompose_scale(bad)


# ---------------------------------------------------------------- add
ADD_CASES = [
    # a_scale, a_zp, b_scale, b_zp, out_scale, out_zp, qmin, qmax
    (0.02, 128, 0.03, 120, 0.04, 125, 0, 255),
    (0.1, 0, 0.05, 0, 0.1, 0, -128, 127),
    (0.0371, -3, 0.0113, 10, 0.025, -7, -128, 127),
    (0.5, 128, 0.001, 128, 0.3, 0, 0, 255),
    (0.02, 0, 0.02, 0, 0.01, 0, -128, 127),  # ratio 2 (>= 1)
]


@pytest.mark.parametrize("case", ADD_CASES)
def test_add_int_fixed_within_one_of_exact(case):
    a_s, a_zp, b_s, b_zp, o_s, o_zp, qmin, qmax = case
    dt = infer_int_dtype(min(qmin, -128 if qmin < 0 else 0), qmax)
    info = np.iinfo(dt)
    a = np.arange(info.min, info.max + 1).astype(dt)[:, None]
    b = np.arange(info.min, info.max + 1).astype(dt)[None, :]
    fx = add_int_fixed(a, a_s, a_zp, b, b_s, b_zp, o_s, o_zp, qmin, qmax).astype(np.int64)
    ex = add_int_exact(a, a_s, a_zp, b, b_s, b_zp, o_s, o_zp, qmin, qmax).astype(np.int64)
    assert fx.shape == (256, 256)
    assert np.abs(fx - ex).max() <= 1
    assert (fx == ex).mean() > 0.5

    # the fixed-point definition, re-derived with Fractions on a sample
    ma, sa = decompose_scale(np.float64(a_s) / np.float64(o_s))
    mb, sb = decompose_scale(np.float64(b_s) / np.float64(o_s))
    rng = np.random.default_rng(0)
    for i, j in rng.integers(0, 256, (500, 2)):
        av, bv = int(a[i, 0]), int(b[0, j])
        ta = _frac_round_half_away(Fraction((av - a_zp) * int(ma), 2 ** int(sa)))
        tb = _frac_round_half_away(Fraction((bv - b_zp) * int(mb), 2 ** int(sb)))
        assert fx[i, j] == min(max(ta + tb + o_zp, qmin), qmax)


# ---------------------------------------------------------------- relu / pools
def test_relu_int():
    q = np.array([0, 5, 10, 200, 255], np.uint8)
    r = relu_int(q, 10)
    assert r.dtype == np.uint8 and r.tolist() == [10, 10, 10, 200, 255]
    q = np.array([-128, -1, 0, 3, 127], np.int8)
    assert relu_int(q, -1).tolist() == [-1, -1, 0, 3, 127]


def test_rounding_divide_vs_fraction():
    rng = np.random.default_rng(9)
    num = rng.integers(-(2**31), 2**31, 5000)
    den = rng.integers(1, 200, 5000)
    # exact ties: num / den = (2t + 1) / 2
    num[:2000] = (2 * rng.integers(-1000, 1000, 2000) + 1) * den[:2000]
    den[:2000] *= 2
    got = rounding_divide(num, den)
    ref = [_frac_round_half_away(Fraction(int(n), int(d))) for n, d in zip(num, den)]
    np.testing.assert_array_equal(got, ref)
    assert rounding_divide(np.array([3, -3, 5, -5, 1, -1]), 2).tolist() == [2, -2, 3, -3, 1, -1]


POOL_CASES = [
    # pool, stride, padding
    ((2, 2), (2, 2), (0, 0, 0, 0)),
    ((3, 3), (2, 2), (1, 1, 1, 1)),
    ((3, 3), (1, 1), (1, 1, 1, 1)),
    ((3, 3), (2, 2), (0, 0, 1, 1)),
    ((2, 3), (1, 2), (1, 0, 0, 1)),
]


@pytest.mark.parametrize("pool,stride,padding", POOL_CASES)
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_max_pool2d_int(pool, stride, padding, dtype):
    rng = np.random.default_rng(11)
    info = np.iinfo(dtype)
    q = rng.integers(info.min, info.max + 1, (2, 5, 9, 8)).astype(dtype)
    got = max_pool2d_int(q, pool, stride, padding)
    assert got.dtype == q.dtype
    t, l, b, r = padding
    qt = F.pad(torch.from_numpy(q.astype(np.float64)), (l, r, t, b), value=-np.inf)
    ref = F.max_pool2d(qt, pool, stride).numpy()
    np.testing.assert_array_equal(got.astype(np.float64), ref)


@pytest.mark.parametrize("pool,stride,padding", POOL_CASES)
@pytest.mark.parametrize("dtype,zp", [("uint8", 128), ("uint8", 0), ("int8", -3)])
@pytest.mark.parametrize("cip", [False, True])
def test_avg_pool2d_int(pool, stride, padding, dtype, zp, cip):
    rng = np.random.default_rng(13)
    info = np.iinfo(dtype)
    q = rng.integers(info.min, info.max + 1, (2, 5, 9, 8)).astype(dtype)
    got = avg_pool2d_int(q, zp, pool, stride, padding, count_include_pad=cip)
    assert got.dtype == q.dtype
    t, l, b, r = padding
    xc = F.pad(torch.from_numpy(q.astype(np.float64) - zp), (l, r, t, b), value=0.0)
    ones = F.pad(torch.ones((1, 1) + q.shape[2:], dtype=torch.float64), (l, r, t, b), value=0.0)
    sums = F.avg_pool2d(xc, pool, stride, divisor_override=1).numpy()
    cnt = F.avg_pool2d(ones, pool, stride, divisor_override=1).numpy()
    if cip:
        cnt = np.full_like(cnt, pool[0] * pool[1])
    ref = [
        _frac_round_half_away(Fraction(int(s), int(c))) + zp
        for s, c in zip(sums.ravel(), np.broadcast_to(cnt, sums.shape).ravel())
    ]
    np.testing.assert_array_equal(got.ravel().astype(np.int64), ref)


def test_avg_pool_rounding_is_zero_point_centred():
    # values 128,129 with zp=128 -> mean(q-zp)=0.5 -> 1 -> 129
    # values 127,128 with zp=128 -> mean(q-zp)=-0.5 -> -1 -> 127  (raw mean 127.5 would give 128)
    q = np.array([[[[127, 128]]]], np.uint8)
    assert avg_pool2d_int(q, 128, (1, 2), (1, 1)).item() == 127
    assert global_avg_pool_int(q, 128).item() == 127
    q = np.array([[[[128, 129]]]], np.uint8)
    assert global_avg_pool_int(q, 128).item() == 129


@pytest.mark.parametrize("dtype,zp", [("uint8", 128), ("int8", 0), ("int8", 5)])
def test_global_avg_pool_int(dtype, zp):
    rng = np.random.default_rng(17)
    info = np.iinfo(dtype)
    q = rng.integers(info.min, info.max + 1, (2, 16, 7, 7)).astype(dtype)
    got = global_avg_pool_int(q, zp)
    assert got.shape == (2, 16, 1, 1) and got.dtype == q.dtype
    s = q.astype(np.int64).sum(axis=(2, 3)) - zp * 49
    ref = [_frac_round_half_away(Fraction(int(v), 49)) + zp for v in s.ravel()]
    np.testing.assert_array_equal(got.ravel().astype(np.int64), ref)


# ---------------------------------------------------------------- full layers
def test_matmul_requant_reference():
    rng = np.random.default_rng(19)
    x = rng.integers(0, 256, (4, 64)).astype(np.uint8)
    w = rng.integers(-127, 128, (64, 10)).astype(np.int8)
    bias = rng.integers(-5000, 5000, 10).astype(np.int32)
    mult, shift = decompose_scale(rng.uniform(1e-4, 1e-3, 10))
    y = matmul_requant_reference(x, w, 128, bias, mult, shift, 3, -128, 127)
    assert y.dtype == np.int8 and y.shape == (4, 10)
    xs, ws = x.astype(int) - 128, w.astype(int)
    for m in range(4):
        for n in range(10):
            acc = int(sum(int(xs[m, k]) * int(ws[k, n]) for k in range(64))) + int(bias[n])
            assert y[m, n] == _requant_frac(acc, mult[n], shift[n], 3, -128, 127)
    # scalar multiplier/shift
    y1 = matmul_requant_reference(x, w, 128, None, mult[0], shift[0], 0, 0, 255)
    assert y1.dtype == np.uint8


def test_conv2d_requant_reference():
    rng = np.random.default_rng(23)
    x = rng.integers(0, 256, (1, 4, 6, 6)).astype(np.uint8)
    w = rng.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8)
    bias = rng.integers(-3000, 3000, 8).astype(np.int32)
    mult, shift = decompose_scale(rng.uniform(1e-3, 1e-2, 8))
    y = conv2d_requant_reference(x, w, 120, bias, mult, shift, 0, 0, 255, padding=(1, 1, 1, 1))
    acc = conv2d_int(x, w, 120, padding=(1, 1, 1, 1)).astype(np.int64) + bias[None, :, None, None]
    for o in range(8):
        ref = [_requant_frac(a, mult[o], shift[o], 0, 0, 255) for a in acc[:, o].ravel()]
        np.testing.assert_array_equal(y[:, o].ravel(), ref)


# ---------------------------------------------------------------- quantize vs TVM
def test_quantize_fraction_half_even():
    # exact-rational half-to-even reference on power-of-two scales (no float error)
    rng = np.random.default_rng(29)
    k = rng.integers(-400, 400, 3000)
    x = ((k + 0.5) * 0.25).astype(np.float32)
    got = quantize(x, 0.25, 0, -(2**31), 2**31 - 1, out_dtype=np.int64)
    ref = [_frac_round_half_even(Fraction(float(v)) / Fraction(1, 4)) for v in x]
    np.testing.assert_array_equal(got, ref)
    assert quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32), 1.0, 0, -128, 127).tolist() == [
        0, 2, 2, 0, -2, -2,
    ]
    q = quantize(np.array([-1.0, 300.0], np.float32), 1.0, 10, 0, 255)
    assert q.dtype == np.uint8 and q.tolist() == [9, 255]


def test_dequantize():
    q = np.array([0, 128, 255], np.uint8)
    d = dequantize(q, 0.5, 128)
    assert d.dtype == np.float32 and d.tolist() == [-64.0, 0.0, 63.5]
    q = np.arange(6, dtype=np.int8).reshape(2, 3)
    d = dequantize(q, np.array([1.0, 2.0, 4.0], np.float32), np.array([0, 1, 2]), axis=1)
    assert d.tolist() == [[0, 0, 0], [3, 6, 12]]


@pytest.fixture(scope="module")
def tvm_qdq():
    tvm = pytest.importorskip("tvm")
    from tvm import relax

    target = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
    cache = {}

    def build(shape, scale, zp, zp_dtype, out_dtype, axis=-1, op="quantize", in_dtype="float32"):
        key = (shape, np.asarray(scale).tobytes(), np.asarray(zp).tobytes(), zp_dtype, out_dtype, axis, op)
        if key not in cache:
            bb = relax.BlockBuilder()
            x = relax.Var("x", relax.TensorType(shape, in_dtype))
            with bb.function("main", [x]):
                with bb.dataflow():
                    s = relax.const(np.asarray(scale, np.float32))
                    z = relax.const(np.asarray(zp, zp_dtype))
                    f = relax.op.quantize if op == "quantize" else relax.op.dequantize
                    y = bb.emit(f(x, s, z, axis=axis, out_dtype=out_dtype))
                    o = bb.emit_output(y)
                bb.emit_func_output(o)
            ex = tvm.compile(bb.get(), target=target)
            vm = relax.VirtualMachine(ex, tvm.cpu())
            cache[key] = vm["main"]
        fn = cache[key]
        return lambda arr: fn(tvm.runtime.tensor(np.ascontiguousarray(arr))).numpy()

    return build


@pytest.mark.llvm
def test_quantize_ties_match_tvm(tvm_qdq):
    """TVM relax.op.quantize rounds half to even; so does the reference."""
    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5], np.float32)
    # int8 out, zp 0, scale 1
    tv = tvm_qdq((8,), 1.0, 0, "int8", "int8")(ties)
    assert tv.tolist() == [0, 2, 2, 0, -2, -2, 4, -4]  # half to even, not away
    np.testing.assert_array_equal(quantize(ties, 1.0, 0, -128, 127), tv)
    # uint8 out, zp 10, scale 0.25 (exact ties in float32)
    x = ties * np.float32(0.25)
    tv = tvm_qdq((8,), 0.25, 10, "int8", "uint8")(x)
    assert tv.tolist() == [10, 12, 12, 10, 8, 8, 14, 6]
    np.testing.assert_array_equal(quantize(x, 0.25, 10, 0, 255), tv)


@pytest.mark.llvm
@pytest.mark.parametrize("scale", [0.1, 0.0372, 1.0 / 3.0, 0.7])
@pytest.mark.parametrize("zp,out_dtype", [(3, "int8"), (128, "uint8")])
def test_quantize_random_near_ties_match_tvm(tvm_qdq, scale, zp, out_dtype):
    rng = np.random.default_rng(31)
    s32 = np.float32(scale)
    k = rng.integers(-200, 200, 20000)
    xs = ((k + 0.5) * np.float64(s32)).astype(np.float32)  # near/at ties in f32 division
    xs = np.concatenate([
        xs,
        np.nextafter(xs, np.float32(np.inf)),
        np.nextafter(xs, np.float32(-np.inf)),
        rng.normal(0, 300 * scale, 4000).astype(np.float32),
    ])
    zp_dtype = "int32"
    tv = tvm_qdq(xs.shape, float(s32), zp, zp_dtype, out_dtype)(xs)
    info = np.iinfo(out_dtype)
    ref = quantize(xs, s32, zp, info.min, info.max)
    assert ref.dtype == np.dtype(out_dtype)
    np.testing.assert_array_equal(ref, tv)
    # sanity: float64 division would NOT match (shows the f32 division matters)
    with np.errstate(all="ignore"):
        r64 = np.clip(np.rint(xs.astype(np.float64) / np.float64(s32)) + zp, info.min, info.max)
    assert (r64 != tv).any()


@pytest.mark.llvm
def test_quantize_per_channel_matches_tvm(tvm_qdq):
    rng = np.random.default_rng(37)
    scale = np.array([0.1, 0.02, 0.5, 0.0371], np.float32)
    zp = np.array([0, 3, -2, 7], np.int32)
    x = rng.normal(0, 2, (3, 4, 5)).astype(np.float32)
    x[0, :, 0] = (np.array([0.5, 1.5, -2.5, 3.5]) * scale.astype(np.float64)).astype(np.float32)
    tv = tvm_qdq(x.shape, scale, zp, "int32", "int8", axis=1)(x)
    np.testing.assert_array_equal(quantize(x, scale, zp, -128, 127, axis=1), tv)


@pytest.mark.llvm
def test_dequantize_matches_tvm(tvm_qdq):
    q = np.arange(-128, 128, dtype=np.int8)
    tv = tvm_qdq(q.shape, 0.0371, 5, "int32", "float32", op="dequantize", in_dtype="int8")(q)
    np.testing.assert_array_equal(dequantize(q, np.float32(0.0371), 5), tv)
