"""Row-wise 4-bit embedding tables (hago.embedding4) and their realized lookup (hago.realize.embedding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from hago import embedding4 as e4

# ---- a loop-based reference of the greedy search, written from the description -----------------------


def _ref_params(lo, hi):
    """fp16 bias, then fp16 scale = (hi - bias) / 15 (1 for an empty range or a zero fp16 scale)."""
    bias = np.float32(np.float16(np.float32(lo)))
    span = np.float32(np.float32(hi) - bias)
    scale = np.float32(1) if span == 0 else np.float32(span / np.float32(15))
    scale = np.float32(np.float16(scale))
    if scale == 0:
        scale = np.float32(1)
    return scale, bias


def _ref_row(x, lo, hi):
    """The stored row (float32) and its sum of squared errors, one element at a time."""
    scale, bias = _ref_params(lo, hi)
    inv = np.float32(1) / scale
    out = np.empty_like(x)
    for i, v in enumerate(x):
        q = min(max(np.rint(np.float32((v - bias) * inv)), 0), 15)
        out[i] = np.float32(np.float32(q) * scale) + bias
    err = (out - x).astype(np.float64)
    return out, float(np.sum(err * err))


def _ref_greedy(x):
    xmin, xmax = np.float32(x.min()), np.float32(x.max())
    step = np.float32((xmax - xmin) / np.float32(200))
    thr = np.float32(np.float32(168) * step)
    best_lo, best_hi = xmin, xmax
    cur_lo, cur_hi = xmin, xmax
    cur = best = _ref_row(x, xmin, xmax)[1]
    while np.float32(cur_lo + thr) < cur_hi:
        up_lo, down_hi = np.float32(cur_lo + step), np.float32(cur_hi - step)
        loss_lo, loss_hi = _ref_row(x, up_lo, cur_hi)[1], _ref_row(x, cur_lo, down_hi)[1]
        if cur < loss_lo and cur < loss_hi and cur < best:  # a strict local minimum, better than any so far
            best, best_lo, best_hi = cur, cur_lo, cur_hi
        if loss_lo < loss_hi:
            cur_lo, cur = up_lo, loss_lo
        else:
            cur_hi, cur = down_hi, loss_hi
    return best_lo, best_hi


def _rows(n_random=24, dim=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = [rng.standard_normal(dim) * rng.uniform(0.01, 2) + rng.uniform(-1, 1) for _ in range(n_random)]
    rows.append(np.full(dim, 0.3))  # constant
    rows.append(np.zeros(dim))
    outlier = rng.standard_normal(dim) * 0.05
    outlier[[3, 17]] = [4.0, -2.5]  # two outliers: the greedy range gives them up
    rows.append(outlier)
    one_sided = np.abs(rng.standard_normal(dim)) * 0.1
    one_sided[5] = 3.0
    rows.append(one_sided)
    rows.append(np.where(np.arange(dim) % 2, 1.0, -1.0))  # two values
    rows.append(rng.uniform(-1e-5, 1e-5, dim))  # a range below fp16's resolution
    return np.stack(rows).astype(np.float32)


def test_greedy_ranges_match_the_loop_reference():
    table = _rows()
    lo, hi = e4.greedy_ranges(table)
    for r, x in enumerate(table):
        want = _ref_greedy(x)
        assert (lo[r], hi[r]) == want, (r, (lo[r], hi[r]), want)
    # the outlier rows do give up their outliers: a narrower range than min/max
    assert hi[-4] < table[-4].max() and hi[-3] < table[-3].max()


def test_stored_rows_match_the_loop_reference_and_fp16_storage_is_exact():
    table = _rows(seed=1)
    codes, scale, bias = e4.quantize_rows(table)
    assert np.array_equal(scale, scale.astype(np.float16).astype(np.float32))
    assert np.array_equal(bias, bias.astype(np.float16).astype(np.float32))
    q = e4.pack(codes, scale, bias)
    assert q.packed.shape == (len(table), table.shape[1] // 2) and q.packed.dtype == np.uint8
    deq = e4.dequantize(q)
    assert np.array_equal(deq, codes.astype(np.float32) * scale[:, None] + bias[:, None])
    lo, hi = e4.greedy_ranges(table)
    for r, x in enumerate(table):
        assert np.array_equal(deq[r], _ref_row(x, lo[r], hi[r])[0]), r
    # FBGEMM's fused rows: codes, then fp16 scale, then fp16 bias; the round trip is exact
    fused = e4.fuse(q)
    assert fused.shape == (len(table), table.shape[1] // 2 + 4)
    assert np.array_equal(fused[:, -4:-2].copy().view("<f2")[:, 0], scale.astype(np.float16))
    assert np.array_equal(e4.dequantize(e4.unfuse(fused, q.dim)), deq)
    # low nibble first; an odd width is padded and unpacks back
    assert np.array_equal(q.packed[:, 0], codes[:, 0] | (codes[:, 1] << 4))
    odd = e4.pack(codes[:, :7], scale, bias)
    assert odd.packed.shape[1] == 4 and np.array_equal(e4.unpack(odd)[0], codes[:, :7])


def test_greedy_error_is_never_worse_than_min_max():
    heavy = np.random.default_rng(3).standard_t(3, (200, 40)).astype(np.float32)
    table = np.concatenate([_rows(seed=2), heavy])
    greedy = e4.dequantize(e4.pack(*e4.quantize_rows(table)))
    minmax = e4.dequantize(e4.pack(*e4.quantize_rows(table, greedy=False)))
    err_g = ((greedy - table).astype(np.float64) ** 2).sum(1)
    err_m = ((minmax - table).astype(np.float64) ** 2).sum(1)
    assert (err_g <= err_m).all()
    assert err_g.sum() < 0.9 * err_m.sum()  # heavy-tailed rows: clipping the tails pays


# ---- realized: a model with an embedding, compiled by hago with embedding_bits=4 ------------------------
VOCAB, DIM, SEQ = 60, 16, 5


class EmbedScale(nn.Module):
    """An embedding read by a float op: the realized output is the gathered rows, exactly twice."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)

    def forward(self, ids):
        return self.emb(ids) * 2.0


@pytest.fixture(scope="module")
def quantized():
    from hago.annotate import AnnotateConfig
    from hago.compiler import quantize

    torch.manual_seed(0)
    model = EmbedScale().eval()
    calib = {"ids": np.random.default_rng(0).integers(0, VOCAB, (8, SEQ)).astype(np.int64)}
    q = quantize(model, "x86-avx512-vnni", calib, example_inputs=(torch.zeros(1, SEQ, dtype=torch.int64),),
                 annotate_config=AnnotateConfig(embedding_bits=4))
    return model, q


def _constants(mod):
    import tvm
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e.value.numpy()) if isinstance(
        e, tvm.ir.expr.Constant) and isinstance(e.value, tvm.runtime.Tensor) else None)
    return found


@pytest.mark.llvm
def test_realized_lookup_is_the_dequantized_table_and_stores_it_packed(quantized, run_tvm):
    from hago.weight_bytes import weight_bytes

    model, q = quantized
    take = [n for n in q.graph.nodes if n.kind == "take"]
    assert len(take) == 1 and q.strategy.ops[take[0].name].mode == "integer"
    assert q.strategy.ops[take[0].name].weight_bits == 4
    assert all(q.strategy.edges[e].bits == 0 for e in take[0].inputs)  # row ids are never quantized

    table = model.emb.weight.detach().numpy()
    packed = e4.quantize_table(table)
    consts = _constants(q.realized.mod)
    assert not any(c.dtype == np.float32 and c.size >= VOCAB * DIM for c in consts)  # no float table
    assert sum(c.dtype == np.uint8 and np.array_equal(c, packed.packed) for c in consts) == 1
    assert sum(c.dtype == np.float16 and np.array_equal(c, packed.scale_bias) for c in consts) == 1
    assert weight_bytes(q.realized.mod) == VOCAB * (DIM // 2) + VOCAB * 2 * 2  # 1/8 of fp32 + 4 B per row
    assert weight_bytes(q.realized.mod) < table.nbytes / 5

    ids = np.random.default_rng(4).integers(0, VOCAB, (3, SEQ)).astype(np.int64)
    ids[0, :2] = [0, VOCAB - 1]
    got = run_tvm(q.realized.mod, ids)
    assert np.array_equal(got, 2.0 * e4.dequantize(packed, ids))  # the rows, bit for bit


@pytest.mark.llvm
def test_simulated_twin_holds_the_dequantized_table_and_agrees_with_realize(quantized, run_tvm):
    from hago.simulate import simulate

    model, q = quantized
    sim = simulate(q.graph, q.strategy)
    deq = e4.dequantize(e4.quantize_table(model.emb.weight.detach().numpy()))
    assert any(c.shape == deq.shape and np.array_equal(c, deq) for c in _constants(sim))
    ids = np.random.default_rng(5).integers(0, VOCAB, (4, SEQ)).astype(np.int64)
    real, fake = run_tvm(q.realized.mod, ids), run_tvm(sim, ids)
    assert np.array_equal(real, fake)


@pytest.mark.llvm
@pytest.mark.parametrize("mode", ["clip", "wrap"])
def test_gather_kernel_reads_rows_by_the_take_mode(mode, cpu_target):
    import tvm
    from tvm import relax

    from hago.realize.embedding import emit_take

    table = np.random.default_rng(6).standard_normal((VOCAB, 7)).astype(np.float32)  # odd width
    packed = e4.pack(*e4.quantize_rows(table))
    ids = np.array([[0, VOCAB - 1, 3], [VOCAB, -1, 2 * VOCAB + 1]], np.int32)
    bb = relax.BlockBuilder()
    x = relax.Var("ids", relax.TensorType(ids.shape, "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(emit_take(bb, packed, x, mode))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=cpu_target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(ids)).numpy()
    rows = np.mod(ids, VOCAB) if mode == "wrap" else np.clip(ids, 0, VOCAB - 1)
    assert got.shape == (2, 3, 7) and np.array_equal(got, e4.dequantize(packed, rows))


def test_the_option_needs_the_spec_permission_and_is_off_by_default():
    from hago.hwspec import HardwareSpec

    assert "take" in HardwareSpec.load("x86-avx512-vnni").weights.rowwise_4bit
    assert "take" in HardwareSpec.load("x86-amx").weights.rowwise_4bit
    assert not HardwareSpec.load("x86-avx2").weights.rowwise_4bit
