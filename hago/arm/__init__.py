"""ARM (Raspberry Pi) support: int8 NEON/SDOT kernels and running aarch64 builds under qemu.

- :mod:`hago.arm.schedule`: ``apply_arm_schedules(mod, spec)``, the tensorized
  int8 ``matmul``/``conv2d`` kernels applied before ``tvm.compile`` for ARM specs;
- :mod:`hago.arm.intrin`: the two 4x4 dot-product tensor intrinsics;
- :mod:`hago.arm.qemu`: ``run_under_qemu(lib, inputs)`` through ``tools/run_vm.cc``.

Submodules are imported explicitly so that the qemu runner does not pull in TVM.
"""
