"""The AMX micro-kernels as LLVM IR text, linked into TIR kernels with ``pragma_import_llvm``.

TVM 0.27 has no AMX intrinsics, and the tile instructions do not fit TIR's
value model: a tile register is named by an immediate and holds state across
calls. LLVM has "direct" intrinsics for exactly that (what clang's
``_tile_loadd(0, p, s)`` macros expand to): ``llvm.x86.tileloadd64(i8 tile,
ptr, i64 stride)``, ``llvm.x86.tdpbusd(i8 dst, i8 a, i8 b)``,
``llvm.x86.tdpbf16ps``, ``llvm.x86.tilestored64``, ``llvm.x86.tilezero``,
``llvm.x86.ldtilecfg(ptr)``, ``llvm.x86.tilerelease()``. They take tile
numbers as immediates and have no memory attributes, so LLVM keeps them in
program order; LLVM 22 (TVM's) accepts them as they are (no ``x86_amx``
values, no ``.internal`` forms, no tile register allocation).

So each micro-kernel is one small LLVM IR function (``micro_kernel_ir``)
that the TIR kernel calls with ``T.call_extern``; TVM links the text
(``pragma_import_llvm`` on a loop, as ``hago.backends.x86.bf16_intrin``
does for ``vdpbf16ps``), marks its functions ``alwaysinline`` +
``available_externally`` and inlines them, so the library holds the
instructions and no extra symbol. Every function name carries its variant,
so several kernels of one module can import overlapping text.

Tiles of a micro-kernel with ``mt`` row tiles and ``nt`` column tiles
(``mt, nt <= 2``: 2x2 fills the 8 tile registers):

* ``tmm0 .. tmm{mt-1}``: A, ``rows`` x 64 bytes (``rows`` rows of A, 64
  bytes of K: 64 uint8 or 32 bf16);
* ``tmm2, tmm3``: B, 16 x 64 bytes: 16 rows of K/4 (int8) or K/2 (bf16)
  groups, each the 16 columns' 4 (2) values: the VNNI packing, row stride 64;
* ``tmm4 ..``: C, ``rows`` x 64 bytes (16 int32 / fp32 columns), ``tmm4 +
  nt * r + c`` for row tile ``r``, column tile ``c``. They start at zero
  (``tilezero``) or, with ``load_c``, from memory: a tile load with row
  stride 0 repeats one row, which is how the bf16 kernel starts from its
  bias and needs no epilogue pass.

Tile configuration (``ldtilecfg``, palette 1) costs ~150 cycles here, as
much as a whole 32x32x64 block, so it is not part of the micro-kernel: the
TIR kernel configures once per parallel task (``config_fn``), runs all of
that task's blocks and releases the tiles (``RELEASE_FN``).

The permission (see ``permission``): ``REQUEST_FN`` returns 0 when the
process may use AMX tile state, else the negative errno of
``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``. It makes the
syscall (inline ``syscall``, no libc) until one succeeds and then remembers
it in a process-wide global: after the first call it costs one load.
"""

from __future__ import annotations

IMPORT_PRAGMA = "pragma_import_llvm"
TILE_BYTES = 64  # bytes per tile row (palette 1 maximum)
B_ROWS = 16  # rows of a B tile: 16 x 4 int8 or 16 x 2 bf16 of K per 16 columns
#: dtype -> (tile instruction, K values per 64-byte tile row)
OPS = {"int8": ("tdpbusd", 64), "bf16": ("tdpbf16ps", 32)}
REQUEST_FN = "hago_amx_request"
RELEASE_FN = "hago_amx_release"
_PERM_FLAG = "hago_amx_permission_granted"
_A0, _B0, _C0 = 0, 2, 4  # first A, B, C tile number


def kernel_name(dtype: str, mt: int, nt: int, load_c: bool = False) -> str:
    """Symbol of the ``mt x nt`` micro-kernel for ``dtype`` (``"int8"``: u8 x s8 -> s32, ``"bf16"``: -> f32).

    ``load_c``: the C tiles start from memory (``cinit``) instead of zero.
    """
    return f"hago_amx_{dtype}_{mt}x{nt}{'_c' if load_c else ''}"


def config_fn(mt: int, nt: int, rows: int) -> str:
    """Symbol of the function that loads the tile configuration of an ``mt x nt`` kernel with ``rows``-row A/C tiles."""
    return f"hago_amx_config_{mt}x{nt}_r{rows}"


def tile_config(mt: int, nt: int, rows: int) -> bytes:
    """The 64-byte ``ldtilecfg`` operand: palette 1, A/C tiles ``rows`` x 64 bytes, B tiles 16 x 64, the rest off."""
    _check(mt, nt, rows)
    cfg = bytearray(64)
    cfg[0] = 1  # palette 1; byte 1 start_row 0
    tiles = {_A0 + r: rows for r in range(mt)}
    tiles |= {_B0 + c: B_ROWS for c in range(nt)}
    tiles |= {_C0 + nt * r + c: rows for r in range(mt) for c in range(nt)}
    for t, n in tiles.items():
        cfg[16 + 2 * t: 18 + 2 * t] = TILE_BYTES.to_bytes(2, "little")  # colsb[t]
        cfg[48 + t] = n  # rows[t]
    return bytes(cfg)


def _check(mt: int, nt: int, rows: int) -> None:
    if not (1 <= mt <= 2 and 1 <= nt <= 2 and 1 <= rows <= 16):
        raise ValueError(f"AMX micro-kernel {mt}x{nt} with {rows} rows: need mt, nt in 1..2 and rows in 1..16")


def _config_ir(mt: int, nt: int, rows: int) -> str:
    name = config_fn(mt, nt, rows)
    data = "".join(f"\\{b:02X}" for b in tile_config(mt, nt, rows))
    return f"""
@{name}.data = private unnamed_addr constant [64 x i8] c"{data}", align 64
define void @{name}() {{
  call void @llvm.x86.ldtilecfg(ptr @{name}.data)
  ret void
}}
"""


def _c_tile(base: str, stride: str, r: int, c: int, name: str) -> list[str]:
    """IR for ``%{name} = base + 16*r*stride + 64*c`` (the address of C tile ``(r, c)``)."""
    return [f"  %{name}.r = mul i64 {stride}, {16 * r}", f"  %{name}.q = getelementptr i8, ptr {base}, i64 %{name}.r",
            f"  %{name} = getelementptr i8, ptr %{name}.q, i64 {TILE_BYTES * c}"]


def _kernel_ir(dtype: str, mt: int, nt: int, load_c: bool) -> str:
    """``C[mt*rows, nt*16] = Cinit + A[mt*rows, K] x B`` over ``ksteps`` 64-byte K steps.

    Arguments: ``a`` (A's first row, K step 0), ``lda`` (bytes between A
    rows), ``b`` (the first 16-column block of packed B, K step 0; a K step
    of a block is 16 x 64 contiguous bytes), ``bnext`` (bytes from one
    16-column block of B to the next), ``cinit``, ``ldinit`` (where the C
    tiles start, laid out like C; with ``load_c`` only, else they start at
    zero: a stride of 0 repeats one row, e.g. a bias), ``c``, ``ldc`` (bytes
    between C rows; tile ``(r, c)`` is stored at ``c + 16*r*ldc + 64*c``),
    ``ksteps``.
    """
    instr = OPS[dtype][0]
    lines = [f"define void @{kernel_name(dtype, mt, nt, load_c)}(ptr %a, i64 %lda, ptr %b, i64 %bnext, "
             "ptr %cinit, i64 %ldinit, ptr %c, i64 %ldc, i64 %ksteps) {", "entry:", "  %arow = mul i64 %lda, 16"]
    for r in range(mt):  # row tile r starts 16 rows down
        lines.append(f"  %a{r} = getelementptr i8, ptr %a, i64 {'%arow' if r else 0}")
    for c in range(nt):
        lines.append(f"  %boff{c} = mul i64 %bnext, {c}")
        lines.append(f"  %b{c} = getelementptr i8, ptr %b, i64 %boff{c}")
    for r in range(mt):
        for c in range(nt):
            if load_c:
                lines += _c_tile("%cinit", "%ldinit", r, c, f"ci{r}{c}")
                lines.append(f"  call void @llvm.x86.tileloadd64(i8 {_C0 + nt * r + c}, ptr %ci{r}{c}, i64 %ldinit)")
            else:
                lines.append(f"  call void @llvm.x86.tilezero(i8 {_C0 + nt * r + c})")
    lines += ["  br label %loop", "loop:", "  %s = phi i64 [ 0, %entry ], [ %s.next, %loop ]",
              "  %ka = mul i64 %s, 64", f"  %kb = mul i64 %s, {B_ROWS * TILE_BYTES}"]
    for r in range(mt):
        lines.append(f"  %pa{r} = getelementptr i8, ptr %a{r}, i64 %ka")
        lines.append(f"  call void @llvm.x86.tileloadd64(i8 {_A0 + r}, ptr %pa{r}, i64 %lda)")
    for c in range(nt):
        lines.append(f"  %pb{c} = getelementptr i8, ptr %b{c}, i64 %kb")
        lines.append(f"  call void @llvm.x86.tileloadd64(i8 {_B0 + c}, ptr %pb{c}, i64 {TILE_BYTES})")
    for r in range(mt):
        for c in range(nt):
            lines.append(f"  call void @llvm.x86.{instr}(i8 {_C0 + nt * r + c}, i8 {_A0 + r}, i8 {_B0 + c})")
    lines += ["  %s.next = add i64 %s, 1", "  %more = icmp ult i64 %s.next, %ksteps",
              "  br i1 %more, label %loop, label %exit", "exit:"]
    for r in range(mt):
        for c in range(nt):
            lines += _c_tile("%c", "%ldc", r, c, f"pc{r}{c}")
            lines.append(f"  call void @llvm.x86.tilestored64(i8 {_C0 + nt * r + c}, ptr %pc{r}{c}, i64 %ldc)")
    lines += ["  ret void", "}"]
    return "\n" + "\n".join(lines) + "\n"


_COMMON = f"""
@{_PERM_FLAG} = linkonce_odr hidden global i32 0, align 4
define i32 @{REQUEST_FN}() {{
entry:
  %done = load atomic i32, ptr @{_PERM_FLAG} monotonic, align 4
  %ok = icmp ne i32 %done, 0
  br i1 %ok, label %granted, label %ask
ask:                ; arch_prctl (158) (ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18)
  %rc = call i64 asm sideeffect "syscall", "={{rax}},{{rax}},{{rdi}},{{rsi}},~{{rcx}},~{{r11}},~{{memory}}"(i64 158, i64 4131, i64 18)
  %rc32 = trunc i64 %rc to i32
  %fine = icmp eq i64 %rc, 0
  br i1 %fine, label %remember, label %refused
remember:
  store atomic i32 1, ptr @{_PERM_FLAG} monotonic, align 4
  br label %granted
granted:
  ret i32 0
refused:
  ret i32 %rc32
}}
define void @{RELEASE_FN}() {{
  call void @llvm.x86.tilerelease()
  ret void
}}
declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.tilerelease()
declare void @llvm.x86.tilezero(i8 immarg)
declare void @llvm.x86.tileloadd64(i8 immarg, ptr, i64)
declare void @llvm.x86.tilestored64(i8 immarg, ptr, i64)
declare void @llvm.x86.tdpbusd(i8 immarg, i8 immarg, i8 immarg)
declare void @llvm.x86.tdpbf16ps(i8 immarg, i8 immarg, i8 immarg)
"""


def micro_kernel_ir(dtype: str, mt: int, nt: int, rows: int, load_c: bool = False) -> str:
    """LLVM IR text: the permission request, the tile configuration, the micro-kernel and the release."""
    if dtype not in OPS:
        raise ValueError(f"AMX micro-kernel dtype {dtype!r}: one of {', '.join(OPS)}")
    _check(mt, nt, rows)
    return _COMMON + _config_ir(mt, nt, rows) + _kernel_ir(dtype, mt, nt, load_c)
