"""Side-by-side latency and accuracy: hago FP32, INT8 and bf16, ONNX Runtime FP32 and INT8, OpenVINO FP32,
bf16 and INT8.

All builds of one model run in one process, on this machine, at batch 1 with
2 threads, so the ratios are taken under the same conditions. ``--model all``
runs every model in its own child process. Writes the table into
benchmarks/RESULTS.md (between the BEGIN/END markers of the model's section).

    python benchmarks/run.py [--model mnist|resnet18|mobilenetv2|efficientnet_lite0|minilm|all] [--no-write]

Models (see benchmarks/models.py): ``mnist`` (pretrained, real MNIST test
set), ``resnet18`` / ``mobilenetv2`` (random weights: latency only),
``efficientnet_lite0`` (pretrained; top-1 agreement and KL against FP32 on
crops of real photographs) and ``minilm`` (all-MiniLM-L6-v2, sequence length
128; gensim's Lee / WordSim353 / SimLex-999 correlations).

The hago bf16 row is a second compile, for ``x86-amx`` where the CPU has AMX (else ``x86-avx512-bf16``), with
every conv/dense that can run in bf16 doing so (``AnnotateConfig(all_bf16=True)``, the rest fp32, no integer
layers); it is left out, with a note, on a CPU without ``avx512_bf16``.
"""

from __future__ import annotations

import os

THREADS = int(os.environ.get("HAGO_BENCH_THREADS", "2"))
os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))  # read once, when TVM's thread pool starts

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
sys.path.insert(0, str(HERE))

DEVICE = "x86-avx512-vnni"
def _best_bf16_spec() -> str:
    """The hago bf16 row's spec: ``$HAGO_BENCH_BF16_SPEC``, else x86-amx (AMX tiles) where this CPU runs it,
    else x86-avx512-bf16 (``vdpbf16ps``)."""
    from hago.hwspec import HardwareSpec, runs_here

    return os.environ.get("HAGO_BENCH_BF16_SPEC") or (
        "x86-amx" if runs_here(HardwareSpec.load("x86-amx")) is None else "x86-avx512-bf16")


BF16_DEVICE = _best_bf16_spec()
AMX_DEVICE = "x86-amx"
REAL_MODELS = ("resnet18", "mobilenetv2", "efficientnet_lite0", "minilm")
ALL_MODELS = ("mnist", *REAL_MODELS)
HAGO_FP32 = "hago FP32 (untuned)"
HAGO_INT8 = "hago INT8 (untuned, default VNNI schedules)"
HAGO_BF16 = f"hago bf16 (untuned, {BF16_DEVICE})"
HAGO_INT8_AMX = f"hago INT8 (untuned, {AMX_DEVICE}: AMX where it pays, else VNNI)"
HAGO_INT8_AMX_EMB4 = f"hago INT8 ({AMX_DEVICE}) + 4-bit row-wise word embeddings"
HAGO_W4A8 = f"hago W4A8 (untuned, {DEVICE}: every conv/dense weight 4-bit, packed)"
TUNE_TRIALS = 0  # per task, FP32, INT8 and bf16 alike (set by --tune-trials)
TUNE_CACHE = WORK / "tuning"  # MetaSchedule records, reused by every later run
ORT_FP32 = "ONNX Runtime FP32"
ORT_INT8 = "ONNX Runtime INT8 (QDQ u8s8 per-channel)"
OV_INT8 = "OpenVINO INT8 (the ORT QDQ model)"
OV_NNCF = "OpenVINO INT8 (NNCF PTQ of the FP32 model)"
OV_FP32 = "OpenVINO FP32"
OV_BF16 = "OpenVINO bf16 (inference_precision=bf16, FP32 ONNX)"
ORT_DYN = "ONNX Runtime INT8 dynamic (quantize_dynamic, per-channel)"
NOTES: list[str] = []  # failures of optional peers, written under the table


def _median_ms(fn, min_s: float = 1.0, repeat: int = 7) -> float:
    fn()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 0.2:
        fn()
        n += 1
    per = (time.perf_counter() - t0) / n
    number = max(1, int(min_s / repeat / per))
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t) / number * 1e3)
    return float(np.median(runs))


def _ort_session(path, threads=THREADS):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_int8(fp32_path, calib: dict[str, np.ndarray], out_path):
    """``quantize_static`` (QDQ, uint8 activations, int8 per-channel weights), one sample per batch."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    n = len(next(iter(calib.values())))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{k: v[i:i + 1] for k, v in calib.items()} for i in range(n)])

        def get_next(self):
            return next(self.it, None)

    pre = Path(out_path).with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return Path(out_path)


def _ort_dynamic_int8(fp32_path, out_path):
    """``quantize_dynamic``: int8 per-channel weights, activations quantized per call (ORT's path for transformers)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = Path(out_path).with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_dynamic(str(pre), str(out_path), weight_type=QuantType.QInt8, per_channel=True)
    return Path(out_path)


def _openvino(path, threads=THREADS, precision=None):
    """OpenVINO's CPU plugin on an ONNX file (a QDQ file runs as INT8), or None if it is not installed.

    ``precision`` ("f32" / "bf16") sets ``INFERENCE_PRECISION_HINT``; left out, the plugin picks (bf16 on
    CPUs with AMX / AVX512-BF16), which is why the FP32 row pins f32 explicitly."""
    try:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints
    except ImportError:
        return None
    config = {props.inference_num_threads(): threads, hints.performance_mode(): hints.PerformanceMode.LATENCY}
    if precision is not None:
        config[hints.inference_precision()] = getattr(ov.Type, precision)
    return ov.Core().compile_model(str(path), "CPU", config)


def _openvino_fp32_peers(onnx_fp32: Path) -> dict:
    """OpenVINO on the FP32 ONNX file at f32 and at bf16 inference precision: {row name: compiled model}.

    The honest non-INT8 baselines: what a mature runtime does with the same FP32 model, and how fast
    plain bf16 (no calibration at all) is on this CPU. A row that cannot run is left out with a note."""
    try:
        import openvino as ov
        import openvino.properties.hint as hints
    except ImportError:
        NOTES.append("OpenVINO is not installed: no OpenVINO rows (`make bench` installs it).")
        return {}
    peers = {}
    for name, precision in ((OV_FP32, "f32"), (OV_BF16, "bf16")):
        if precision == "bf16" and "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            NOTES.append(f"{OV_BF16}: skipped, OpenVINO's CPU plugin reports no BF16 support on this CPU.")
            continue
        try:
            compiled = _openvino(onnx_fp32, precision=precision)
        except Exception as e:  # noqa: BLE001 - optional peer
            msg = " ".join(str(e).split())
            print(f"  {name} failed: {msg}", flush=True)
            NOTES.append(f"{name}: OpenVINO could not compile the FP32 ONNX model: `{msg[-200:]}`")
            continue
        got = compiled.get_property(hints.inference_precision())
        if got != getattr(ov.Type, precision):  # the plugin falls back silently where the ISA lacks it
            NOTES.append(f"{name}: skipped, OpenVINO compiled at {got} instead of {precision}.")
            continue
        peers[name] = compiled
    return peers


def _ov_fn(compiled):
    """A compiled OpenVINO model as feeds -> first output (numpy), like ``_ort_fn``."""
    return lambda feeds: np.asarray(compiled(feeds)[0])


def _ov_latency_rows(peers: dict, feeds1: dict[str, np.ndarray]) -> dict:
    rows = {}
    for name, compiled in peers.items():
        rows[name] = {"ms": _median_ms(lambda: compiled(feeds1))}
        print(f"  {name}: {rows[name]['ms']:.2f} ms", flush=True)
    return rows


def _vm(executable):
    import tvm
    from tvm import relax

    return relax.VirtualMachine(executable, tvm.cpu())


# ---- MNIST (the original benchmark) --------------------------------------------------
def bench_mnist(args) -> tuple[dict, str]:
    import tvm

    from hago import zoo
    from hago.compiler import compile as hago_compile

    n_eval = args.n_eval or 10000
    assets = zoo.export_mnist_demo(WORK / "mnist", n_calib=500)
    x_test, y_test = zoo.mnist_data("test")
    x_test, y_test = x_test[:n_eval], y_test[:n_eval]
    calib = np.load(assets["calib"])["input"]
    eval_data = {"input": x_test, "label": y_test}
    res = hago_compile(assets["model"], DEVICE, assets["calib"], eval_data=eval_data,
                       out_dir=WORK / "mnist_build", tune=_tune_options())
    bf16 = None
    if _bf16_available():
        from hago.annotate import AnnotateConfig

        bf16 = hago_compile(assets["model"], BF16_DEVICE, assets["calib"], eval_data=eval_data,
                            out_dir=WORK / "mnist_build_bf16", measure=False, tune=_tune_options(BF16_DEVICE),
                            annotate_config=AnnotateConfig(all_bf16=True), corrections=())
    amx = None
    if _amx_available():
        t = time.perf_counter()
        amx = hago_compile(assets["model"], AMX_DEVICE, assets["calib"], eval_data=eval_data,
                           out_dir=WORK / "mnist_build_amx", measure=False, tune=_tune_options(AMX_DEVICE))
        amx.extras["bench_compile_s"] = time.perf_counter() - t
    x1 = tvm.runtime.tensor(x_test[:1])
    rows = {}
    builds = [(HAGO_FP32, res.fp32_executable), (HAGO_INT8, res.int_executable)]
    builds += [(HAGO_INT8_AMX, amx.int_executable)] if amx is not None else []
    builds += [(HAGO_BF16, bf16.int_executable)] if bf16 is not None else []
    for name, ex in builds:
        vm = _vm(ex)
        rows[name] = {"ms": _median_ms(lambda: vm["main"](x1))}
    rows[HAGO_FP32]["top1"] = res.report["fp32"]["accuracy"]
    rows[HAGO_INT8]["top1"] = res.report["quantized"]["accuracy"]
    if amx is not None:
        rows[HAGO_INT8_AMX]["top1"] = amx.report["quantized"]["accuracy"]
    if bf16 is not None:
        rows[HAGO_BF16]["top1"] = bf16.report["quantized"]["accuracy"]

    ort_int8 = _ort_int8(assets["model"], {"input": calib}, WORK / "mnist_ort_int8.onnx")
    feed1 = {"input": x_test[:1]}
    for name, path in ((ORT_FP32, assets["model"]), (ORT_INT8, ort_int8)):
        sess = _ort_session(path)
        rows[name] = {"ms": _median_ms(lambda: sess.run(None, feed1))}
        logits = _run_batched(lambda feeds: sess.run(None, feeds)[0], {"input": x_test}, 500)
        rows[name]["top1"] = float((logits.argmax(1) == y_test).mean())
        if name == ORT_FP32:  # the OpenVINO FP32 / bf16 rows go beside ORT FP32
            ov_peers = _openvino_fp32_peers(assets["model"])
            rows.update(_ov_latency_rows(ov_peers, feed1))
            for ov_name, compiled in ov_peers.items():
                logits = _run_batched(_ov_fn(compiled), {"input": x_test}, 500)
                rows[ov_name]["top1"] = float((logits.argmax(1) == y_test).mean())
    nncf = _openvino_nncf(assets["model"], {"input": calib})
    if nncf is not None:
        rows[OV_NNCF] = {"ms": _median_ms(lambda: nncf(feed1))}
        logits = _run_batched(_ov_fn(nncf), {"input": x_test}, 500)
        rows[OV_NNCF]["top1"] = float((logits.argmax(1) == y_test).mean())
    table = to_markdown(rows, HAGO_FP32, [("top1", "top-1", "{:.2%}")])
    body = (f"## MNIST CNN (ccexam, pretrained), {DEVICE}\n\n"
            f"Command: {_command('mnist')} ({_stamp()}).\n"
            f"Machine: {_machine()}.\nAccuracy on the first {n_eval} images of the real MNIST test set.\n"
            f"{_ops_note(res)}\n{_bf16_note(bf16)}\n{_amx_note(amx)}\n\n"
            f"{table}\n{_notes()}")
    return rows, body


# ---- the real networks -----------------------------------------------------------
def _export_onnx(model, example: tuple, names: list[str], path: Path) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {n: {0: "N"} for n in names}
    axes["output"] = {0: "N"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), dynamo=False, input_names=names, output_names=["output"],
                          dynamic_axes=axes, opset_version=17)
    return path


def _tune_options(device: str = DEVICE):
    """Same per-task MetaSchedule budget for FP32, INT8 and bf16 (None: untuned, default schedules)."""
    if not TUNE_TRIALS:
        return None
    from hago.hwspec import HardwareSpec
    from hago.tune import TuneOptions

    return TuneOptions.for_spec(HardwareSpec.load(device), trials=TUNE_TRIALS, cache_dir=TUNE_CACHE)


QUICK = False  # set by --quick: the command written with the results says so


def _command(model: str) -> str:
    tune = f" --tune-trials {TUNE_TRIALS}" if TUNE_TRIALS else ""
    quick = " --quick" if QUICK else ""
    return f"`python benchmarks/run.py --model {model}{tune}{quick}`"


def _hago_build(model, example, calib, out_dir, batch_size, annotate_config=None, corrections=None,
                device: str = DEVICE):
    """``hago.compile`` at batch 1 (FP32 and INT8 executables); no measurement inside.

    ``corrections=None`` is hago's default (bias correction); ``()`` turns it off."""
    from hago.compiler import compile as hago_compile

    t = time.perf_counter()
    res = hago_compile(model, device, calib, example_inputs=example, out_dir=out_dir, measure=False,
                       batch_size=batch_size, annotate_config=annotate_config, tune=_tune_options(device),
                       corrections=corrections)
    return res, time.perf_counter() - t


def _bf16_available() -> bool:
    """Whether this CPU runs the bf16 build's spec; if not, a note says the row was skipped."""
    from hago.hwspec import HardwareSpec, runs_here

    problem = runs_here(HardwareSpec.load(BF16_DEVICE))
    if problem is None:
        return True
    NOTES.append(f"{HAGO_BF16}: skipped, {problem}.")
    return False


def _amx_available() -> bool:
    """Whether this CPU runs the x86-amx spec; if not, a note says the AMX row was skipped."""
    from hago.hwspec import HardwareSpec, runs_here

    problem = runs_here(HardwareSpec.load(AMX_DEVICE))
    if problem is None:
        return True
    NOTES.append(f"{HAGO_INT8_AMX}: skipped, {problem}.")
    return False


def _hago_amx_build(model, example, calib, out_dir, batch_size):
    """The INT8 compile for x86-amx (same calibration and corrections as the VNNI one), or None without AMX."""
    if not _amx_available():
        return None
    print(f"  hago compile for {AMX_DEVICE}", flush=True)
    res, t = _hago_build(model, example, calib, out_dir, batch_size, device=AMX_DEVICE)
    res.extras["bench_compile_s"] = t
    return res


def _amx_note(amx) -> str:
    """Which convs/denses of the AMX build run on the tiles (counted in its integer program)."""
    if amx is None:
        return f"{HAGO_INT8_AMX}: not built (see the notes)."
    from hago.compiler import static_pair
    from hago.hwspec import HardwareSpec

    text = static_pair(amx.quantized, HardwareSpec.load(AMX_DEVICE), 1)[1].script(show_meta=False)
    convs = len(re.findall(r"call_tir\(cls\.hago_conv2d_amx_int8\d*,", text))
    dense = len(re.findall(r"call_tir\(cls\.hago_dense_amx_int8\d*,", text))
    vnni = len(re.findall(r"call_tir\(cls\.hago_conv2d_nchwc_vnni\d*,", text))
    return (f"hago INT8 on {AMX_DEVICE}: {convs} convs and {dense} dense/matmul on AMX tiles, {vnni} convs on "
            f"VNNI (the measured rule in `hago/backends/amx/conv_int8.py`); its compile took "
            f"{amx.extras['bench_compile_s']:.0f} s.")


def _openvino_nncf(onnx_fp32: Path, calib: dict, transformer: bool = False):
    """OpenVINO INT8 through its own flow: NNCF post-training quantization of the FP32 model, on the same
    calibration samples hago gets (batch 1 each). None (and a note) where NNCF is not installed or fails."""
    try:
        import nncf
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints
    except ImportError:
        NOTES.append(f"{OV_NNCF}: skipped, NNCF is not installed (`make bench` installs it).")
        return None
    n = len(next(iter(calib.values())))
    samples = [{k: v[i:i + 1] for k, v in calib.items()} for i in range(n)]
    try:
        core = ov.Core()
        kw = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
        quantized = nncf.quantize(core.read_model(str(onnx_fp32)), nncf.Dataset(samples), subset_size=n, **kw)
        config = {props.inference_num_threads(): THREADS, hints.performance_mode(): hints.PerformanceMode.LATENCY}
        return core.compile_model(quantized, "CPU", config)
    except Exception as e:  # noqa: BLE001 - optional peer
        msg = " ".join(str(e).split())
        print(f"  {OV_NNCF} failed: {msg}", flush=True)
        NOTES.append(f"{OV_NNCF}: NNCF could not quantize the FP32 model: `{msg[-200:]}`")
        return None


def _hago_bf16_build(model, example, calib, out_dir, batch_size):
    """The bf16 build: every conv/dense that can be bf16 in bf16, the rest fp32 (``res.int_executable``).

    No integer layer, hence nothing to correct; ``None`` (and a note) on a CPU without ``avx512_bf16``."""
    if not _bf16_available():
        return None
    from hago.annotate import AnnotateConfig

    print(f"  hago compile for {BF16_DEVICE} (all_bf16)", flush=True)
    res, t = _hago_build(model, example, calib, out_dir, batch_size, annotate_config=AnnotateConfig(all_bf16=True),
                         corrections=(), device=BF16_DEVICE)
    res.extras["bench_compile_s"] = t
    return res


def _ops_note(res) -> str:
    from collections import Counter

    ops = res.strategy.ops
    ints = Counter(c.kind for c in ops.values() if c.mode == "integer")
    flo = Counter(c.kind if c.kind != "other" else c.reason.split()[2].rstrip(":")
                  for c in ops.values() if c.mode == "float")
    fmt = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))  # noqa: E731
    corr = ", ".join(res.strategy.corrections) or "none"
    return (f"hago ops: {sum(ints.values())} integer ({fmt(ints)}); {sum(flo.values())} float ({fmt(flo)}). "
            f"Corrections: {corr}.")


def _bf16_note(res) -> str:
    """How many weighted layers of the bf16 build run in bf16 and how many stay fp32 (and why)."""
    if res is None:
        return f"{HAGO_BF16}: not built (see the notes)."
    from collections import Counter

    weighted = {n.name for n in res.graph.nodes if n.weighted}
    ops = res.strategy.ops
    bf = Counter(c.kind for c in ops.values() if c.mode == "bf16")
    fp = Counter((c.kind, c.reason) for n, c in ops.items() if c.mode == "float" and n in weighted)
    others = sum(1 for n, c in ops.items() if c.mode == "float" and n not in weighted)
    bf_s = ", ".join(f"{k} {v}" for k, v in sorted(bf.items(), key=lambda kv: -kv[1]))
    fp_s = "; ".join(f"{k} {v}: {why}" for (k, why), v in sorted(fp.items(), key=lambda kv: -kv[1]))
    took = f" Its compile took {res.extras['bench_compile_s']:.0f} s." if "bench_compile_s" in res.extras else ""
    return (f"hago bf16 build ({BF16_DEVICE}): {sum(bf.values())} of {len(weighted)} weighted layers bf16 "
            f"({bf_s or 'none'}), {sum(fp.values())} fp32" + (f" ({fp_s})" if fp_s else "") +
            f"; the {others} other ops fp32.{took}")


def _latency_rows(feeds1: dict[str, np.ndarray], res, onnx_fp32: Path, onnx_int8: Path | None,
                  ov_peers: dict, bf16=None, amx=None, nncf=None) -> dict:
    """Batch-1 latency of every build; ``ov_peers`` (OpenVINO FP32 / bf16) come right after ORT FP32.

    ``bf16``: the hago bf16 build (its ``int_executable``), or None where it was skipped; ``amx``: the
    hago INT8 build for x86-amx, or None; ``nncf``: OpenVINO's NNCF-quantized model, or None."""
    import tvm

    rows = {}
    args1 = [tvm.runtime.tensor(v) for v in feeds1.values()]
    builds = [(HAGO_FP32, res.fp32_executable), (HAGO_INT8, res.int_executable)]
    builds += [(HAGO_INT8_AMX, amx.int_executable)] if amx is not None else []
    builds += [(HAGO_BF16, bf16.int_executable)] if bf16 is not None else []
    for name, ex in builds:
        vm = _vm(ex)
        rows[name] = {"ms": _median_ms(lambda: vm["main"](*args1))}
        print(f"  {name}: {rows[name]['ms']:.2f} ms", flush=True)
    paths = [(ORT_FP32, onnx_fp32)] + ([(ORT_INT8, onnx_int8)] if onnx_int8 else [])
    for name, path in paths:
        sess = _ort_session(path)
        rows[name] = {"ms": _median_ms(lambda: sess.run(None, feeds1))}
        print(f"  {name}: {rows[name]['ms']:.2f} ms", flush=True)
        if name == ORT_FP32:
            rows.update(_ov_latency_rows(ov_peers, feeds1))
    if onnx_int8 is not None:
        try:
            ov = _openvino(onnx_int8)
        except Exception as e:  # noqa: BLE001 - optional peer
            msg = " ".join(str(e).split())
            print(f"  OpenVINO failed: {msg}", flush=True)
            NOTES.append(f"OpenVINO could not compile the ORT QDQ model: `{msg[-200:]}`")
            ov = None
        if ov is not None:
            rows[OV_INT8] = {"ms": _median_ms(lambda: ov(feeds1))}
            print(f"  {OV_INT8}: {rows[OV_INT8]['ms']:.2f} ms", flush=True)
    if nncf is not None:
        rows[OV_NNCF] = {"ms": _median_ms(lambda: nncf(feeds1))}
        print(f"  {OV_NNCF}: {rows[OV_NNCF]['ms']:.2f} ms", flush=True)
    return rows


def _run_batched(fn, feeds: dict[str, np.ndarray], batch: int) -> np.ndarray:
    n = len(next(iter(feeds.values())))
    return np.concatenate([fn({k: v[i:i + batch] for k, v in feeds.items()}) for i in range(0, n, batch)])


def _w4a8_row(rows: dict, model, example, calib, feeds1: dict, batch_size: int):
    """The INT8 compile with every conv/dense weight at 4 bits (packed two per byte where the VNNI kernels
    take them): its batch-1 latency next to W8A8's, for speed and size (issue 17). No learned rounding: the
    accuracy columns show round to nearest."""
    import tvm

    from hago.annotate import AnnotateConfig

    print(f"  hago compile for {DEVICE}, 4-bit weights", flush=True)
    w4, _ = _hago_build(model, example, calib, None, batch_size=batch_size,
                        annotate_config=AnnotateConfig(weight_bits=4))
    vm = _vm(w4.int_executable)
    args1 = [tvm.runtime.tensor(v) for v in feeds1.values()]
    rows[HAGO_W4A8] = {"ms": _median_ms(lambda: vm["main"](*args1))}
    print(f"  {HAGO_W4A8}: {rows[HAGO_W4A8]['ms']:.2f} ms", flush=True)
    return w4


def _tvm_fn(executable):
    import tvm

    vm = _vm(executable)
    return lambda feeds: vm["main"](*(tvm.runtime.tensor(np.ascontiguousarray(v)) for v in feeds.values())).numpy()


def _ort_fn(path):
    sess = _ort_session(path)
    return lambda feeds: sess.run(None, feeds)[0]


def _torch_fn(model):
    import torch

    def fn(feeds):
        with torch.no_grad():
            return model(*(torch.from_numpy(v) for v in feeds.values())).numpy()

    return fn


def bench_cnn(name: str, args) -> tuple[dict, str]:
    import torch

    import accuracy
    import models

    torch.set_num_threads(THREADS)
    pretrained = name == "efficientnet_lite0"
    model = models.build(name)
    example = models.example_inputs(name)
    inp = models.input_names(model)[0]
    n_calib = args.n_calib or (128 if pretrained else 32)
    calib = {inp: models.photo_crops(n_calib, seed=1)}
    wd = WORK / name
    print(f"{name}: hago compile (calibration on {n_calib} photo crops)", flush=True)
    res, t_compile = _hago_build(model, example, calib, wd / "build", batch_size=8)
    amx = _hago_amx_build(model, example, calib, wd / "build_amx", batch_size=8)
    bf16 = _hago_bf16_build(model, example, calib, wd / "build_bf16", batch_size=8)
    onnx_fp32 = _export_onnx(model, example, [inp], wd / f"{name}.onnx")
    onnx_int8 = _ort_int8(onnx_fp32, calib, wd / f"{name}_ort_int8.onnx")
    nncf = _openvino_nncf(onnx_fp32, calib)
    feeds1 = {inp: calib[inp][:1]}
    ov_peers = _openvino_fp32_peers(onnx_fp32)
    rows = _latency_rows(feeds1, res, onnx_fp32, onnx_int8, ov_peers, bf16, amx, nncf)
    w4 = _w4a8_row(rows, model, example, calib, feeds1, batch_size=8)
    cols = []
    acc_note = "Random weights: latency only (accuracy claims are made on the pretrained models)."
    if pretrained:
        views, view_names = models.photo_views()  # whole photos, none of those calibration crops come from
        n_eval = min(args.n_eval or len(views), len(views))
        x = {inp: views[:n_eval]}
        n_photos = len({v.split("|")[0] for v in view_names[:n_eval]})
        print(f"{name}: accuracy on {n_eval} views of {n_photos} photos", flush=True)
        ref = _run_batched(_torch_fn(model), x, 50)
        outs = {HAGO_INT8: _run_batched(_tvm_fn(res.int_executable), x, 1),
                ORT_FP32: _run_batched(_ort_fn(onnx_fp32), x, 50),
                ORT_INT8: _run_batched(_ort_fn(onnx_int8), x, 50)}
        for ov_name, compiled in ov_peers.items():
            outs[ov_name] = _run_batched(_ov_fn(compiled), x, 50)
        outs[HAGO_FP32] = _run_batched(_tvm_fn(res.fp32_executable), x, 1)
        if amx is not None:
            outs[HAGO_INT8_AMX] = _run_batched(_tvm_fn(amx.int_executable), x, 1)
        if nncf is not None:
            outs[OV_NNCF] = _run_batched(_ov_fn(nncf), x, 50)
        if bf16 is not None:
            outs[HAGO_BF16] = _run_batched(_tvm_fn(bf16.int_executable), x, 1)
        outs[HAGO_W4A8] = _run_batched(_tvm_fn(w4.int_executable), x, 1)
        print(f"{name}: hago compile without bias correction", flush=True)
        import tvm

        no_corr = f"{HAGO_INT8}, no bias correction"
        plain, _ = _hago_build(model, example, calib, wd / "build_nocorr", batch_size=8, corrections=())
        vm = _vm(plain.int_executable)
        args1 = [tvm.runtime.tensor(v) for v in feeds1.values()]
        rows[no_corr] = {"ms": _median_ms(lambda: vm["main"](*args1))}
        outs[no_corr] = _run_batched(_tvm_fn(plain.int_executable), x, 1)
        for k, out in outs.items():
            rows[k].update(accuracy.classifier_metrics(out, ref))
        cols = [("top1_agreement", "top-1 agreement with FP32", "{:.1%}"), ("mean_kl", "mean KL vs FP32", "{:.4f}"),
                ("top5_overlap", "top-5 overlap", "{:.1%}")]
        acc_note = (f"Accuracy: {n_eval} views ({n_photos} whole photographs, ImageNet centre crop, and their "
                    f"mirror images; `benchmarks/photos.py`, installed by `tools/install_photos.sh`), against "
                    f"PyTorch FP32 (hago FP32 matches it to 1e-5). Calibration used {n_calib} random crops of "
                    f"{len(models._sample_photos())} other photographs (scikit-image, scikit-learn, darknet).")
    table = to_markdown(rows, HAGO_FP32, cols)
    title = {"resnet18": "ResNet-18 (random weights)", "mobilenetv2": "MobileNetV2 (random weights)",
             "efficientnet_lite0": "EfficientNet-Lite0 (pretrained, ImageNet)"}[name]
    body = (f"## {title}, {DEVICE}, batch 1, 224x224\n\n"
            f"Command: {_command(name)} ({_stamp()}).\n"
            f"Machine: {_machine()}.\n{acc_note}\n{_ops_note(res)} hago compile took {t_compile:.0f} s.\n"
            f"{_amx_note(amx)}\n"
            f"{_bf16_note(bf16)}\n{_weight_bytes_note(res, w4=w4)}\n\n"
            f"{table}\n{_notes()}")
    return rows, body


def _minilm_variants(res) -> list:
    """The same compile with static calibrated ranges on every dense input (no run-time per-row
    ranges): what ``activations.dynamic`` buys on a transformer."""
    from hago.annotate import AnnotateConfig

    return [("hago INT8, static ranges only (dynamic: off)", AnnotateConfig(dynamic=False))]


def bench_minilm(args) -> tuple[dict, str]:
    import torch

    import accuracy
    import models

    torch.set_num_threads(THREADS)
    model = models.build("minilm")
    example = models.example_inputs("minilm")
    names = models.input_names(model)
    n_calib = args.n_calib or 64
    calib = models.tokenize(models.minilm_calibration_texts(n_calib))
    wd = WORK / "minilm"
    print(f"minilm: hago compile (calibration on {n_calib} sentences)", flush=True)
    res, t_compile = _hago_build(model, example, calib, wd / "build", batch_size=8)
    amx = _hago_amx_build(model, example, calib, wd / "build_amx", batch_size=8)
    bf16 = _hago_bf16_build(model, example, calib, wd / "build_bf16", batch_size=8)
    onnx_fp32 = _export_onnx(model, example, names, wd / "minilm.onnx")
    onnx_int8 = _ort_int8(onnx_fp32, calib, wd / "minilm_ort_int8.onnx")
    nncf = _openvino_nncf(onnx_fp32, calib, transformer=True)
    docs, _ = models.lee_corpus()
    feeds1 = {k: v[:1] for k, v in models.tokenize(docs[:1]).items()}
    ov_peers = _openvino_fp32_peers(onnx_fp32)
    rows = _latency_rows(feeds1, res, onnx_fp32, onnx_int8, ov_peers, bf16, amx, nncf)
    w4 = _w4a8_row(rows, model, example, calib, feeds1, batch_size=8)
    emb4 = None
    if amx is not None:  # the same INT8 build with the word table stored 4-bit row-wise (hago.embedding4)
        from hago.annotate import AnnotateConfig

        print(f"minilm: hago compile for {AMX_DEVICE}, 4-bit row-wise embeddings", flush=True)
        emb4, _ = _hago_build(model, example, calib, None, batch_size=8, device=AMX_DEVICE,
                              annotate_config=AnnotateConfig(embedding_bits=4))
        vm4 = _vm(emb4.int_executable)
        import tvm

        args4 = [tvm.runtime.tensor(v) for v in feeds1.values()]
        rows[HAGO_INT8_AMX_EMB4] = {"ms": _median_ms(lambda: vm4["main"](*args4))}
        print(f"  {HAGO_INT8_AMX_EMB4}: {rows[HAGO_INT8_AMX_EMB4]['ms']:.2f} ms", flush=True)
    onnx_dyn = _ort_dynamic_int8(onnx_fp32, wd / "minilm_ort_dyn_int8.onnx")
    sess = _ort_session(onnx_dyn)
    rows[ORT_DYN] = {"ms": _median_ms(lambda: sess.run(None, feeds1))}
    print(f"  {ORT_DYN}: {rows[ORT_DYN]['ms']:.2f} ms", flush=True)

    def embedder(fn, batch):
        return lambda texts: _run_batched(fn, models.tokenize(texts), batch)

    cands = {"PyTorch FP32 (reference)": embedder(_torch_fn(model), 32),
             HAGO_INT8: embedder(_tvm_fn(res.int_executable), 1),
             ORT_INT8: embedder(_ort_fn(onnx_int8), 32), ORT_DYN: embedder(_ort_fn(onnx_dyn), 32)}
    if bf16 is not None:
        cands[HAGO_BF16] = embedder(_tvm_fn(bf16.int_executable), 1)
    if amx is not None:
        cands[HAGO_INT8_AMX] = embedder(_tvm_fn(amx.int_executable), 1)
    if emb4 is not None:
        cands[HAGO_INT8_AMX_EMB4] = embedder(_tvm_fn(emb4.int_executable), 1)
    cands[HAGO_W4A8] = embedder(_tvm_fn(w4.int_executable), 1)
    if nncf is not None:
        cands[OV_NNCF] = embedder(_ov_fn(nncf), 32)
    cands.update({ov_name: embedder(_ov_fn(compiled), 32) for ov_name, compiled in ov_peers.items()})
    variants = [] if args.quick else _minilm_variants(res)
    for label, cfg in variants:  # the same compile with ops pinned to float through AnnotateConfig
        print(f"minilm: hago compile, {label}", flush=True)
        vres, _ = _hago_build(model, example, calib, None, batch_size=8, annotate_config=cfg)
        vm = _vm(vres.int_executable)
        import tvm

        args1 = [tvm.runtime.tensor(v) for v in feeds1.values()]
        rows[label] = {"ms": _median_ms(lambda: vm["main"](*args1))}
        cands[label] = embedder(_tvm_fn(vres.int_executable), 1)
    ref_emb = cands["PyTorch FP32 (reference)"](docs)
    for k, fn in cands.items():
        print(f"minilm: gensim metrics for {k}", flush=True)
        t = time.perf_counter()
        m = accuracy.sentence_metrics(fn)
        m["cos_vs_fp32"] = accuracy.embedding_agreement(fn(docs), ref_emb)
        print(f"  {m} ({time.perf_counter() - t:.0f} s)", flush=True)
        rows.setdefault(k, {"ms": None}).update(m)
    cols = [("lee_pearson", "Lee Pearson", "{:.4f}"), ("wordsim353_spearman", "WordSim353 Spearman", "{:.4f}"),
            ("simlex999_spearman", "SimLex-999 Spearman", "{:.4f}"),
            ("cos_vs_fp32", "mean cos vs FP32 (Lee docs)", "{:.4f}")]
    table = to_markdown(rows, HAGO_FP32, cols)
    body = (f"## all-MiniLM-L6-v2 (pretrained), {DEVICE}, batch 1, sequence length 128\n\n"
            f"Command: {_command('minilm')} ({_stamp()}).\n"
            f"Machine: {_machine()}.\n"
            f"Sentence embedding = mean pooling of the BertModel's token states over the attention mask "
            f"(sentence-transformers' pooling; our plain-torch BERT reproduces the published FP32 numbers at "
            f"length 256: Lee 0.6564, WordSim353 0.7289, SimLex-999 0.4462). Texts are truncated/padded to 128 "
            f"tokens. Calibration: {n_calib} sentences of gensim's Lee *background* corpus and polarity set "
            f"(disjoint from the evaluation sets).\n{_ops_note(res)} hago compile took {t_compile:.0f} s.\n"
            f"{_bf16_note(bf16)}\n{_amx_note(amx)}\n{_weight_bytes_note(res, emb4, w4)}\n\n"
            f"{table}\n{_notes()}")
    return rows, body


def _weight_bytes_note(res, emb4=None, w4=None) -> str:
    """Weight bytes of the builds (``hago compile``'s count: every constant with two axes longer than 1)."""
    from hago.weight_bytes import format_bytes

    parts = [f"FP32 {format_bytes(res.report['fp32'].get('weight_bytes'))}",
             f"INT8 {format_bytes(res.report['quantized'].get('weight_bytes'))}"]
    if w4 is not None:
        parts.append(f"W4A8 {format_bytes(w4.report['quantized'].get('weight_bytes'))}")
    if emb4 is not None:
        emb_bytes = format_bytes(emb4.report["quantized"].get("weight_bytes"))
        parts.append(f"INT8 with the word table 4-bit row-wise {emb_bytes}")
    return "Weights: " + ", ".join(parts) + "."


# ---- output ------------------------------------------------------------------------
def _notes() -> str:
    return "".join(f"\n- {n}" for n in NOTES) + ("\n" if NOTES else "")


def _stamp() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    return f"commit {commit}, {time.strftime('%Y-%m-%d')}, {THREADS} threads"


def _machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import tvm

    extra = ""
    try:
        import openvino

        extra = f", OpenVINO {openvino.__version__.split('-')[0]}"
    except ImportError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores (shared with other jobs while measured), Python "
            f"{platform.python_version()}, TVM {tvm.__version__}, ONNX Runtime {onnxruntime.__version__}{extra}")


def to_markdown(rows: dict, base: str, cols=(("top1", "top-1", "{:.2%}"),)) -> str:
    ref = rows[base]["ms"]
    head = "| build | median ms (batch 1) | speed-up vs hago FP32 |" + "".join(f" {h} |" for _, h, _ in cols)
    lines = [head, "|---|---:|---:|" + "---:|" * len(cols)]
    for name, r in rows.items():
        ms = r.get("ms")
        cells = [f"{ms:.3f}" if ms else "-", f"{ref / ms:.2f}x" if ms else "-"]
        for key, _, fmt in cols:
            cells.append(fmt.format(r[key]) + (f" {r['note']}" if "note" in r and key == cols[0][0] else "")
                         if r.get(key) is not None else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(section: str, body: str) -> None:
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text += f"\n{block}\n"
    path.write_text(text)


def run_one(model: str, args) -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if model == "mnist":
        rows, body = bench_mnist(args)
    elif model == "minilm":
        rows, body = bench_minilm(args)
    else:
        rows, body = bench_cnn(model, args)
    print(body)
    (WORK / f"{model}{'-tuned' if TUNE_TRIALS else ''}_rows.json").write_text(json.dumps(rows, indent=1))
    print(f"{model}: {time.perf_counter() - t:.0f} s", flush=True)
    if not args.no_write:
        write_results(f"{model}-tuned" if TUNE_TRIALS else model, body)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mnist", choices=[*ALL_MODELS, "all"])
    p.add_argument("--n-eval", type=int, default=None, help="evaluation samples (mnist 10000; efficientnet: every photo view)")
    p.add_argument("--n-calib", type=int, default=None, help="calibration samples (CNNs 32/128, minilm 64)")
    p.add_argument("--quick", action="store_true", help="skip the slowest accuracy rows")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--tune-trials", type=int, default=0,
                   help="MetaSchedule trials per task for hago FP32, INT8 and bf16 alike (records cached in "
                        "benchmarks/work/tuning; 0: untuned, hand-written default schedules)")
    args = p.parse_args()
    global HAGO_FP32, HAGO_INT8, HAGO_BF16, TUNE_TRIALS, QUICK
    TUNE_TRIALS, QUICK = args.tune_trials, args.quick
    if TUNE_TRIALS:
        HAGO_FP32 = f"hago FP32 (MetaSchedule, {TUNE_TRIALS} trials/task)"
        HAGO_INT8 = f"hago INT8 (MetaSchedule, {TUNE_TRIALS} trials/task)"
        HAGO_BF16 = f"hago bf16 (MetaSchedule, {TUNE_TRIALS} trials/task, {BF16_DEVICE})"
    if args.model != "all":
        return run_one(args.model, args)
    rc = 0
    for model in ALL_MODELS:  # one process per model: memory and thread pools start fresh
        cmd = [sys.executable, __file__, "--model", model] + (["--no-write"] if args.no_write else [])
        cmd += [f"--n-eval={args.n_eval}"] if args.n_eval else []
        cmd += [f"--n-calib={args.n_calib}"] if args.n_calib else []
        cmd += ["--quick"] if args.quick else []
        cmd += [f"--tune-trials={args.tune_trials}"] if args.tune_trials else []
        rc |= subprocess.run(cmd).returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
