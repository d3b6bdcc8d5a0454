"""The ``hago`` command line, in tvmc's tradition.

    hago devices
    hago spec check FILE
    hago compile MODEL --device NAME --calib DATA [--eval DATA] [--strategy S.json] -o OUT/

A :class:`~hago.errors.HagoError` prints one line and exits 2; a traceback
appears only with ``--debug``. Anything else that escapes is reported the
same way, as an internal error, so no traceback ever reaches a user.

Every argument that can be checked without TVM (paths, counts, the spec, a
saved strategy) is checked before TVM or torch is imported: importing them
takes seconds, and a typo should not cost a build. So this module imports
only light modules at the top; each command imports what it runs.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import tempfile
from pathlib import Path

from .errors import HagoError, SpecError, error_line

log = logging.getLogger("hago")

#: model files hago refuses to open: loading them means unpickling, i.e. running their code
TORCH_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")
_HOST_PORT = re.compile(r"^[A-Za-z0-9._-]+:(\d{1,5})$")


class UsageError(HagoError, ValueError):
    """A command-line argument is wrong (a path, a count, an option value)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are a :class:`UsageError` (one ``hago: error:`` line, exit 2), not usage + exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


# -- checks that need no TVM ------------------------------------------------------
def _check_model(path: str) -> None:
    """The model file exists, is an ONNX file and is not empty; a PyTorch file is refused, never unpickled."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"model file '{p}' does not exist")
    if not p.is_file():
        raise UsageError(f"model '{p}' is not a file; give the path of an .onnx file")
    suffix = p.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        raise UsageError(f"model file '{p}' is a PyTorch/pickle file, which hago does not load (unpickling runs "
                         f"code); export it to ONNX: torch.onnx.export(model, example_input, 'model.onnx', "
                         f"dynamo=False), then pass model.onnx")
    if suffix != ".onnx":
        raise UsageError(f"model file '{p}' is not an .onnx file; export the model to ONNX "
                         f"(e.g. torch.onnx.export(model, example_input, 'model.onnx')) and pass that file")
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UsageError(f"model file '{p}' cannot be read ({e.strerror})") from None
    if size == 0:
        raise UsageError(f"model file '{p}' is empty (0 bytes); re-export the model")


def _check_data_file(path: str | None, flag: str, name: str) -> None:
    """A data path is a readable .npz with sound labels; its arrays are checked against the model later."""
    if path is None:
        return
    from .data import check_npz_file  # numpy only

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} file '{p}' does not exist")
    if not p.is_file():
        raise UsageError(f"{flag} '{p}' is not a file; give an .npz file")
    check_npz_file(p, name)


def _check_output(path: str | None) -> None:
    """``-o`` names a folder hago can create and write in: found now, not after the whole build.

    Writability is tested by doing it (creating the missing folders and a
    temporary file, then removing what was created): ``os.access`` says yes
    to root on read-only mounts and pseudo file systems.
    """
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"output '{p}' is an existing file, not a folder; give a folder for -o")
    created: list[Path] = []
    try:
        for q in reversed([p, *p.parents]):
            if not q.exists():
                q.mkdir()
                created.append(q)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to output folder '{p}' ({e.strerror}); choose a writable folder for -o") \
            from None
    finally:
        for q in reversed(created):
            try:
                q.rmdir()
            except OSError:
                pass


def _check_int(value: int | None, flag: str, minimum: int) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{flag} must be at least {minimum}, got {value}")


def _check_seconds(value: float | None, flag: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be a positive number of seconds, got {value:g}")


def _check_measure_timeout(value: float) -> None:
    """The measurers' own rule (:func:`hago.measure.check_timeout`), checked before TVM is imported."""
    from .measure.base import check_timeout  # no TVM unless it refuses

    try:
        check_timeout(value)
    except HagoError as e:
        raise UsageError(f"--measure-timeout: {e}") from None


def _check_calibrator(name: str) -> None:
    from .calibrate import CALIBRATORS  # numpy only

    if name not in CALIBRATORS:
        raise UsageError(f"unknown calibrator {name!r}; valid: {', '.join(sorted(CALIBRATORS))}")


def _check_rpc(args) -> None:
    if not args.rpc:
        return
    m = _HOST_PORT.match(args.rpc)
    if not (m and 0 < int(m.group(1)) < 65536):
        raise UsageError(f"--rpc must be the tracker's host:port (e.g. 192.168.1.5:9190), got {args.rpc!r}")
    if not args.key:
        raise UsageError("--rpc needs --key (the device key the board registered with the tracker)")


def _corrections(text: str | None):
    """``--corrections bias`` -> ["bias"]; ``none`` -> []; absent -> None (hago's default)."""
    if text is None:
        return None
    return [] if text.strip() in ("", "none") else [c.strip() for c in text.split(",") if c.strip()]


def _common_checks(args, *, calib_required: bool):
    """Everything shared by compile, search and bench that needs no TVM; returns the loaded spec."""
    from .hwspec import HardwareSpec

    _check_model(args.model)
    _check_data_file(args.calib, "--calib", "calibration")
    _check_data_file(args.eval, "--eval", "evaluation")
    if calib_required and not args.calib:
        raise UsageError("calibration data is required (--calib DATA) unless a --strategy is replayed")
    _check_output(args.output)
    _check_measure_timeout(args.measure_timeout)
    _check_calibrator(args.calibrator)
    _check_rpc(args)
    spec = HardwareSpec.load(args.device)
    runs_local = spec.is_local and not getattr(args, "rpc", None)
    if runs_local and (not getattr(args, "no_measure", False) or args.eval):  # its build will run here
        from .hwspec import runs_here

        problem = runs_here(spec)
        if problem is not None:
            raise SpecError(problem)
    return spec


def _heavy_checks(spec, device: str, corrections) -> None:
    """Checks that need TVM (the LLVM CPU name, the correction plug-ins), still before any model is read."""
    from .hwspec import check_target

    check_target(spec, device)
    if corrections:
        from .correct import check_corrections

        check_corrections(corrections)


# -- commands -----------------------------------------------------------------------
def _cmd_devices(args) -> int:
    from rich.console import Console

    if args.rpc:  # what a tracker holds, per key
        m = _HOST_PORT.match(args.rpc)
        if not (m and 0 < int(m.group(1)) < 65536):
            raise UsageError(f"--rpc must be the tracker's host:port (e.g. 192.168.1.5:9190), got {args.rpc!r}")
        from .measure.farm import tracker_table

        Console().print(tracker_table(args.rpc))
        return 0
    from .hwspec import device_table, list_devices

    Console().print(device_table(list_devices()))
    return 0


def _cmd_spec_check(args) -> int:
    from .hwspec import check_spec_file

    for f in args.files:
        print(check_spec_file(f))
    return 0


def _rpc_measurer(args):
    if not args.rpc:
        return None
    from .backends import backend_of
    from .measure import RPCMeasurer
    from .hwspec import HardwareSpec

    _check_rpc(args)
    device = backend_of(HardwareSpec.load(args.device)).device  # the TVM device the session opens
    return RPCMeasurer(args.rpc, args.key, timeout_s=args.measure_timeout, device=device)


def _precision_config(precision: str, spec, option: str = "--precision"):
    """``--precision``: int8 (annotate's default) or bf16 (every layer the spec and kernels allow, fp32 elsewhere)."""
    if precision == "int8":
        return None
    if precision != "bf16":
        raise UsageError(f"{option} {precision!r}: valid: int8, bf16")
    if "bf16" not in spec.precisions():
        raise UsageError(f"{option} bf16: {spec.name} declares no bf16 (it has: {', '.join(spec.precisions())})")
    from .annotate import AnnotateConfig

    return AnnotateConfig(all_bf16=True)


def _embedding_config(bits, spec, config):
    """``--embedding-bits 4``: embedding tables (``take`` on a constant table) stored 4-bit row-wise, where the
    spec's ``weights.rowwise_4bit`` lists ``take`` (:mod:`hago.embedding4`)."""
    if bits is None:
        return config
    if bits != 4:
        raise UsageError(f"--embedding-bits {bits}: valid: 4 (row-wise 4-bit tables; leave it out for float32)")
    if "take" not in spec.weights.rowwise_4bit:
        raise UsageError(f"--embedding-bits 4: {spec.name} stores no 4-bit row-wise tables (weights.rowwise_4bit)")
    import dataclasses

    from .annotate import AnnotateConfig

    return dataclasses.replace(config or AnnotateConfig(), embedding_bits=4)


def _cmd_compile(args) -> int:
    from .strategy import Strategy

    spec = _common_checks(args, calib_required=not args.strategy)
    _check_int(args.tune_trials, "--tune-trials", 0)
    _check_int(args.batch, "--batch", 1)
    strategy = Strategy.load(args.strategy) if args.strategy else None
    corrections = _corrections(args.corrections)
    annotate_config = _embedding_config(args.embedding_bits, spec, _precision_config(args.precision, spec))
    _heavy_checks(spec, args.device, corrections)

    from rich.console import Console

    from .backends import backend_of
    from .compiler import compile as hago_compile
    from .report import print_report
    from .tune import TuneOptions

    tune = None
    if backend_of(spec).tunable:  # GPU kernels are hand-scheduled; MetaSchedule there needs a GPU
        tune = TuneOptions.for_spec(spec, args.tune_trials, args.cache_dir, tracker=args.rpc,
                                    progress=sys.stderr.isatty())

    result = hago_compile(
        args.model,
        spec,
        args.calib,
        eval_data=args.eval,
        out_dir=args.output,
        strategy=strategy,
        calibrator=args.calibrator,
        corrections=corrections,
        measure=not args.no_measure,
        measurer=_rpc_measurer(args),
        tune=tune,
        batch=args.batch,
        annotate_config=annotate_config,
    )
    print_report(result.report)
    if args.output:
        Console().print(f"wrote {args.output}/model.so, strategy.json, report.json")
    return 0


def _search_checks(args):
    """compile's checks plus the search's own options, before TVM is imported (except the last); the spec."""
    spec = _common_checks(args, calib_required=True)
    _check_int(args.max_trials, "--max-trials", 1)
    _check_int(args.max_devices, "--max-devices", 1)
    _check_int(args.settle_rounds, "--settle-rounds", 0)
    _check_seconds(args.time_budget, "--time-budget")
    if args.max_weight_bytes is not None:
        from .weight_bytes import parse_bytes  # no TVM

        try:
            parse_bytes(args.max_weight_bytes)
        except ValueError as e:
            raise UsageError(f"--max-weight-bytes: {e}") from None
    corrections = _corrections(args.corrections)
    _heavy_checks(spec, args.device, corrections)
    _search_target(args)
    return spec


def _search_target(args):
    """``(accuracy target, metric)``: ``--accuracy-drop`` on the data's metric, or ``--max-kl`` (not both)."""
    from .search.target import AccuracyTarget, kl_target  # imports TVM (through hago.evaluate)

    if args.max_kl is None:
        return AccuracyTarget.parse(args.accuracy_drop or "1%"), None
    if args.accuracy_drop is not None:
        raise UsageError("give --accuracy-drop or --max-kl, not both: --max-kl X is the target "
                         "'mean KL divergence from FP32 at most X'")
    return kl_target(args.max_kl), "kl"


def _farm_measurer(args):
    """The search's boards: every free one under --key on the --rpc tracker, up to --max-devices at once."""
    from .hwspec import HardwareSpec
    from .measure.farm import FarmMeasurer

    _check_rpc(args)
    return FarmMeasurer(args.rpc, args.key, HardwareSpec.load(args.device), timeout_s=args.measure_timeout,
                        max_devices=args.max_devices)


def _engine_options(args) -> dict:
    target, metric = _search_target(args)
    opts = dict(accuracy_drop=target, max_trials=args.max_trials, time_budget=args.time_budget,
                calibrator=args.calibrator, settle_rounds=args.settle_rounds)
    if metric is not None:
        opts["metric"] = metric
    if args.multipoint:
        opts["multipoint"] = True
    if args.corrections is not None:
        opts["corrections"] = _corrections(args.corrections)
    if args.max_weight_bytes is not None:
        from .weight_bytes import parse_bytes

        opts["max_weight_bytes"] = parse_bytes(args.max_weight_bytes)
    if args.rpc:
        opts["measurer"] = _farm_measurer(args)
    else:
        from .hwspec import HardwareSpec
        from .measure import LocalMeasurer

        spec = HardwareSpec.load(args.device)
        if spec.is_local:  # otherwise the engine says clearly that --rpc is needed
            opts["measurer"] = LocalMeasurer(timeout_s=args.measure_timeout, threads=spec.cores)
    return opts


def _cmd_search(args) -> int:
    if not (args.output or args.log or args.resume):
        raise UsageError("give -o OUT or --log LOG: the search log must live somewhere")
    _search_checks(args)
    from rich.console import Console

    from .search.run import print_search, search

    result = search(args.model, args.device, args.calib, args.eval, out_dir=args.output, algorithm=args.algorithm,
                    log_path=args.resume or args.log, resume=bool(args.resume), **_engine_options(args))
    print_search(result)
    if args.output and result.best is not None:
        Console().print(f"wrote {args.output}/model.so, strategy.json, report.json, pareto.json, pareto.png")
    return 0 if result.best is not None else 1


def _cmd_bench(args) -> int:
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(strategies) - {"fp32", "int8", "bf16", "search"}) or ([] if strategies else ["(none)"])
    if unknown:
        raise UsageError(f"unknown --strategies {', '.join(unknown)}; valid: fp32, int8, bf16, search")
    spec = _search_checks(args)
    if "bf16" in strategies:
        _precision_config("bf16", spec, "--strategies")
    from .bench import bench

    bench(args.model, args.device, args.calib, args.eval, strategies, args.output,
          engine_options=_engine_options(args), algorithm=args.algorithm)
    return 0


def _search_options(p) -> None:
    p.add_argument("--calib", required=True, help=".npz of calibration arrays keyed by input name")
    p.add_argument("--eval", required=True, help=".npz evaluation set; with 'label' the metric is top-1")
    p.add_argument("--accuracy-drop", default=None,
                   help="'1%%' relative or '0.5pt' absolute, against FP32 (default 1%%)")
    p.add_argument("--max-kl", type=float, default=None, metavar="NATS",
                   help="instead of --accuracy-drop: mean KL divergence of the softmax outputs from FP32's on "
                        "--eval at most NATS (e.g. 0.0023); steadier than top-1 agreement where inputs "
                        "nearly tie")
    p.add_argument("--algorithm", default="evolve", help="evolve | latency | greedy (HAGO's baseline)")
    p.add_argument("--max-trials", type=int, default=16, help="device measurements at most")
    p.add_argument("--time-budget", type=float, default=None, help="seconds at most")
    p.add_argument("--settle-rounds", type=int, default=3, metavar="N",
                   help="before choosing, re-time the fastest candidates meeting the target and FP32 side by side "
                        "in N interleaved rounds (0: off), so a machine whose speed drifts cannot decide the "
                        "answer; not counted in --max-trials")
    p.add_argument("--max-weight-bytes", default=None, metavar="SIZE",
                   help="weight-size budget: a build whose realized weights take more is never chosen, and the "
                        "search steers towards builds within it; bytes or with a unit: 2MB, 500kB, 1.5MiB")
    p.add_argument("--multipoint", action="store_true",
                   help="also offer each dense and conv2d layer its narrow weights plus multipoint extra points "
                        "(extra low-bit output channels, a tenth of the layer's, for the channels that lose most): "
                        "a choice between 4 and 8 bits, priced by measured latency and realized bytes")
    p.add_argument("--calibrator", default="mse")
    p.add_argument("--corrections", default=None,
                   help="corrections every candidate gets, comma separated: bias (default), gptq,bias (GPTQ "
                        "codes per layer; run once at the widest and once at the lowest weight width), "
                        "weight_clip (least-Lp-error weight steps), adaround,bias, adaround_conv,bias, brecq,bias (adaround learned block by block, residual blocks and transformer sublayers jointly), brecq_fisher,bias (brecq with the Fisher-weighted loss), "
                        "cle (cross-layer equalization of the FP32 weights, before "
                        "calibration), bias_data_free (bias correction from batch-norm statistics, no data), "
                        "dfmpc (each candidate's low-bit -> higher-bit pairs compensated in closed form, after the "
                        "per-layer corrections: list it after any that writes weights), "
                        "lapq (loss-aware activation clipping; hago compile only: its clips depend on every "
                        "layer's choice, so the search refuses it) or none (per-layer ones only)")
    p.add_argument("--rpc", help="tracker host:port; measure on the boards registered under --key, in parallel")
    p.add_argument("--key", help="RPC device key")
    p.add_argument("--max-devices", type=int, default=None,
                   help="boards measuring at once at most (default: every free board under --key)")
    p.add_argument("--measure-timeout", type=float, default=60.0, help="seconds before a measurement is failed")
    p.add_argument("-o", "--output", help="output folder")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hago", description="hardware-aware post-training quantization on TVM")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("devices", help="list the hardware specs, or with --rpc what a tracker holds")
    d.add_argument("--rpc", help="tracker host:port: list its keys and boards instead of the specs")
    d.set_defaults(func=_cmd_devices)

    spec = sub.add_parser("spec", help="hardware spec tools").add_subparsers(dest="spec_command", required=True)
    check = spec.add_parser("check", help="validate spec YAML files")
    check.add_argument("files", nargs="+")
    check.set_defaults(func=_cmd_spec_check)

    c = sub.add_parser("compile", help="quantize and build a model for a device")
    c.add_argument("model", help="an ONNX file")
    c.add_argument("--device", required=True, help="a spec name (hago devices) or a YAML path")
    c.add_argument("--calib", help=".npz of calibration arrays keyed by input name")
    c.add_argument("--eval", help=".npz of evaluation arrays, with 'label' for top-1 accuracy")
    c.add_argument("--strategy", help="replay a saved strategy.json instead of calibrating")
    c.add_argument("--calibrator", default="mse", help="minmax | percentile | kl | mse (default mse)")
    c.add_argument("--corrections", default=None,
                   help="accuracy plug-ins after calibration, comma separated, in order: bias (empirical bias "
                        "correction, each layer on its FP32 input), bias_sequential (layer by layer, slow), "
                        "gptq (each layer's integer weights rounded column by column with the error fed "
                        "forward, on an output-aware step; put it before bias), gptq_sequential (gptq, then "
                        "each layer in turn refit on the input the quantized network gives it), weight_clip "
                        "(least-Lp-error weight steps; put it before adaround), "
                        "adaround / adaround_conv (learned rounding of depthwise / all conv weights; put it "
                        "before bias), brecq (block reconstruction: adaround's rounding learned jointly per "
                        "residual / inverted-residual block or transformer sublayer on the block's output; put it "
                        "before bias), brecq_fisher (brecq with the paper's diagonal-Fisher loss: each output "
                        "error weighted by how much it moves the network's output), brecq_lsq (brecq, then each "
                        "block's activation steps learned LSQ-style; hago compile only), brecq_sequential (brecq with "
                        "each block's input from the quantized network so far, as the reference code does; hago "
                        "compile only), "
                        "cle (cross-layer equalization through ReLU: rescales the FP32 weights "
                        "before calibration), bias_data_free (data-free bias correction from batch-norm "
                        "statistics), dfmpc (data-free compensation: a low-bit layer's error absorbed by the "
                        "next higher-bit layer's input-channel scales, from batch-norm statistics), lapq "
                        "(loss-aware post-training quantization: Lp-norm activation clips, then a joint Powell "
                        "search of all clips on the network loss; put it before bias), multipoint (multipoint "
                        "quantization: extra low-bit points for the output channels with the largest output "
                        "error, run as extra output channels of the same kernel, 10%% of a layer's channels; "
                        "dense and conv2d; after adaround/brecq, before bias) or none; default: bias")
    c.add_argument("-o", "--output", help="output folder for model.so, strategy.json, report.json")
    c.add_argument("--precision", default="int8",
                   help="int8 (default: integer where the spec allows) or bf16 (bf16 where the spec allows, fp32 "
                        "elsewhere; x86-avx512-bf16)")
    c.add_argument("--embedding-bits", type=int, default=None,
                   help="4: store embedding tables 4-bit row-wise (fp16 scale and bias per row; the lookup "
                        "dequantizes only the rows it reads), where the spec allows it; default: float32")
    c.add_argument("--batch", type=int, default=None,
                   help="batch size the library is built for; default: the model file's own batch (1 if symbolic)")
    c.add_argument("--no-measure", action="store_true", help="skip latency measurement")
    c.add_argument("--rpc", help="tracker host:port: measure on the device registered under --key")
    c.add_argument("--key", help="RPC device key (e.g. rpi4)")
    c.add_argument("--measure-timeout", type=float, default=60.0)
    c.add_argument("--tune-trials", type=int, default=0,
                   help="MetaSchedule trials per task (FP32 and INT8 alike); 0 only reuses cached schedules")
    c.add_argument("--cache-dir", help="tuning records; default $HAGO_CACHE_DIR or ~/.cache/hago/tuning")
    c.set_defaults(func=_cmd_compile)

    s = sub.add_parser("search", help="find the fastest strategy that meets an accuracy target")
    s.add_argument("model", help="an ONNX file")
    s.add_argument("--device", required=True)
    _search_options(s)
    s.add_argument("--log", help="search log (JSONL); default OUT/search.jsonl")
    s.add_argument("--resume", help="resume the search recorded in this log")
    s.set_defaults(func=_cmd_search)

    b = sub.add_parser("bench", help="compare strategies (fp32, int8, search) on a device")
    b.add_argument("model")
    b.add_argument("--device", required=True)
    b.add_argument("--strategies", default="fp32,int8,search", help="any of fp32, int8, bf16, search")
    _search_options(b)
    b.set_defaults(func=_cmd_bench)

    # hago qat: quantization-aware training (hago.qat); its outputs replay with hago compile --strategy
    q = sub.add_parser("qat", help="train a torch model with fake quantization, --method saq (sharpness-aware, "
                                   "SAQ) or qat, and write model.onnx + strategy.json for hago compile --strategy")
    q.add_argument("--model", default="hago.zoo:mnist_cnn", help="MODULE:FUNCTION returning the torch model")
    q.add_argument("--weights", help=".npz state dict of FP32 weights (arrays keyed by parameter name)")
    q.add_argument("--data", required=True, help=".npz training data with 'input' and 'label'")
    q.add_argument("--eval", help=".npz with 'input' and 'label': report the fake-quant accuracy")
    q.add_argument("--device", required=True, help="the spec the strategy is for (hago devices)")
    q.add_argument("--method", choices=("saq", "qat"), default="saq",
                   help="saq: SAM perturbation on the quantized weights (Liu et al. 2021); qat: plain QAT")
    q.add_argument("--bits", type=int, choices=(4, 8), default=4, help="weight and activation bits (input: 8)")
    q.add_argument("--grid", choices=("zero", "odd"), default="zero",
                   help="4-bit weight grid: zero (-7..7, packed 4-bit) or odd (SAQ's, realized as 5-bit codes)")
    q.add_argument("--steps", type=int, default=500)
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--lr", type=float, default=0.01)
    q.add_argument("--rho", type=float, default=0.05,
                   help="SAQ's perturbation radius (the paper's 0.3 is for standardized weights)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("-o", "--output", required=True, help="output folder for model.onnx, strategy.json, qat.json")
    q.set_defaults(func=lambda args: __import__("hago.qat.command", fromlist=["run"]).run(args))
    return p


def _say(message: str) -> None:
    print(f"hago: error: {' '.join(message.split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return args.func(args)
    except HagoError as e:
        if debug:
            raise
        _say(str(e))
        return 2
    except Exception as e:  # the last line of defence: the real fix belongs where it was raised
        if debug:
            raise
        _say(f"internal error: {error_line(e, 'first', 300, with_type=True)} (re-run with --debug for the traceback)")
        return 2


if __name__ == "__main__":
    sys.exit(main())
