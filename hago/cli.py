"""The ``hago`` command line, in tvmc's tradition.

    hago devices
    hago spec check FILE
    hago compile MODEL --device NAME --calib DATA [--eval DATA] [--strategy S.json] -o OUT/

A :class:`~hago.errors.HagoError` prints one line and exits 2; a traceback
appears only with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console

from .errors import HagoError
from .search.target import SearchError

log = logging.getLogger("hago")


def _cmd_devices(args) -> int:
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
    from .search.measure import RPCMeasurer

    if not args.key:
        raise SearchError("--rpc needs --key (the device key the board registered with the tracker)")
    from .hwspec import HardwareSpec

    kind = HardwareSpec.load(args.device).target.get("kind", "llvm")
    return RPCMeasurer(args.rpc, args.key, timeout_s=args.measure_timeout, device="cuda" if kind == "cuda" else "cpu")


def _corrections(text: str | None):
    """``--corrections bias`` -> ["bias"]; ``none`` -> []; absent -> None (hago's default)."""
    if text is None:
        return None
    return [] if text.strip() in ("", "none") else [c.strip() for c in text.split(",") if c.strip()]


def _cmd_compile(args) -> int:
    from .compile import compile as hago_compile
    from .hwspec import HardwareSpec
    from .report import print_report
    from .tune import TuneOptions

    spec = HardwareSpec.load(args.device)
    tune = None
    if spec.target.get("kind") != "cuda":  # GPU kernels are hand-scheduled; MetaSchedule there needs a GPU
        tune = TuneOptions.for_spec(spec, args.tune_trials, args.cache_dir, tracker=args.rpc,
                                    progress=sys.stderr.isatty())

    result = hago_compile(
        args.model,
        args.device,
        args.calib,
        eval_data=args.eval,
        out_dir=args.output,
        strategy=args.strategy,
        calibrator=args.calibrator,
        corrections=_corrections(args.corrections),
        measure=not args.no_measure,
        measurer=_rpc_measurer(args),
        tune=tune,
    )
    print_report(result.report)
    if args.output:
        Console().print(f"wrote {args.output}/model.so, strategy.json, report.json")
    return 0


def _engine_options(args) -> dict:
    opts = dict(accuracy_drop=args.accuracy_drop, max_trials=args.max_trials, time_budget=args.time_budget,
                calibrator=args.calibrator)
    if args.corrections is not None:
        opts["corrections"] = _corrections(args.corrections)
    if args.rpc:
        opts["measurer"] = _rpc_measurer(args)
    else:
        from . import build as build_mod
        from .hwspec import HardwareSpec
        from .search.measure import LocalMeasurer

        spec = HardwareSpec.load(args.device)
        if build_mod.is_local(spec):  # otherwise the engine says clearly that --rpc is needed
            opts["measurer"] = LocalMeasurer(timeout_s=args.measure_timeout, threads=spec.cores)
    return opts


def _cmd_search(args) -> int:
    from .search.run import print_search, search

    result = search(args.model, args.device, args.calib, args.eval, out_dir=args.output, algorithm=args.algorithm,
                    log_path=args.resume or args.log, **_engine_options(args))
    print_search(result)
    if args.output and result.best is not None:
        Console().print(f"wrote {args.output}/model.so, strategy.json, report.json, pareto.json, pareto.png")
    return 0 if result.best is not None else 1


def _cmd_bench(args) -> int:
    from .bench import bench

    bench(args.model, args.device, args.calib, args.eval, args.strategies.split(","), args.output,
          engine_options=_engine_options(args), algorithm=args.algorithm)
    return 0


def _search_options(p) -> None:
    p.add_argument("--calib", required=True, help=".npz of calibration arrays keyed by input name")
    p.add_argument("--eval", required=True, help=".npz evaluation set; with 'label' the metric is top-1")
    p.add_argument("--accuracy-drop", default="1%", help="'1%%' relative or '0.5pt' absolute, against FP32")
    p.add_argument("--algorithm", default="evolve", help="evolve | latency | greedy (HAGO's baseline)")
    p.add_argument("--max-trials", type=int, default=16, help="device measurements at most")
    p.add_argument("--time-budget", type=float, default=None, help="seconds at most")
    p.add_argument("--calibrator", default="mse")
    p.add_argument("--corrections", default=None,
                   help="corrections every candidate gets, comma separated: bias (default), adaround,bias, "
                        "adaround_conv,bias or none (per-layer ones only)")
    p.add_argument("--rpc", help="tracker host:port; measure on the board registered under --key")
    p.add_argument("--key", help="RPC device key")
    p.add_argument("--measure-timeout", type=float, default=60.0, help="seconds before a measurement is failed")
    p.add_argument("-o", "--output", help="output folder")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hago", description="hardware-aware post-training quantization on TVM")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("devices", help="list the hardware specs").set_defaults(func=_cmd_devices)

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
                        "adaround / adaround_conv (learned rounding of depthwise / all conv weights; put it "
                        "before bias) or none; default: bias")
    c.add_argument("-o", "--output", help="output folder for model.so, strategy.json, report.json")
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
    b.add_argument("--strategies", default="fp32,int8,search")
    _search_options(b)
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except HagoError as e:
        if args.debug:
            raise
        print(f"hago: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
