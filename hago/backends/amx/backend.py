"""The AMX backend: Sapphire Rapids-class CPUs, hago's x86 kernels plus the tile unit where it pays.

It is the x86 backend (VNNI convs, depthwise, blocked layouts, float
kernels) with AMX kernels put in where the tile unit beats the vector unit:

* int8 dense/matmul with at least ``plan.AMX_MIN_ROWS`` rows: ``tdpbusd``
  (:mod:`.dense`), the int32 accumulator requantized by realize as for VNNI;
  fewer rows (a batch-1 classifier) stay on VNNI, where the measured time
  is the same (the weights' memory traffic bounds both: 1x512x1000 8.2 us
  AMX, 8.3 us VNNI) and VNNI needs no tile configuration;
* bf16 dense: ``tdpbf16ps`` with the bias in the tiles;
* bf16 conv: implicit GEMM on the tiles (:mod:`.conv`), legalized at build
  time from the blocked layout the float pipeline gives it, so a bf16 conv
  reads the 16-channel blocks its fp32 neighbours write (the conversion to
  bf16 fuses into the producer's epilogue); grouped and dilated convs stay
  fp32 (:meth:`AMXBackend.bf16_node_problem`).

Chosen for specs whose ``intrinsics`` list ``x86-amx``; host builds stay
with the x86 backend (:meth:`claims`). The kernels ask Linux for the AMX
permission themselves (see :mod:`.permission`).
"""

from __future__ import annotations

from ..x86 import X86Backend

def block_convs(mod, lanes: int):
    """Float and bf16 convs in blocked layouts, a narrow bf16 stem as one block of all its channels (the AMX
    stem kernel's layout, :mod:`.stem_bf16`)."""
    from ..cpu.float_layout import block_float_convs
    from .stem_bf16 import blocks_as_stem

    return block_float_convs(mod, lanes, bf16=True, bf16_stem=blocks_as_stem)


class AMXBackend(X86Backend):
    """x86 with AMX tiles (Sapphire Rapids, Emerald Rapids, Granite Rapids)."""

    #: the depthwise conv too: bf16 storage, fp32 arithmetic (``hago.backends.cpu.float_kernels``)
    bf16_ops = ("conv2d", "dense", "depthwise_conv2d")

    intrinsics = frozenset({"x86-amx"})

    def claims(self, target) -> bool:
        """Never for a build that names no backend: host builds stay with the x86 backend."""
        return False

    def bf16_target_problem(self, target):
        """bf16 here runs on the tiles: the target must have ``amx_bf16``."""
        from ..x86.host import target_problem

        return target_problem(target, "amx_bf16", "the amx backend's bf16")

    def bf16_node_problem(self, node):
        """The AMX conv takes single-group, undilated convs with channels in 4s, or a narrow stem whose
        ``C * KW`` fits a K step (:mod:`.stem_bf16`); dense any shape. A depthwise conv (channels in 4s)
        is bf16 too: its input and weights are stored in bf16 and it computes in fp32 (no tile product
        fits it), which halves the bytes of the widest activations of a MobileNet."""
        if node.weight is None:
            return "bf16 needs a constant weight"
        if node.kind != "dense":
            a = node.call.attrs
            w = node.weight.shape
            if int(a.groups) > 1 and int(a.groups) == w[0] and w[1] == 1 and w[0] % 4 == 0:
                return None  # depthwise: bf16 storage, fp32 arithmetic (hago.backends.cpu.float_kernels)
            if int(a.groups) != 1 or any(int(d) != 1 for d in a.dilation):
                return "the AMX bf16 conv takes single-group, undilated convs: runs in fp32"
            from .stem_bf16 import bf16_taps_applicable

            if (w[1] % 4 or w[0] % 4) and not (w[0] % 16 == 0 and bf16_taps_applicable(
                    (1, w[1], 2 * w[2], 2 * w[3]), w, a.strides, a.dilation, a.groups)):
                return (f"the AMX bf16 conv takes channels in 4s ({node.weight.shape[1]} -> {node.weight.shape[0]}): "
                        "runs in fp32")
        return None

    def prepare_fusion(self, mod, target):
        """Float convs blocked as on x86, and bf16 convs too (the AMX conv reads the same 16-channel blocks);
        a bf16 conv's bias, relu/relu6 and bf16 cast then go onto its tiles (:mod:`.bf16_epilogue`);
        attention's softmax as one kernel, as on every CPU."""
        from ..cpu.row_kernels import fuse_row_kernels
        from .bf16_epilogue import fuse_bf16_epilogues

        lanes = self.vector_lanes(target)
        return fuse_row_kernels(fuse_bf16_epilogues(block_convs(mod, lanes)), lanes)

    def legalizations(self, target) -> dict:
        """bf16 convs in blocked layouts onto the AMX conv; everything else as on x86."""
        legal = dict(super().legalizations(target))
        float_conv = legal["relax.nn.conv2d"]

        def conv2d(bb, call):
            if str(call.args[0].ty.dtype) == "bfloat16":
                from .conv import legalize_conv2d_amx_bf16

                out = legalize_conv2d_amx_bf16(bb, call)
                if out is not None:
                    return out
            return float_conv(bb, call)

        legal["relax.nn.conv2d"] = conv2d
        return legal

    def plan(self, graph, strategy):
        from .plan import AMXPlan  # imports TVM: only when a build needs it

        return AMXPlan(graph, strategy)
