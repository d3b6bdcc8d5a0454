"""AMX (Sapphire Rapids and later): the tile unit's int8 and bf16 GEMM kernels, and the OS permission they need.

- :mod:`.permission`: ``request_amx`` / ``amx_available`` (Linux hands out
  AMX tile state only on request; without it a tile instruction is SIGILL);
- :mod:`.amx_ir`: the micro-kernels as LLVM IR text (TVM 0.27 has no AMX
  intrinsics), linked into TIR with ``pragma_import_llvm``;
- :mod:`.dense`: hand-written TIR dense kernels around them and the Relax
  emitter ``emit_dense_amx`` (int8 u8 x s8 -> s32, bf16 -> fp32).

Kernels built from here ask Linux for the permission themselves on their
first call, so a deployed library runs in any process; where Linux refuses,
the call raises a one-line ``RuntimeError`` (``dense.PERMISSION_MESSAGE``).
Importing this package imports no TVM.
"""
