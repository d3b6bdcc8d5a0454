"""The AMX implicit-GEMM conv micro-kernels (bf16 and int8) as LLVM IR text (``amx_ir`` says how it is linked).

One call computes ``mt x nt`` C tiles (``mt, nt <= 2``): ``mt`` tiles of
``rows`` output pixels (A rows) by ``nt`` blocks of 16 output channels,
summed over every kernel tap and input-channel block of the conv, with
``kb`` input channels per K step (``e`` bytes each: 2 for bf16, 1 for uint8;
``v`` K values per B row group: 2 for bf16, 4 for int8)::

    for ic in 0..nic: for kh in 0..nkh: for kw in 0..nkw:     # one K step each
        A tile r = rows x e*kb bytes at a_r + ic*icstride + kh*khstride + kw*e*kb, row stride lda
        B tile c = kb/v x 64 bytes at b + c*bnext + ((ic*nkh + kh)*nkw + kw) * kb/v*64
        C(r, c) += A_r x B_c                                    # tdpbf16ps / tdpbusd

The activation is ``[N, C/kb, Hp, Wp, kb]`` (spatially padded), so one
input pixel's ``kb`` channels are one A row, the tap ``(kh, kw)`` moves the
tile by ``kh`` padded rows and ``kw`` pixels, and the conv stride is the A
tile's row stride (``lda = stride_w * e*kb``). ``e*kb = 64`` fills the
64-byte tile row (32 bf16, 64 uint8); 16 channels read hago's ``NCHW16c``
activations as they are (no packing pass) at a half (bf16) or a quarter
(int8) of the work per instruction. The weight is packed so the K steps of
a 16-channel output block follow one another in the loop's order
(``conv.pack_conv_weight``).

Tile numbers (one configuration, ``conv_config_fn(rows, kb)``, serves all
four variants; a smaller one uses a subset): A ``tmm0, tmm1``, B ``tmm2,
tmm3``, C ``(r, c)`` in ``tmm4 + 2*r + c``. The C tiles start at zero or,
with ``load_c``, from a row repeated down the tile (row stride 0: the bias,
``cinit + 64*c`` for column block ``c``), and are stored at ``c_r +
c*cnext`` with row stride ``ldc``.
"""

from __future__ import annotations

from . import amx_ir

#: dtype -> (bytes per A element, K values per B row group)
ELEMENT = {"bf16": (2, 2), "int8": (1, 4)}
#: dtype -> input channels per K step of a full tile row (64 bytes)
K_CHANNELS = {"bf16": 32, "int8": 64}
#: dtype -> input channels per K step the kernels take (fewer: narrower A rows, fewer B rows)
K_BLOCKS = {"bf16": (16, 32), "int8": (16, 32, 64)}


def pixel_bytes(kb: int, dtype: str = "bf16") -> int:
    """Bytes of one input pixel's ``kb`` channels: one A row, and the A step of one kernel column."""
    return ELEMENT[dtype][0] * kb


def b_step_bytes(kb: int, dtype: str = "bf16") -> int:
    """Bytes of one K step of a 16-channel weight block: ``kb / v`` B rows (channel groups) of 64 bytes."""
    return kb // ELEMENT[dtype][1] * amx_ir.TILE_BYTES


def conv_kernel_name(mt: int, nt: int, load_c: bool, kb: int, dtype: str = "bf16") -> str:
    """Symbol of the ``mt x nt`` conv micro-kernel with ``kb``-channel K steps (``load_c``: C starts from ``cinit``)."""
    return f"hago_amx_conv_{dtype}_k{kb}_{mt}x{nt}{'_c' if load_c else ''}"


def conv_config_fn(rows: int, kb: int, dtype: str = "bf16") -> str:
    return f"hago_amx_conv_config_{dtype}_r{rows}_k{kb}"


def conv_tile_config(rows: int, kb: int, dtype: str = "bf16") -> bytes:
    """``ldtilecfg`` operand: A ``rows`` x ``e*kb`` bytes, B ``kb/v`` x 64, C ``rows`` x 64 (all 8 tiles)."""
    if dtype not in ELEMENT or kb not in K_BLOCKS[dtype] or not 1 <= rows <= 16:
        raise ValueError(f"AMX {dtype} conv tiles: {rows} rows, K step {kb}: need rows in 1..16, "
                         f"K step in {K_BLOCKS.get(dtype)}")
    a, brows = pixel_bytes(kb, dtype), kb // ELEMENT[dtype][1]
    cfg = bytearray(64)
    cfg[0] = 1  # palette 1
    shapes = {0: (rows, a), 1: (rows, a), 2: (brows, 64), 3: (brows, 64)}
    shapes |= {t: (rows, 64) for t in range(4, 8)}
    for t, (n, colsb) in shapes.items():
        cfg[16 + 2 * t: 18 + 2 * t] = colsb.to_bytes(2, "little")
        cfg[48 + t] = n
    return bytes(cfg)


def _config_ir(rows: int, kb: int, dtype: str) -> str:
    name = conv_config_fn(rows, kb, dtype)
    data = "".join(f"\\{b:02X}" for b in conv_tile_config(rows, kb, dtype))
    return f"""
@{name}.data = private unnamed_addr constant [64 x i8] c"{data}", align 64
define void @{name}() {{
  call void @llvm.x86.ldtilecfg(ptr @{name}.data)
  ret void
}}
"""


def _c_tile(r: int, c: int) -> int:
    return 4 + 2 * r + c


def conv_kernel_ir(mt: int, nt: int, load_c: bool, kb: int, dtype: str = "bf16") -> str:
    """IR of one micro-kernel; arguments as in the module docstring (``a1``/``c1`` unused when ``mt == 1``)."""
    if not (1 <= mt <= 2 and 1 <= nt <= 2):
        raise ValueError(f"AMX conv micro-kernel {mt}x{nt}: mt and nt must be 1 or 2")
    rs, cs = range(mt), range(nt)
    instr = amx_ir.OPS[dtype][0]
    lines = [f"define void @{conv_kernel_name(mt, nt, load_c, kb, dtype)}(ptr %a0, ptr %a1, i64 %lda, ptr %b, i64 %bnext, "
             "ptr %cinit, ptr %c0, ptr %c1, i64 %cnext, i64 %ldc, i64 %nic, i64 %nkh, i64 %nkw, "
             "i64 %icstride, i64 %khstride) {", "entry:"]
    for c in cs:
        lines += [f"  %boff{c} = mul i64 %bnext, {c}", f"  %b{c} = getelementptr i8, ptr %b, i64 %boff{c}"]
    for r in rs:
        for c in cs:
            if load_c:
                lines += [f"  %ci{r}{c} = getelementptr i8, ptr %cinit, i64 {64 * c}",
                          f"  call void @llvm.x86.tileloadd64(i8 {_c_tile(r, c)}, ptr %ci{r}{c}, i64 0)"]
            else:
                lines.append(f"  call void @llvm.x86.tilezero(i8 {_c_tile(r, c)})")
    lines += [
        "  br label %ic.loop",
        "ic.loop:",
        "  %ic = phi i64 [ 0, %entry ], [ %ic.next, %kh.end ]",
        "  %aic = mul i64 %ic, %icstride",
        "  %bic = mul i64 %ic, %nkh",
        "  br label %kh.loop",
        "kh.loop:",
        "  %kh = phi i64 [ 0, %ic.loop ], [ %kh.next, %kw.end ]",
        "  %akh0 = mul i64 %kh, %khstride",
        "  %akh = add i64 %aic, %akh0",
        "  %bkh0 = add i64 %bic, %kh",
        "  %bkh = mul i64 %bkh0, %nkw",
        "  br label %kw.loop",
        "kw.loop:",
        "  %kw = phi i64 [ 0, %kh.loop ], [ %kw.next, %kw.loop ]",
        f"  %akw = mul i64 %kw, {pixel_bytes(kb, dtype)}",
        "  %aoff = add i64 %akh, %akw",
        "  %bstep = add i64 %bkh, %kw",
        f"  %boff = mul i64 %bstep, {b_step_bytes(kb, dtype)}",
    ]
    for r in rs:
        lines += [f"  %pa{r} = getelementptr i8, ptr %a{r}, i64 %aoff",
                  f"  call void @llvm.x86.tileloadd64(i8 {r}, ptr %pa{r}, i64 %lda)"]
    for c in cs:
        lines += [f"  %pb{c} = getelementptr i8, ptr %b{c}, i64 %boff",
                  f"  call void @llvm.x86.tileloadd64(i8 {2 + c}, ptr %pb{c}, i64 {amx_ir.TILE_BYTES})"]
    for r in rs:
        for c in cs:
            lines.append(f"  call void @llvm.x86.{instr}(i8 {_c_tile(r, c)}, i8 {r}, i8 {2 + c})")
    lines += [
        "  %kw.next = add i64 %kw, 1",
        "  %kw.more = icmp ult i64 %kw.next, %nkw",
        "  br i1 %kw.more, label %kw.loop, label %kw.end",
        "kw.end:",
        "  %kh.next = add i64 %kh, 1",
        "  %kh.more = icmp ult i64 %kh.next, %nkh",
        "  br i1 %kh.more, label %kh.loop, label %kh.end",
        "kh.end:",
        "  %ic.next = add i64 %ic, 1",
        "  %ic.more = icmp ult i64 %ic.next, %nic",
        "  br i1 %ic.more, label %ic.loop, label %exit",
        "exit:",
    ]
    for r in rs:
        for c in cs:
            lines += [f"  %co{r}{c} = mul i64 %cnext, {c}",
                      f"  %pc{r}{c} = getelementptr i8, ptr %c{r}, i64 %co{r}{c}",
                      f"  call void @llvm.x86.tilestored64(i8 {_c_tile(r, c)}, ptr %pc{r}{c}, i64 %ldc)"]
    lines += ["  ret void", "}"]
    return "\n" + "\n".join(lines) + "\n"


def conv_ir(rows: int, kb: int, variants, load_c: bool, dtype: str = "bf16") -> str:
    """The IR a conv kernel imports: permission and release (``amx_ir``), its tile configuration, micro-kernels.

    ``variants``: the ``(mt, nt)`` micro-kernels it calls.
    """
    base = amx_ir.micro_kernel_ir(dtype, 1, 1, 1)  # the common part (+ a dense kernel and config, unused)
    return base + _config_ir(rows, kb, dtype) + "".join(
        conv_kernel_ir(mt, nt, load_c, kb, dtype) for mt, nt in sorted(set(variants)))
