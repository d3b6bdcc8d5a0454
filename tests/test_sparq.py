"""SPARQ (hago.sparq): the window selection by hand, the Relax emitter bit for bit, a CNN on the example spec."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest

from hago import sparq
from hago.errors import SpecError
from hago.hwspec import HardwareSpec

# 0b01101101 = 109 (leading one at bit 6), 0b00011011 = 27 (bit 4), 0b11111000 = 248 (rounding overflows)
CODES = np.array([0b01101101, 0b00011011, 0b11111000, 0b00001011, 0, 1, 0b10000000], np.uint8)
BY_HAND = {
    # 5 options: 109 -> window 0x78 (bits 6-3) = 1101, next bit 1 -> 1110; 27 -> 0x1E (bits 4-1) = 1101, next bit 1
    # -> 1110 = 28; 248 -> 0xF0: 1111 + 1 clamps to 1111 = 240; codes below 16 keep every bit
    (5, "round"): [0b01110000, 0b00011100, 0b11110000, 11, 0, 1, 128],
    (5, "raw"): [0b01101000, 0b00011010, 0b11110000, 11, 0, 1, 128],
    # 3 options: 109 -> bits 7-4 (the lowest window that holds bit 6) = 0110, next bit 1 -> 0111; 27 -> bits 5-2
    # = 0110, next bit 1 -> 0111 = 28
    (3, "round"): [0b01110000, 0b00011100, 0b11110000, 11, 0, 1, 128],
    (3, "raw"): [0b01100000, 0b00011000, 0b11110000, 11, 0, 1, 128],
    # 2 options: 27 -> high nibble 0001, next bit (3) 1 -> 0010 = 32
    (2, "round"): [0b01110000, 0b00100000, 0b11110000, 11, 0, 1, 128],
    (2, "raw"): [0b01100000, 0b00010000, 0b11110000, 11, 0, 1, 128],
}


@pytest.mark.parametrize("options,rounding", list(BY_HAND))
def test_bsparq_window_by_hand(options, rounding):
    assert sparq.bsparq(CODES, options, rounding).tolist() == BY_HAND[(options, rounding)]


def test_window_shift_is_the_lowest_window_holding_the_leading_one():
    x = np.array([1 << p for p in range(8)], np.uint8)  # leading one at bit 0..7
    assert sparq.window_shift(x, 5).tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    assert sparq.window_shift(x, 3).tolist() == [0, 0, 0, 0, 2, 2, 4, 4]
    assert sparq.window_shift(x, 2).tolist() == [0, 0, 0, 0, 4, 4, 4, 4]
    every = np.arange(256, dtype=np.uint8)
    for options in (5, 3, 2):  # a trimmed code has at most 4 significant bits, within one offered window
        for rounding in ("round", "raw"):
            y = sparq.bsparq(every, options, rounding).astype(int)
            s = sparq.window_shift(every, options)
            assert ((y >> s) <= 15).all() and ((y & ((1 << s) - 1)) == 0).all()
            assert (np.abs(y - every) < (1 << s)).all()  # less than one step of the window
        rounded, raw = (np.abs(sparq.bsparq(every, options, r).astype(int) - every) for r in ("round", "raw"))
        assert (rounded <= raw).all() and rounded.sum() < raw.sum()


def test_vsparq_zero_partner_keeps_eight_bits():
    # channels (0, 1) and (2, 3) pair; channel 4 has no partner and keeps its 8 bits
    x = np.array([[109, 0, 109, 27, 109],
                  [0, 27, 248, 1, 27]], np.uint8)
    y = sparq.vsparq(x, axis=1, options=5, rounding="raw")
    assert y.tolist() == [[109, 0, 104, 26, 109],
                          [0, 27, 240, 1, 27]]
    # NCHW: pairs along C at each pixel, independently per pixel
    x4 = np.zeros((1, 2, 1, 2), np.uint8)
    x4[0, :, 0, 0] = [109, 27]   # both nonzero: trimmed
    x4[0, :, 0, 1] = [109, 0]    # partner 0: 109 keeps every bit
    y4 = sparq.trim(x4, {"mode": "vsparq", "options": 5, "rounding": "raw"}, axis=1)
    assert y4[0, :, 0, 0].tolist() == [104, 26] and y4[0, :, 0, 1].tolist() == [109, 0]
    with pytest.raises(ValueError, match="unsigned 8-bit"):
        sparq.bsparq(np.array([1], np.int8))


#: what the emitter test compiles: bSPARQ with every option set and rounding, vSPARQ with two (one compile)
EMITTED = [sparq.SparqConfig("bsparq", o, r) for o in (5, 3, 2) for r in ("round", "raw")] + [
    sparq.SparqConfig("vsparq", 5, "round"), sparq.SparqConfig("vsparq", 2, "raw")]


@pytest.mark.llvm
def test_relax_emitter_matches_numpy_bit_for_bit():
    import tvm
    from tvm import relax

    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    conv_in = relax.Var("x", relax.TensorType([n, 5, 3, 4], "uint8"))   # odd C: an unpaired channel
    dense_in = relax.Var("d", relax.TensorType([n, 6], "uint8"))
    with bb.function("main", [conv_in, dense_in]):
        with bb.dataflow():
            # every window set and rounding on both layouts (the window arithmetic is shared by the modes)
            outs = [sparq.emit_trim(bb, v, cfg, axis) for cfg in EMITTED for v, axis in ((conv_in, 1), (dense_in, -1))]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 5, 3, 4), dtype=np.uint8)
    x[rng.random(x.shape) < 0.3] = 0  # zeros, so vSPARQ's pairs take both branches
    d = rng.integers(0, 256, (3, 6), dtype=np.uint8)
    d[rng.random(d.shape) < 0.3] = 0
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(d))
    for i, cfg in enumerate(EMITTED):
        np.testing.assert_array_equal(got[2 * i].numpy(), sparq.trim(x, cfg, axis=1), err_msg=str(cfg))
        np.testing.assert_array_equal(got[2 * i + 1].numpy(), sparq.trim(d, cfg, axis=-1), err_msg=str(cfg))


def test_example_spec_loads_and_sparq_needs_unsigned_activations():
    spec = HardwareSpec.load("example-sparq-accel")
    assert spec.sparq.mode == "bsparq" and spec.sparq.options == 5 and spec.sparq.rounding == "round"
    assert spec.latency == "modelled" and spec.is_local
    assert HardwareSpec.load("x86-avx2").sparq is None and HardwareSpec.load("x86-avx2").latency == "measured"
    data = json.loads(spec.model_dump_json())
    data["sparq"]["options"] = 4
    with pytest.raises(SpecError, match=r"sparq\.options"):
        HardwareSpec.from_yaml(json.dumps(data))
    data["sparq"]["options"] = 5
    data["ops"]["dense"][0]["inputs"] = ["int8", "int8"]
    with pytest.raises(SpecError, match="SPARQ trims unsigned activations"):
        HardwareSpec.from_yaml(json.dumps(data))


def test_report_labels_latency_modelled():
    from rich.console import Console

    from hago.compiler import _base_report
    from hago.report import print_report
    from hago.strategy import Strategy

    spec = HardwareSpec.load("example-sparq-accel")
    report = _base_report(spec, None, Strategy("h", spec.name), "h", "minmax", 0.0)
    assert report["latency"] == "modelled"
    report.update(fp32={"latency_ms": 2.0}, quantized={"latency_ms": 1.0}, speedup=2.0, batch=1)
    buf = io.StringIO()
    print_report(report, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "latency ms (batch 1, modelled)" in text and "latency is modelled" in text
    assert "blocked float kernels, modelled" in text
    report.update(quantized={"latency_ms": 3.0}, speedup=2 / 3)  # a simulated device's times rank nothing
    buf = io.StringIO()
    print_report(report, Console(file=buf, width=200))
    assert "SLOWER" not in buf.getvalue() and "slower" not in buf.getvalue()
    measured = _base_report(HardwareSpec.load("x86-avx2"), None, Strategy("h", "x86-avx2"), "h", "minmax", 0.0)
    buf = io.StringIO()
    print_report({**measured, "fp32": {"latency_ms": 2.0}, "quantized": {"latency_ms": 3.0}, "speedup": 2 / 3,
                  "batch": 1}, Console(file=buf, width=200))
    assert "modelled" not in buf.getvalue() and "SLOWER" in buf.getvalue()  # a measured device is warned
    from hago.search.pareto import table  # hago search's front table says it too

    assert [c.header for c in table([], None, 0.9, "top-1", latency="modelled").columns][1] == "latency ms (modelled)"
    assert [c.header for c in table([], None, 0.9, "top-1").columns][1] == "latency ms"


@pytest.mark.llvm
def test_cnn_on_sparq_spec_trims_and_matches_its_simulation():
    """A conv -> relu -> conv -> relu -> dense CNN on the example spec (bSPARQ) and its vSPARQ variant: SPARQ
    changes the integer output, and the simulated twin applies the same trimming (its distance to the integer
    program is far below SPARQ's own effect). One quantize, one build of all five programs."""
    import torch
    import tvm
    from tvm import relax

    from hago.backends import backend_of
    from hago.compiler import quantize
    from hago.realize import realize
    from hago.simulate import simulate
    from hago.strategy import Strategy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(5 * 4 * 4, 4)).eval()
    x = np.random.default_rng(0).standard_normal((16, 3, 6, 6)).astype(np.float32)
    spec = HardwareSpec.load("example-sparq-accel")
    q = quantize(model, spec, {"input": x}, calibrator="minmax", example_inputs=(torch.from_numpy(x[:2]),))
    bsparq = {"mode": "bsparq", "options": 5, "rounding": "round"}
    assert q.strategy.sparq == bsparq
    assert Strategy.from_json(json.loads(json.dumps(q.strategy.to_json()))).sparq == bsparq  # replays keep it
    vsparq = dataclasses.replace(q.strategy, sparq={**bsparq, "mode": "vsparq"})

    def realized(strategy):
        return realize(q.graph, strategy, spec.requantize, backend_of(spec)).mod

    plain = realized(dataclasses.replace(q.strategy, sparq=None))
    # the two relu'd inputs (zero point 0) are trimmed; the offset-coded image input keeps its 8 bits
    shifts = [m.script(show_meta=False).count("R.left_shift") for m in (q.realized.mod, plain)]
    assert shifts[0] - shifts[1] == 2 * 2  # two left shifts per rounded trim
    funcs = {"plain": plain, "b_real": q.realized.mod, "b_sim": simulate(q.graph, q.strategy),
             "v_real": realized(vsparq), "v_sim": simulate(q.graph, vsparq)}
    mod = tvm.IRModule({name: m["main"].with_attr("global_symbol", name) for name, m in funcs.items()})
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    out = {name: vm[name](tvm.runtime.tensor(x)).numpy() for name in funcs}
    base = out["plain"]
    effects = {}
    for mode in ("b", "v"):
        real, sim = out[f"{mode}_real"], out[f"{mode}_sim"]
        effects[mode] = np.abs(real - base).mean()
        assert effects[mode] > 0.005 * np.abs(base).mean(), mode
        assert np.abs(sim - real).mean() < 0.1 * effects[mode], mode
        assert (sim.argmax(1) == real.argmax(1)).mean() >= 0.9, mode
    assert effects["v"] < effects["b"]  # vSPARQ keeps 8 bits wherever a pair partner is 0 (many, after a relu)
