"""The CUDA backend: ``__dp4a`` kernels for integer conv2d/dense, dlight for the rest, nvcc checks.

- :mod:`.dp4a`: the dp4a GEMM kernels, swapped in after realize (the shared
  swap of :mod:`hago.backends.int8_swap`; sm_61 and newer);
- :mod:`.build`: ``compile_cuda`` (TVM's CUDA pipeline), ``build_cuda`` (swap
  and compile in one call), ``export_cuda`` (``model.so`` plus ``kernels.cu``),
  and ``cuda_source``/``nvcc_check``, which let a machine without a GPU prove
  that a build compiles for the spec's architecture;
- :mod:`.intrin`: the dp4a tensor intrinsic.

Descriptors: realize emits NCHW/OIHW int8 ops and the dp4a kernels read them
as they are (an implicit im2col). The ``NHWC``/``OHWI`` layouts the CUDA
specs state are the tensor-core (IMMA) layouts; hago has no tensor-core
kernel yet, so they are accepted as stated and not realized (the program
stays NCHW: see :data:`STATED_ONLY`). int4 descriptors are realizable as
4-bit values in int8 containers on dp4a, not as s4 IMMA. Importing this
package imports no TVM.
"""

from __future__ import annotations

from pathlib import Path

from ..base import Backend

#: layouts a CUDA spec may state that hago does not realize yet: the tensor-core (IMMA) data and weight
#: layouts. Accepted so the spec can say what the device prefers; the realized program stays NCHW/OIHW.
STATED_ONLY = frozenset({"NHWC", "OHWI"})


class CudaBackend(Backend):
    """NVIDIA GPUs: dp4a kernels swapped in after realize; built with TVM's CUDA pipeline; no tuning here."""

    target_kind = "cuda"
    intrinsics = frozenset({"dp4a_s8s8s32"})
    generic = True  # any CUDA spec: dp4a where the architecture has it (sm_61+), dlight everywhere
    device = "cuda"
    tunable = False  # MetaSchedule measures candidates on a GPU; none here, and the kernels are hand-scheduled
    layouts = frozenset({None, "NCHW"}) | STATED_ONLY
    weight_layouts = frozenset({None, "OIHW"}) | STATED_ONLY

    def board_problem(self, spec, facts):
        """A GPU host without a GPU of the spec's architecture (``arch: sm_75`` needs compute capability 7.5)."""
        arch = str(spec.target.get("arch", ""))
        want = f"{arch[3:-1]}.{arch[-1]}" if arch.startswith("sm_") and arch[3:].isdigit() else None
        gpus = facts.get("gpus") or []
        if not gpus:
            return "has no CUDA GPU"
        if want and not any(g.get("compute_version") == want for g in gpus):
            found = ", ".join(f"{g.get('name')} ({g.get('compute_version')})" for g in gpus)
            return f"has {found}, the spec's builds are {arch} (compute capability {want})"
        return None

    def integer_problem(self, node) -> str | None:
        """Grouped integer convs (1 < groups < channels) and global pools have no kernel here.

        dp4a covers plain convs and dlight schedules depthwise ones, but on an
        int8 grouped conv fused with its epilogue dlight's GeneralReduction
        and Fallback rules both yield loop nests that TVM's
        ``LowerCrossThreadReduction`` rejects; its float form builds. The
        same happens to an integer global average pool (its int32 sum fused
        with the requantize), which stays float here.
        """
        if node.kind == "global_avg_pool2d":
            return f"backend {self.name} has no integer global-pool kernel yet (dlight cannot schedule the int32 sum)"
        if node.kind != "conv2d":
            return None
        groups = int(getattr(node.call.attrs, "groups", 1) or 1)
        return f"backend {self.name} has no integer grouped conv (groups={groups}) kernel yet" if groups > 1 else None

    def rewrite(self, mod, spec, target):
        """The integer conv2d/dense as dp4a kernels (sm_61+); dlight schedules what stays."""
        from .build import swap_dp4a

        return swap_dp4a(mod, target)

    def build(self, mod, target, *, what: str = "target", tune=None):
        """TVM's CUDA pipeline (``tune`` is ignored: tuning needs a GPU to time candidates on)."""
        from .build import compile_cuda

        return compile_cuda(mod, target)

    def export(self, executable, spec, path: Path) -> Path:
        """``model.so`` plus ``kernels.cu``, the source the GPU host's TVM compiles on load."""
        from .build import export_cuda

        export_cuda(executable, path.parent)
        return path
