"""The x86 backend: VNNI and depthwise kernels, the blocked NCHW16c layout, their default schedules.

- :mod:`.plan`: which integer layer gets a hand-scheduled kernel, and where
  activations stay blocked (what realize reads);
- :mod:`.kernels`: the emitters (:mod:`.vnni`, :mod:`.vnni_int4` and
  :mod:`.vnni_conv_int4` with the packed 4-bit weights of :mod:`.int4`, :mod:`.depthwise`,
  :mod:`.depthwise_blocked`), the requantize epilogue (:mod:`.epilogue`) and
  the intrinsics (:mod:`.vnni_intrin`);
- :mod:`.schedules`: the registry of the kernels' default schedules and
  ``schedule_vnni``, used by the build and by ``hago.tune``;
- :mod:`.bf16` (``vdpbf16ps`` dense and conv) and :mod:`.bf16_blocked`
  (bf16 convs lowered at fusion time, in their neighbours' blocked layout,
  with bias, residual, relu/relu6 and bf16 cast in the write-back).

Any x86 LLVM CPU: without ``avx512vnni`` (AVX2 specs) only the depthwise
kernel is scheduled, the VNNI ones are never planned (their descriptors name
no VNNI layout). Importing this package imports no TVM.
"""

from __future__ import annotations

import platform

from ..cpu import CPUBackend

#: weight layouts (spec descriptor ``weight_layout``) served by the VNNI kernels
VNNI_WEIGHT_LAYOUTS = ("OIHW4i16o4i", "NK16n4k")
_X86 = ("x86_64", "amd64", "i386", "i486", "i586", "i686")
#: ops with a bf16 kernel (depthwise: bf16 storage, fp32 arithmetic; one channel per group has no bf16 pairs)
BF16_OPS = ("conv2d", "dense", "depthwise_conv2d")
BF16_LANES = 16  # fp32 accumulators per vdpbf16ps


class X86Backend(CPUBackend):
    """x86-64 CPUs: the generic CPU build plus hago's VNNI/depthwise kernels and their schedules."""

    #: ops with a bf16 kernel (a spec may declare bf16 for these only)
    bf16_ops: tuple[str, ...] = BF16_OPS

    intrinsics = frozenset({"x86-vnni", "x86-avx2-vpmaddubsw"})
    generic = False
    layouts = frozenset({None, "NCHW", "NCHW16c"})
    weight_layouts = frozenset({None, "OIHW", *VNNI_WEIGHT_LAYOUTS})
    shipped_intrinsics = frozenset({"dot_16x4_vnni"})
    output_channel_block = 16  # NCHW16c convs, NK16n4k dense (VNNI and AMX)

    def claims(self, target) -> bool:
        """An LLVM target for an x86 triple (no triple: this machine's)."""
        triple = str(target.attrs.get("mtriple") or platform.machine())
        return triple.split("-")[0].lower() in _X86

    def vector_lanes(self, target) -> int:
        """16 float lanes with AVX-512, 8 with AVX2 (and 4 on a bare SSE target)."""
        from tvm.target.codegen import target_has_features

        if target_has_features("avx512f", target):
            return 16
        return 8 if target_has_features("avx2", target) else 4

    def vector_registers(self, target) -> int:
        """32 zmm registers with AVX-512, 16 ymm/xmm otherwise."""
        return 32 if self.vector_lanes(target) == 16 else 16

    def board_flags(self, spec):
        """The flags the spec's CPU name and ``mattr`` need (:func:`.host.required_flags`)."""
        from .host import required_flags

        return required_flags(spec.target)

    def host_problem(self, spec):
        """The CPU flags the spec's target CPU needs, against this machine's (:mod:`.host`)."""
        from .host import host_problem

        return host_problem(spec.target)

    def host_specs(self):
        from .host import HOST_PREFERENCE

        return HOST_PREFERENCE

    def bf16_problem(self, op, desc, target):
        """bf16 needs a bf16 kernel for ``op`` and the instructions in the spec's target (named CPU or ``mattr``)."""
        if op not in self.bf16_ops:
            return "inputs", f"backend {self.name} has no bf16 {op} kernel (it has: {', '.join(self.bf16_ops)})"
        return self.bf16_target_problem(target)

    def bf16_target_problem(self, target) -> tuple[str, str] | None:
        """``vdpbf16ps`` needs ``avx512_bf16`` (the CPU table of :mod:`.host`)."""
        from .host import target_problem

        return target_problem(target, "avx512_bf16", "bf16")

    def bf16_node_problem(self, node):
        """The bf16 kernels pad any dense and single-group conv; a grouped conv needs pairs in, 16s out per group;
        a depthwise conv (bf16 storage) needs channels in 4s, a blocked layout."""
        w = node.weight
        if w is None:
            return "bf16 needs a constant weight"
        groups = 1 if node.kind == "dense" else int(node.call.attrs.groups)
        if groups > 1 and groups == w.shape[0] and w.shape[1] == 1:
            if w.shape[0] % 4:
                return f"bf16 depthwise convs need channels in 4s ({w.shape[0]}): runs in fp32"
            return None
        if groups > 1 and (w.shape[1] % 2 or (w.shape[0] // groups) % BF16_LANES):
            return (f"bf16 grouped convs need input channels in pairs and output channels in 16s per group "
                    f"({w.shape[1]} -> {w.shape[0] // groups}): runs in fp32")
        return None

    def prepare_fusion(self, mod, target):
        """The CPU build's float layouts (float dense layers included) with bf16 convs blocked too, then the
        bf16 convs on the ``vdpbf16ps`` kernels, each with its bias, residual add, relu/relu6 and bf16 cast in
        the write-back (:mod:`.bf16_blocked`)."""
        from hago.lower import kernels_standalone

        from ..cpu.bf16_epilogue import fuse_bf16_epilogues
        from ..cpu.float_dense import float_dense_layouts
        from ..cpu.float_layout import block_float_convs
        from ..cpu.row_kernels import fuse_row_kernels
        from .bf16_blocked import blocks_as_stem, lower_bf16_convs, x86_bf16_conv

        lanes = self.vector_lanes(target)
        blocked = block_float_convs(float_dense_layouts(mod, lanes), lanes, bf16=True, bf16_stem=blocks_as_stem)
        lowered = lower_bf16_convs(fuse_bf16_epilogues(blocked, x86_bf16_conv, bias_alone=True, residual=True,
                                                          two_outputs=True))
        # the kernels made here stay standalone, as realize's are: scheduled after fusion (schedule_fused)
        return fuse_row_kernels(kernels_standalone(lowered, self), lanes)

    def schedule_fused(self, sch, target) -> bool:
        """A kernel made at fusion time (:meth:`prepare_fusion`) gets its default schedule where the target runs
        its instructions; a fused blocked float conv the CPU backend's."""
        from .schedules import schedule_kernels_for

        return schedule_kernels_for(sch, target) or super().schedule_fused(sch, target)

    def plan(self, graph, strategy):
        from .plan import X86Plan

        return X86Plan(graph, strategy)

    def schedule(self, mod, target):
        from .schedules import schedule_vnni

        return schedule_vnni(mod, target)

    def is_kernel(self, func) -> bool:
        from .schedules import is_kernel

        return is_kernel(func)

    def schedule_kernels(self, sch) -> bool:
        from .schedules import schedule_kernels

        return schedule_kernels(sch)

    def register_intrinsics(self, target) -> None:
        from .schedules import register_intrinsics

        register_intrinsics()

    def fix_shipped_intrinsics(self, target) -> None:
        """MetaSchedule's VNNI rule looks up TVM's ``dot_16x4_vnni``, which LLVM 22 rejects: re-register it fixed."""
        from .schedules import has_vnni
        from .vnni_intrin import fix_shipped_vnni_intrin

        if has_vnni(target):
            fix_shipped_vnni_intrin()
