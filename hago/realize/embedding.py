"""4-bit row-wise embedding lookups: ``take`` on a table stored as :mod:`hago.embedding4` rows.

The realized program holds the packed table (``uint8 [rows, ceil(dim/2)]``,
two codes per byte) and ``float16 [rows, 2]`` (scale, bias per row) instead
of the float32 table, and one TE gather reads only the rows it is asked for:
``out[i, j] = scale[id_i] * code(id_i, j) + bias[id_i]``. The table is never
expanded in memory. Row ids follow the take's mode (``clip`` and ``fast``
clamp to the table, ``wrap`` wraps), so in-range ids give what the float
take of the dequantized table gives, bit for bit: ``scale * code`` is exact
in float32, so a fused multiply-add rounds once, as numpy does.

The simulated twin (:meth:`RowwiseTake.simulated_call`) is the original take
on the dequantized float32 table.
"""

from __future__ import annotations

from tvm import relax

from hago import embedding4
from hago.graph import embedding_table

from .quant import const
from .registry import OpHandler


def gather_rowwise4(packed, scale_bias, ids, mode: str = "clip"):
    """TE: ``ids.shape + [dim]`` float32 rows of the packed table (``dim = 2 * packed.shape[1]``; the caller
    slices an odd width)."""
    from tvm import te, tirx

    rows, half = int(packed.shape[0]), int(packed.shape[1])

    dt = ids.dtype

    def row_of(i):
        k = ids[tuple(i)]
        if mode == "wrap":
            return tirx.floormod(k, tirx.const(rows, dt))
        return tirx.max(tirx.min(k, tirx.const(rows - 1, dt)), tirx.const(0, dt))

    def value(*i):
        k, j = row_of(i[:-1]), i[-1]
        byte = packed[k, j // 2]
        code = (byte >> ((j % 2) * 4).astype("uint8")) & tirx.const(0xF, "uint8")
        return (scale_bias[k, 0].astype("float32") * code.astype("float32")
                + scale_bias[k, 1].astype("float32"))

    return te.compute([*ids.shape, 2 * half], value, name="hago_take_rowwise4")


def emit_take(bb: relax.BlockBuilder, q: embedding4.Rowwise4, ids: relax.Expr, mode: str) -> relax.Expr:
    """The float32 rows ``ids`` of ``q``, looked up in the packed table (an odd ``dim`` sliced back)."""
    out = bb.emit_te(gather_rowwise4, const(q.packed, "uint8"), const(q.scale_bias, "float16"), ids, mode,
                     primfunc_name_hint="hago_take_rowwise4")
    if q.dim % 2:
        nd = len(bb.normalize(out).ty.shape)
        out = bb.emit(relax.op.strided_slice(out, axes=[nd - 1], begin=[0], end=[q.dim]))
    return out


class RowwiseTake(OpHandler):
    """An embedding lookup whose table annotate stores 4-bit row-wise (``AnnotateConfig.embedding_bits``)."""

    kinds = ("take",)

    def realize(self, r, node, choice) -> None:
        q = embedding4.quantize_table(embedding_table(node.call))
        ids = r.subst(node.call.args[1])
        r.fval[node.name] = emit_take(r.bb, q, ids, str(node.call.attrs.mode))

    def simulated_call(self, node, call, strategy) -> relax.Call:
        table = embedding4.dequantize(embedding4.quantize_table(embedding_table(node.call)))
        return relax.Call(call.op, [relax.const(table, "float32"), call.args[1]], call.attrs, call.ty_args)
