"""TIR lowering that keeps a kernel's small scratch buffers on the stack.

TVM 0.27's ``LowerTVMBuiltin`` leaves an allocation on the stack only when its
scope is ``"global"`` and it is under 1 KiB (``kMaxStackAlloca``). Every other
one becomes a ``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace`` pair:
a VNNI kernel's register tile (24 x 16 int32 accumulators, 1.5 KiB) and the
``"local"`` temporaries of a tensor intrinsic (4 to 64 bytes each). Inside a
parallel loop the pair runs once per iteration. The 16 -> 96 1x1 conv of
EfficientNet-Lite0 made ten allocator calls per tile of 8 x 48 outputs, which
was 57% of its time (0.80 -> 0.35 ms); the whole network ran 1.41x faster
without them, bit for bit the same.

``PIPELINE`` is TVM's default ``s_tir`` pipeline with one pass before
``LowerTVMBuiltin``: every constant-size allocation of at most ``STACK_LIMIT``
bytes is marked ``disable_lower_builtin``. LLVM's code generator then emits an
``alloca`` at function entry, and LLVM promotes it to registers where it can.
Importing this module registers the pipeline (MetaSchedule's builder workers
import it too, so tuning times what the final build runs).
"""

from __future__ import annotations

import math

import tvm
import tvm_ffi
from tvm import tirx

PIPELINE = "hago"
#: the largest allocation kept on the stack; worker threads have megabytes of stack
STACK_LIMIT = 16 * 1024
_DISABLE = "disable_lower_builtin"  # tvm::tirx::transform::kDisableLowerTVMBuiltin


def allocation_bytes(buffer) -> int | None:
    """Bytes of a constant-shape buffer, None when a dimension is symbolic."""
    try:
        count = math.prod(int(s) for s in buffer.shape)
    except (TypeError, ValueError):
        return None
    dtype = tvm.runtime.DataType(str(buffer.dtype))
    return count * dtype.bits * dtype.lanes // 8


def _onto_stack(node: tirx.AllocBuffer) -> tirx.AllocBuffer:
    size = allocation_bytes(node.buffer)
    if size is None or size > STACK_LIMIT or _DISABLE in node.annotations:
        return node
    annotations = dict(node.annotations)
    annotations[_DISABLE] = tirx.IntImm("int32", 1)
    return tirx.AllocBuffer(node.buffer, annotations=annotations)


@tirx.transform.prim_func_pass(opt_level=0, name="hago.StackSmallAllocations")
def stack_small_allocations(func, _mod, _ctx):
    """Mark small constant-size allocations to stay on the stack (see the module docstring)."""
    return func.with_body(tvm_ffi.structural_map(func.body, (tirx.AllocBuffer, _onto_stack)))


def _pipeline():
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    lower, finalize_host, finalize_device = default_s_tir_pipeline()

    def finalize_host_on_stack():  # finalize_host starts with LowerTVMBuiltin
        return tvm.transform.Sequential([stack_small_allocations, finalize_host()])

    return lower, finalize_host_on_stack, finalize_device


tvm.tirx.compilation_pipeline.register_tir_pipeline(PIPELINE, _pipeline)
