"""The amx backend end to end: the x86-amx spec, AMX int8 dense bit-identical to VNNI, AMX bf16 dense vs its twin."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from hago.annotate import AnnotateConfig
from hago.backends.amx.permission import amx_available
from hago.backends.registry import backend_of, get_backend
from hago.compiler import quantize
from hago.errors import SpecError
from hago.hwspec import HardwareSpec, spec_dir

BATCH = 32  # the denses get 32 rows: AMX (>= AMX_MIN_ROWS); at batch 1 they stay on VNNI

needs_amx = pytest.mark.skipif(amx_available() is not None, reason=str(amx_available()))


@pytest.fixture(scope="module")
def prepared(mnist_model, mnist_test):
    """MNIST imported, prepared and with its calibration data loaded once for every strategy below."""
    from hago.pipeline import prepare_model

    x = mnist_test[0]
    return prepare_model(mnist_model, {"input": x[-256:]}, example_inputs=(torch.from_numpy(x[:2]),))


def test_amx_spec_selects_the_amx_backend_and_needs_amx_bf16():
    spec = HardwareSpec.load("x86-amx")
    assert backend_of(spec).name == "amx" and backend_of(HardwareSpec.load("x86-avx512-bf16")).name == "x86"
    assert spec.precisions() == ["int4", "int8", "bf16", "fp32"]
    src = (spec_dir() / "x86-amx.yaml").read_text().replace("mcpu: sapphirerapids", "mcpu: cooperlake")
    with pytest.raises(SpecError, match="target mcpu 'cooperlake' has no amx_bf16; the amx backend's bf16 needs one of diamondrapids"):
        HardwareSpec.from_yaml(src.replace("name: x86-amx", "name: t"), "t.yaml")


def _run(mod, spec, backend, x):
    import tvm
    from tvm import relax

    from hago.build import target_of

    ex = backend.build(mod, target_of(spec))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy(), ex


@needs_amx
def test_int8_dense_on_amx_is_bit_identical_to_vnni(prepared, mnist_test):
    from hago.pipeline import lower

    spec = HardwareSpec.load("x86-amx")
    x = mnist_test[0]
    q = quantize(prepared, spec, corrections=())
    amx_mod = lower(q.prepared, q.strategy, spec, BATCH)[1].mod
    names = [gv.name_hint for gv, _ in amx_mod.functions_items()]
    assert sum("dense_amx_int8" in n for n in names) == 2, names
    amx_out, ex = _run(amx_mod, spec, get_backend("amx"), x[:BATCH])
    # the VNNI spec with the AMX spec's float requantize: the same integer program, other instructions
    vnni = HardwareSpec.load("x86-avx512-vnni").model_copy(update={"requantize": spec.requantize})
    vnni_mod = lower(q.prepared, q.strategy, vnni, BATCH)[1].mod
    assert not any("amx" in gv.name_hint for gv, _ in vnni_mod.functions_items())
    vnni_out, _ = _run(vnni_mod, vnni, get_backend("x86"), x[:BATCH])
    np.testing.assert_array_equal(amx_out, vnni_out)  # same integers, other instructions
    asm = ex.mod.imports[0].inspect_source("asm") if ex.mod.imports else ex.mod.inspect_source("asm")
    assert re.search(r"\btdpbusd\b", asm) and re.search(r"\bldtilecfg\b", asm)


@needs_amx
def test_bf16_dense_on_amx_tracks_its_simulated_twin(prepared, mnist_test):
    from hago.build import static_batch
    from hago.pipeline import lower
    from hago.simulate import simulate

    spec = HardwareSpec.load("x86-amx")
    x = mnist_test[0]
    # everything before it float: its input is the same floats in both builds, so only summation order differs
    # (a second bf16 layer after it would round those tiny differences to whole bf16 steps)
    cfg = AnnotateConfig(bf16_ops=frozenset({"n9_dense"}),
                         float_ops=frozenset({"n0_conv2d", "n3_conv2d", "n7_dense"}))
    q = quantize(prepared, spec, annotate_config=cfg, corrections=())
    mod = lower(q.prepared, q.strategy, spec, BATCH)[1].mod
    assert sum("dense_amx_bf16" in gv.name_hint for gv, _ in mod.functions_items()) == 1
    real, ex = _run(mod, spec, get_backend("amx"), x[:BATCH])
    sim, _ = _run(static_batch(simulate(q.graph, q.strategy), BATCH), spec, get_backend("amx"), x[:BATCH])
    assert np.abs(real - sim).max() <= 1e-5 * np.abs(sim).max()  # summation order only
    asm = ex.mod.imports[0].inspect_source("asm") if ex.mod.imports else ex.mod.inspect_source("asm")
    assert re.search(r"\btdpbf16ps\b", asm)


@needs_amx
def test_bf16_build_runs_convs_and_denses_on_amx_and_tracks_its_twin(prepared, mnist_test):
    """``all_bf16`` on x86-amx: every conv and dense on the tiles, the 1-channel first conv as a stem with its
    kernel columns folded into K (``hago/backends/amx/stem_bf16.py``)."""
    from hago.build import static_batch
    from hago.pipeline import lower
    from hago.simulate import simulate

    spec = HardwareSpec.load("x86-amx")
    x = mnist_test[0]
    q = quantize(prepared, spec, annotate_config=AnnotateConfig(all_bf16=True), corrections=())
    modes = {n: c.mode for n, c in q.strategy.ops.items() if c.kind in ("conv2d", "dense")}
    assert modes == {"n0_conv2d": "bf16", "n3_conv2d": "bf16", "n7_dense": "bf16", "n9_dense": "bf16"}
    mod = lower(q.prepared, q.strategy, spec, BATCH)[1].mod
    real, ex = _run(mod, spec, get_backend("amx"), x[:BATCH])
    sim, _ = _run(static_batch(simulate(q.graph, q.strategy), BATCH), spec, get_backend("amx"), x[:BATCH])
    asm = ex.mod.imports[0].inspect_source("asm") if ex.mod.imports else ex.mod.inspect_source("asm")
    assert len(re.findall(r"\btdpbf16ps\b", asm)) >= 3 and "vdpbf16ps" not in asm  # stem, conv and dense on tiles
    assert "hago_pad_stem_bf16" in asm and "conv2d_nchwc" not in asm  # the stem's packing pass, no fp32 conv
    # the conv's bf16 output feeds a bf16 dense: its rounding can flip a bf16 step there, so compare by agreement
    assert (real.argmax(1) == sim.argmax(1)).all()
    assert np.abs(real - sim).mean() <= 2e-3 * np.abs(sim).mean()


def _all_bf16_module(net_class, seed: int):
    """``(x, spec, mod)``: 4 random 3x12x12 images, x86-amx, and ``net_class()``'s all-bf16 module at batch 1."""
    from hago.compiler import static_pair

    torch.manual_seed(0)
    x = np.random.default_rng(seed).standard_normal((4, 3, 12, 12)).astype(np.float32)
    spec = HardwareSpec.load("x86-amx")
    q = quantize(net_class().eval(), spec, {"x": x}, example_inputs=(torch.from_numpy(x[:1]),), corrections=(),
                 annotate_config=AnnotateConfig(all_bf16=True))
    return x, spec, static_pair(q, spec, 1)[1]


def _assert_fused_equals_unfused(monkeypatch, epilogue, mod, spec, x: np.ndarray) -> None:
    """``mod`` built for x86-amx with its bf16 conv epilogues on the tiles, then without the rewrite: the two
    outputs bit-identical (and not all zero)."""
    import tvm
    from tvm import relax

    from hago.build import target_of

    outs = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(epilogue, "fuse_bf16_epilogues", lambda m: m)
        ex = get_backend("amx").build(mod, target_of(spec))
        outs[fused] = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert np.abs(outs[True]).max() > 0
    np.testing.assert_array_equal(outs[True], outs[False])


@needs_amx
def test_bf16_conv_epilogue_on_the_tiles_is_bit_identical(monkeypatch):
    """bf16 conv + bias + relu6/relu (+ the next layer's bf16 cast) becomes one AMX kernel call with the clamp and
    the cast on its stored tiles: no separate elementwise pass, outputs bit-identical to the unfused build."""
    from torch import nn

    import hago.backends.amx.bf16_epilogue as epilogue
    from hago.build import target_of

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.c1 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
            self.c2, self.c3 = nn.Conv2d(64, 64, 1), nn.Conv2d(64, 32, 1)

        def forward(self, x):
            y = nn.functional.relu6(self.c1(torch.relu(self.stem(x))))
            return self.c3(torch.relu(self.c2(y))).mean((2, 3))

    x, spec, mod = _all_bf16_module(Net, seed=0)
    chains = epilogue.chains  # the rewrite's own view of the blocked module
    from hago.backends.amx.backend import block_convs

    with target_of(spec):
        ends = chains(block_convs(mod, 16)["main"]).ends()
    kinds = sorted((clip, dtype) for _, _, clip, dtype, *_ in ends.values())
    # c1: relu6 + cast; c2 and the RGB stem (on the tiles as a folded stem, hago/backends/amx/stem_bf16.py): relu + cast
    assert kinds == [((0.0, 6.0), "bfloat16"), ((0.0, np.inf), "bfloat16"), ((0.0, np.inf), "bfloat16")]
    _assert_fused_equals_unfused(monkeypatch, epilogue, mod, spec, x[:1])


@needs_amx
def test_residual_adds_and_block_inputs_go_onto_the_tiles_bit_identical(monkeypatch):
    """A ResNet block's skip add and relu, and an inverted-residual block's input (read in bf16 by its expand
    conv and in fp32 by its residual add), are the AMX conv's write-back: the add joins the kernel, the bf16
    cast is the kernel's second output, no elementwise pass is left, and the outputs are bit-identical to the
    unfused build's."""
    from torch import nn

    import hago.backends.amx.bf16_epilogue as epilogue
    from hago.build import target_of

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.c1, self.c2 = (nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1),
                                           nn.Conv2d(32, 32, 3, padding=1))
            self.expand, self.project = nn.Conv2d(32, 64, 1), nn.Conv2d(64, 32, 1)

        def forward(self, x):
            a = torch.relu(self.stem(x))
            b = torch.relu(self.c2(torch.relu(self.c1(a))) + a)  # a basic block: the skip add, then relu
            c = self.project(nn.functional.relu6(self.expand(b))) + b  # b: expand reads bf16, the add fp32
            return c.mean((2, 3))

    x, spec, mod = _all_bf16_module(Net, seed=1)
    from hago.backends.amx.backend import block_convs

    with target_of(spec):
        ends = epilogue.chains(block_convs(mod, 16)["main"]).ends()
    skips = [chain for chain in ends.values() if chain[4] is not None]
    both = [chain for chain in ends.values() if chain[5] and chain[6]]
    assert len(skips) == 2 and len(both) == 2  # c2's and project's adds; a and b written in fp32 and bf16
    with target_of(spec):
        blocked = block_convs(mod, 16)
        fused_script = epilogue.fuse_bf16_epilogues(blocked).script()
        left = {name: sum(f'R.{name}(' in line for line in fused_script.splitlines())
                for name in ("add", "astype", "maximum", "minimum")}
    assert left == {"add": 0, "astype": 1, "maximum": 0, "minimum": 0}, left  # the input's cast alone is left
    # the padded 3x3 convs pack their input (from fp32, rounding on the way); the 1x1 convs read bf16 in place
    assert len(re.findall(r"call_tir\((?:cls\.)?hago_pack_amx_conv", fused_script)) == 2
    _assert_fused_equals_unfused(monkeypatch, epilogue, mod, spec, x[:1])


@needs_amx
def test_bf16_depthwise_reads_bf16_storage_and_tracks_its_twin():
    """A depthwise conv is a bf16 layer on x86-amx: its input is stored in bf16 (the AMX conv before it casts
    on its tiles), it computes in fp32, and the build equals its simulated twin to fp32 summation order."""
    import tvm
    from torch import nn
    from tvm import relax

    from hago.build import build_for, static_batch
    from hago.compiler import static_pair
    from hago.simulate import simulate

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
            self.dw, self.pw = nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 16, 1)

        def forward(self, x):
            return self.pw(nn.functional.relu6(self.dw(nn.functional.relu6(self.stem(x))))).mean((2, 3))

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    spec = HardwareSpec.load("x86-amx")
    q = quantize(Net().eval(), spec, {"x": x}, example_inputs=(torch.from_numpy(x[:1]),), corrections=(),
                 annotate_config=AnnotateConfig(all_bf16=True))
    dw = next(n for n in q.graph.nodes if n.kind == "depthwise_conv2d")
    assert q.strategy.ops[dw.name].mode == "bf16"
    _, mod = static_pair(q, spec, 1)
    ex = build_for(mod, spec)
    asm = ex.mod.imports[0].inspect_source("asm") if ex.mod.imports else ex.mod.inspect_source("asm")
    assert "conv2d_nchwc_dw" in asm and "hago_conv2d_amx_bf16" in asm
    vm = relax.VirtualMachine(ex, tvm.cpu())
    real = vm["main"](tvm.runtime.tensor(x[:1])).numpy()
    from hago.search.kernelcache import profile_calls

    calls = [sig for sig, _ in profile_calls(vm, [tvm.runtime.tensor(x[:1])], runs=1) if "conv2d_nchwc_dw" in sig]
    assert len(calls) == 1 and calls[0].split("(")[1].startswith("1x2x8x8x16:bfloat16")  # bf16 storage in
    sim_ex = build_for(static_batch(simulate(q.graph, q.strategy), 1), spec)
    sim = relax.VirtualMachine(sim_ex, tvm.cpu())["main"](tvm.runtime.tensor(x[:1])).numpy()
    np.testing.assert_allclose(real, sim, rtol=1e-5, atol=1e-6 * np.abs(sim).max())
