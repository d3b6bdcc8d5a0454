"""bf16 as a precision: the spec declares it, annotate picks it per layer, realize and simulate agree.

A bf16 layer rounds its input and weights to bfloat16 (nearest even) and
accumulates in float32; its simulated twin is the float32 op on the same
rounded values, so the two differ only in summation order.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hago.annotate import AnnotateConfig
from hago.compiler import quantize
from hago.errors import SpecError
from hago.hwspec import HardwareSpec
from hago.realize.bf16 import round_to_bf16
from hago.simulate import simulate

BF16_SPEC = "x86-avx512-bf16"


def _has_cpu_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


needs_bf16 = pytest.mark.skipif(not _has_cpu_flag("avx512_bf16"), reason="CPU lacks avx512_bf16")


def test_round_to_bf16_is_nearest_even():
    """Known bit patterns: below, above and exactly at the half step, ties going to the even neighbour."""
    bits = np.array([0x3F807FFF, 0x3F808001, 0x3F808000, 0x3F818000, 0xBF808000, 0x7F800000], np.uint32)
    want = np.array([0x3F800000, 0x3F810000, 0x3F800000, 0x3F820000, 0xBF800000, 0x7F800000], np.uint32)
    got = round_to_bf16(bits.view(np.float32)).view(np.uint32)
    assert [hex(g) for g in got] == [hex(w) for w in want]
    assert np.isnan(round_to_bf16(np.array([np.nan], np.float32)))[0]


def test_specs_declare_bf16_only_where_the_cpu_has_it():
    bf16, vnni = HardwareSpec.load(BF16_SPEC), HardwareSpec.load("x86-avx512-vnni")
    assert bf16.precisions() == ["int4", "int8", "bf16", "fp32"]
    assert bf16.bf16_ops() == ["conv2d", "depthwise_conv2d", "dense"]
    assert bf16.descriptors("conv2d")[0].inputs == ["uint8", "int8"]  # integer descriptors unchanged
    assert vnni.bf16_ops() == [] and "bf16" not in vnni.precisions()  # Cascade Lake has no avx512_bf16
    src = (Path(__file__).resolve().parents[2] / "hwspecs" / f"{BF16_SPEC}.yaml").read_text()
    on_cascadelake = src.replace("mcpu: cooperlake", "mcpu: cascadelake").replace(f"name: {BF16_SPEC}", "name: t")
    with pytest.raises(SpecError, match=r"t\.yaml:\d+: ops\.conv2d\[1\]\.inputs: target mcpu 'cascadelake' has no avx512_bf16; bf16 needs one of cooperlake"):
        HardwareSpec.from_yaml(on_cascadelake, "t.yaml")
    bmm = src.replace("  batch_matmul:\n", "  batch_matmul:\n    - {inputs: [bfloat16, bfloat16], "
                                            "accum: float32, output: float32}\n")
    with pytest.raises(SpecError, match="no bf16 batch_matmul kernel"):
        HardwareSpec.from_yaml(bmm, "t.yaml")
    mixed = src.replace("- {inputs: [bfloat16, bfloat16], accum: float32", "- {inputs: [bfloat16, int8], accum: float32", 1)
    with pytest.raises(SpecError, match="bf16 op takes bfloat16 inputs only"):
        HardwareSpec.from_yaml(mixed, "t.yaml")


@pytest.fixture(scope="module")
def mixed(mnist_model, mnist_test):
    """MNIST with conv 2 and the first dense in bf16, the last dense in fp32, the rest int8."""
    x, _ = mnist_test
    cfg = AnnotateConfig(bf16_ops=frozenset({"n3_conv2d", "n7_dense"}), float_ops=frozenset({"n9_dense"}))
    return quantize(mnist_model, BF16_SPEC, {"input": x[-300:]}, example_inputs=(torch.from_numpy(x[:2]),),
                    annotate_config=cfg, corrections=())


def test_annotate_mixes_int8_bf16_and_fp32(mixed):
    modes = {n: c.mode for n, c in mixed.strategy.ops.items()}
    assert modes["n0_conv2d"] == "integer" and modes["n3_conv2d"] == "bf16" and modes["n7_dense"] == "bf16"
    assert modes["n9_dense"] == "float"
    assert mixed.strategy.ops["n3_conv2d"].descriptor["inputs"] == ["bfloat16", "bfloat16"]
    # a bf16 layer converts its float input itself: the edge into it is not quantized
    assert mixed.strategy.edges["n2_max_pool2d"].bits == 0
    assert modes["n2_max_pool2d"] == "float"  # its only consumer is bf16: no integer pool feeding float


@needs_bf16
def test_mixed_build_agrees_with_its_simulated_twin(mixed, mnist_test):
    import tvm
    from tvm import relax

    from hago.backends.registry import get_backend
    from hago.build import target_of

    spec = HardwareSpec.load(BF16_SPEC)
    target, backend = target_of(spec), get_backend("x86")
    x = mnist_test[0][:200]

    def run(mod):
        vm = relax.VirtualMachine(backend.build(mod, target), tvm.cpu())
        return np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + 1])).numpy() for i in range(len(x))])

    from hago.build import static_batch
    from hago.compiler import static_pair

    fp32_static, realized = static_pair(mixed, spec, 1)  # batch 1: the kernels need static shapes
    ex = backend.build(realized, target)
    asm = ex.mod.imports[0].inspect_source("asm") if ex.mod.imports else ex.mod.inspect_source("asm")
    assert re.search(r"\bvdpbf16ps\b", asm) and re.search(r"\bvpdpbusd\b", asm)  # bf16 and int8 kernels
    real = run(realized)
    sim = run(static_batch(simulate(mixed.graph, mixed.strategy), 1))
    fp32 = run(fp32_static)
    assert (real.argmax(1) == sim.argmax(1)).mean() >= 0.995
    assert np.abs(real - sim).mean() < 0.25 * np.abs(fp32 - sim).mean()  # far closer to its twin than to FP32


def test_bf16_where_the_kernels_cannot_take_a_layer_is_fp32_with_the_reason():
    from hago.annotate import _bf16_choice
    from hago.backends.registry import get_backend

    class Node:  # a grouped conv with 3 input channels per group: no bf16 pairs
        name, kind, weighted = "g", "conv2d", True
        weight = np.zeros((32, 3, 3, 3), np.float32)

        class call:  # noqa: N801
            class attrs:  # noqa: N801
                groups = 2

    choice = _bf16_choice(Node(), HardwareSpec.load(BF16_SPEC), get_backend("x86"))
    assert choice.mode == "float" and "pairs" in choice.reason


def _build_with_twin(q, image: np.ndarray):
    """``(run, twin, calls)`` for the quantized ``q`` on x86 at batch 1: the real build and its simulated twin as
    numpy-in, numpy-out functions, and the kernel calls (signatures, in order) the build makes on ``image``."""
    import tvm
    from tvm import relax

    from hago.backends.registry import get_backend
    from hago.build import static_batch, target_of
    from hago.compiler import static_pair
    from hago.search.kernelcache import profile_calls

    spec = HardwareSpec.load(BF16_SPEC)
    target, backend = target_of(spec), get_backend("x86")
    vms = [relax.VirtualMachine(backend.build(mod, target), tvm.cpu())
           for mod in (static_pair(q, spec, 1)[1], static_batch(simulate(q.graph, q.strategy), 1))]
    calls = [sig for sig, _ in profile_calls(vms[0], [tvm.runtime.tensor(image)], runs=1)]
    run, twin = ((lambda a, vm=vm: vm["main"](tvm.runtime.tensor(a)).numpy()) for vm in vms)
    return run, twin, calls


class _InvertedResidual(torch.nn.Module):
    """An RGB stem, then EfficientNet's block (1x1 expand, relu6, depthwise 3x3, relu6, 1x1 project, residual
    add) on ``channels`` (24: 8-channel blocks; 32: whole 16-channel blocks), then a 3x3 conv that pads."""

    def __init__(self, channels: int = 24):
        from torch import nn

        super().__init__()
        c = channels
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.expand, self.dw = nn.Conv2d(c, 64, 1), nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.project, self.head = nn.Conv2d(64, c, 1), nn.Conv2d(c, 32, 3, padding=1)

    def forward(self, x):
        from torch.nn.functional import relu6

        x = torch.relu(self.stem(x))
        x = x + self.project(relu6(self.dw(relu6(self.expand(x)))))
        return self.head(x)


@needs_bf16
def test_an_all_bf16_inverted_residual_block_stays_blocked_and_matches_its_twin():
    """All bf16, the depthwise conv included (bf16 storage): the build blocks the bf16 convs with their
    neighbours, so the only layout passes are the network's input (one pass: cast, block and pad for the stem)
    and output; every relu/relu6 and the
    residual add run in the write-back of the conv before them (and the bf16 cast for the next conv with
    them, as a second output where the fp32 value has another user); the result matches the simulated twin."""
    torch.manual_seed(0)
    net = _InvertedResidual().eval()
    x = np.random.default_rng(0).normal(size=(8, 3, 28, 28)).astype(np.float32)
    q = quantize(net, BF16_SPEC, x, example_inputs=(torch.from_numpy(x[:1]),),
                 annotate_config=AnnotateConfig(all_bf16=True), corrections=())
    assert {c.mode for n, c in q.strategy.ops.items() if "conv2d" in n} == {"bf16"}
    run, twin, calls = _build_with_twin(q, x[:1])
    names = [sig.split("(")[0] for sig in calls]
    assert sum("layout_transform" in n for n in names) == 1, names  # NCHW8c -> NCHW out
    # the image in: cast, NCHW -> NCHW3c and the stem's padding to NCHW4c are the stem kernel's one packing pass
    assert names[0].startswith("hago_nchw_to_nchwc_bf") and names[1].startswith("hago_conv2d_nchwc_bf"), names
    assert not [n for n in names[1:] if "nchw_to_nchwc" in n or "nchwc_to_nchw" in n], names  # no NCHW route
    assert sum(n.startswith("hago_conv2d_nchwc_bf") for n in names) == 4, names  # bias and activation inside
    assert not [n for n in names if any(a in n for a in ("relu", "maximum", "minimum", "clip", "add"))
                and "conv2d" not in n], names  # the residual add too
    # the stem's output feeds the expand conv (bf16) and the residual add (fp32): the stem writes both
    assert not [n for n in names if n.startswith("cast")], names
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    for i in range(len(x)):
        real, sim = run(x[i:i + 1]), twin(x[i:i + 1])
        np.testing.assert_allclose(real, sim, rtol=0, atol=1e-4 * np.abs(sim).max())
        assert np.abs(real - ref[i:i + 1]).max() < 0.02 * np.abs(ref).max()  # bf16 rounding, not a wrong layout


class _DownsampleBlock(torch.nn.Module):
    """A stem, then a ResNet downsampling block: ``relu(conv2(relu(conv1(x))) + down(x))`` with stride 2 in
    ``conv1`` and the 1x1 ``down``, then a head conv: two convs' chains meet at one add, and the block's input
    is cast to bf16 twice (once per conv reading it)."""

    def __init__(self):
        from torch import nn

        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.Conv2d(64, 64, 3, padding=1)
        self.down, self.head = nn.Conv2d(32, 64, 1, stride=2), nn.Conv2d(64, 16, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.down(x))
        return self.head(x)


@needs_bf16
def test_a_downsampling_block_fuses_every_bias_and_casts_its_input_once():
    """Both convs before the block's add keep their bias in their write-back (one takes the add too), and the
    stem writes the block's input once, in bf16, for both convs that read it: no add or cast kernel of its
    own. Matches the simulated twin."""
    torch.manual_seed(0)
    net = _DownsampleBlock().eval()
    x = np.random.default_rng(1).normal(size=(4, 3, 16, 16)).astype(np.float32)
    q = quantize(net, BF16_SPEC, x, example_inputs=(torch.from_numpy(x[:1]),),
                 annotate_config=AnnotateConfig(all_bf16=True), corrections=())
    run, twin, calls = _build_with_twin(q, x[:1])
    names = [sig.split("(")[0] for sig in calls]
    assert sum(n.startswith("hago_conv2d_nchwc_bf") for n in names) == 5, names
    assert not [n for n in names if n.startswith(("add", "cast"))], names
    stem = next(sig for sig in calls if sig.startswith("hago_conv2d_nchwc_bf"))
    assert stem.endswith("bfloat16)") and stem.count("float32") == 1, stem  # bf16 out only (the bias is fp32)
    for i in range(len(x)):
        real, sim = run(x[i:i + 1]), twin(x[i:i + 1])
        np.testing.assert_allclose(real, sim, rtol=0, atol=1e-4 * np.abs(sim).max())


@needs_bf16
def test_int8_and_bf16_convs_meet_blocked_and_match_their_twin():
    """int8 stem -> bf16 expand -> int8 depthwise -> bf16 project -> int8 head: each pair hands over NCHW16c
    (an int8 layer's layout transform cancelled against the bf16 conv's blocked layout; the depthwise conv runs
    its blocked kernel and gives the bf16 conv its int32 accumulator blocked), so the only layout pass left is
    the network's output."""
    torch.manual_seed(0)
    net = _InvertedResidual(32).eval()  # whole 16-channel blocks for int8 and bf16 alike
    x = np.random.default_rng(0).normal(size=(16, 3, 28, 28)).astype(np.float32)
    cfg = AnnotateConfig(bf16_ops=frozenset({"n2_conv2d", "n6_conv2d"}))
    q = quantize(net, BF16_SPEC, x, example_inputs=(torch.from_numpy(x[:1]),), annotate_config=cfg, corrections=())
    modes = {n: c.mode for n, c in q.strategy.ops.items() if "conv2d" in n}
    assert modes == {"n0_conv2d": "integer", "n2_conv2d": "bf16", "n4_depthwise_conv2d": "integer",
                     "n6_conv2d": "bf16", "n8_conv2d": "integer"}
    run, twin, calls = _build_with_twin(q, x[:1])
    names = [sig.split("(")[0] for sig in calls]
    assert sum("layout_transform" in n or "nchwc_to_nchw" in n for n in names) == 1, names  # 7 in session 13
    assert "hago_conv2d_depthwise_nchwc" in names, names  # the blocked depthwise kernel on a bf16 layer's output
    for i in range(len(x)):
        real, sim = run(x[i:i + 1]), twin(x[i:i + 1])
        assert np.abs(real - sim).max() < 0.01 * np.abs(sim).max()  # int8 requantize rounding, not a wrong layout
