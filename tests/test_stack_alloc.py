"""hago's TIR pipeline keeps a kernel's small scratch buffers on the stack (``hago.stack_alloc``).

TVM's default lowering turns a tensorized kernel's register tile and its
intrinsic temporaries into workspace allocator calls inside the parallel
loop; hago's pipeline must remove those calls, leave large buffers with the
allocator, and change no result.
"""

from __future__ import annotations

import numpy as np
import pytest

from hago import stack_alloc
from hago.backends.x86.kernels import emit_conv2d_vnni, schedule_vnni

TARGET = {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2}
ALLOC = "TVMBackendAllocWorkspace"


def _conv_module():
    from tvm import relax

    rng = np.random.default_rng(7)
    x_np = rng.integers(0, 256, (1, 32, 12, 12), dtype=np.uint8)
    w_np = rng.integers(-128, 128, (96, 32, 1, 1), dtype=np.int8)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_np.shape, "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(emit_conv2d_vnni(bb, x, w_np))
        bb.emit_func_output(out)
    return bb.get(), x_np


def _build(mod, pipeline: str):
    import tvm

    target = tvm.target.Target(TARGET)
    ex = tvm.compile(schedule_vnni(mod, target), target=target, tir_pipeline=pipeline)
    return ex, ex.mod.imports[0].inspect_source("asm")


@pytest.mark.llvm
def test_vnni_kernel_allocates_no_workspace_and_computes_the_same():
    import tvm
    from tvm import relax

    mod, x = _conv_module()
    default_ex, default_asm = _build(mod, "default")
    hago_ex, hago_asm = _build(mod, stack_alloc.PIPELINE)
    assert ALLOC in default_asm  # TVM's behaviour this pipeline exists for
    assert ALLOC not in hago_asm
    assert "vpdpbusd" in hago_asm
    run = [relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy() for ex in (default_ex, hago_ex)]
    assert np.array_equal(run[0], run[1])


@pytest.mark.llvm
@pytest.mark.parametrize("over", [False, True])
def test_only_buffers_over_the_limit_stay_with_the_allocator(over):
    import tvm
    from tvm import te

    n = stack_alloc.STACK_LIMIT // 4 + (16 if over else -16)  # float32 elements either side of the limit
    a = te.placeholder((n,), "float32", name="a")
    b = te.compute((n,), lambda i: a[i] * 2.0, name="b")
    c = te.compute((n,), lambda i: b[n - 1 - i] + 1.0, name="c")  # reversed: b cannot be inlined away
    mod = tvm.IRModule({"main": te.create_prim_func([a, c])})
    lib = tvm.compile(mod, target=tvm.target.Target(TARGET), tir_pipeline=stack_alloc.PIPELINE).mod
    assert (ALLOC in lib.inspect_source("asm")) == over
    x = np.arange(n, dtype=np.float32)
    out = tvm.runtime.tensor(np.zeros(n, np.float32))
    lib["main"](tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), x[::-1] * 2 + 1)


def test_allocation_bytes_counts_vector_lanes():
    import tvm

    assert stack_alloc.allocation_bytes(tvm.tirx.decl_buffer((3,), "uint8x64")) == 192
    assert stack_alloc.allocation_bytes(tvm.tirx.decl_buffer((24, 16), "int32")) == 1536
    assert stack_alloc.allocation_bytes(tvm.tirx.decl_buffer((tvm.tirx.Var("n", "int64"),), "int32")) is None
