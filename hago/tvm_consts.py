"""TVM 0.27 constants that hago's passes, kernels and tuner share: one definition each, no TVM import."""

#: relax ``OpPatternKind.kOpaque``: FuseOps leaves a PrimFunc with this ``op_pattern`` a function of its own
#: (hago's hand-scheduled kernels must not be merged into their neighbours).
OPAQUE = 8

#: The PrimFunc attribute that says a schedule was already applied. TVM 0.27 reads and writes only this
#: spelling (MetaSchedule's relax integration, dlight's default-schedule pass; ``libtvm_compiler.so`` holds
#: no other); ``tir.is_scheduled``, the name from before TVM's ``tir`` -> ``tirx`` rename, is read by nothing.
IS_SCHEDULED = "tirx.is_scheduled"

#: The block (or PrimFunc) annotation naming which of hago's hand-written kernels a block is: the default
#: schedules find their blocks by it (x86 VNNI/bf16, the CPU float kernels, AMX).
KERNEL_ATTR = "hago.kernel"
