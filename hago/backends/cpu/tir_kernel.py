"""What a hand-written TVMScript kernel needs before Relax can ``call_tir`` it (the row kernels use it)."""

from __future__ import annotations


def as_call_tir_kernel(kernel):
    """``kernel`` without its global symbol (the module names it) and with its body inside an (empty) root block,
    as TE-made functions have.

    Relax's ``RewriteDataflowReshape`` asks every one-input ``call_tir``
    callee whether it is a reshape, and that analysis fails on a body that
    is not a block; TVMScript's ``tirx`` parser does not take blocks, so
    the block is added here.
    """
    from tvm.s_tir import SBlock, SBlockRealize

    func = kernel.without_attr("global_symbol")
    root = SBlock([], [], [], "root", func.body)
    return func.with_body(SBlockRealize([], True, root))
