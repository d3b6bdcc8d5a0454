"""Put a bf16 conv's bias, relu/relu6 and bf16 cast on the AMX kernel's stored tiles instead of a pass of their own.

The rewrite is :mod:`hago.backends.cpu.bf16_epilogue` with the AMX conv as
the kernel (:func:`.conv.amx_bf16_conv`): the bias starts the C tiles (as it
always could), the clamp and the cast run on the stored tile
(``conv_kernel_func(clip=, out_dtype=)``); a residual add joins the
write-back before the clamp, and where the block's fp32 value is read as
well as its bf16 cast the kernel writes both. A chain that is only the bias
add is left to the build (the AMX kernel's bias was not measured against it).
"""

from __future__ import annotations

import tvm

from ..cpu import bf16_epilogue as generic
from .conv import amx_bf16_conv


def chains(func):
    """The generic chain finder with the AMX conv (``.ends()``: end var -> the chain, see
    :meth:`~hago.backends.cpu.bf16_epilogue.Chains.ends`)."""
    return generic.Chains(func, amx_bf16_conv, residual=True, two_outputs=True)


def fuse_bf16_epilogues(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every bf16 conv + bias (+ residual) + clamp (+ bf16 cast) chain the AMX conv takes as one
    kernel call, writing the fp32 value and its bf16 cast both where both are read."""
    return generic.fuse_bf16_epilogues(mod, amx_bf16_conv, residual=True, two_outputs=True)
