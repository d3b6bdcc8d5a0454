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


def _cmd_compile(args) -> int:
    from .compile import compile as hago_compile
    from .report import print_report

    result = hago_compile(
        args.model,
        args.device,
        args.calib,
        eval_data=args.eval,
        out_dir=args.output,
        strategy=args.strategy,
        calibrator=args.calibrator,
        measure=not args.no_measure,
    )
    print_report(result.report)
    if args.output:
        Console().print(f"wrote {args.output}/model.so, strategy.json, report.json")
    return 0


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
    c.add_argument("-o", "--output", help="output folder for model.so, strategy.json, report.json")
    c.add_argument("--no-measure", action="store_true", help="skip latency measurement")
    c.set_defaults(func=_cmd_compile)
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
