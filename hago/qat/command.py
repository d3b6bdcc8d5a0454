"""``hago qat``: train a torch model with plain QAT or SAQ, write ``model.onnx`` and ``strategy.json``.

The model is named by a Python factory (``package.module:function``, called
with no arguments), optionally with FP32 weights from an ``.npz`` state dict
(arrays keyed by parameter name): no pickle is ever loaded. The data is an
``.npz`` with ``input`` and ``label`` (``hago.zoo.export_mnist_demo``'s
``eval.npz`` layout). The outputs replay with
``hago compile OUT/model.onnx --device D --strategy OUT/strategy.json``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np

from hago.errors import DataError, FrontendError


def load_factory_model(spec: str, weights: str | None):
    """``module:function()`` as an nn.Module, its state dict replaced from ``weights`` (.npz) if given."""
    import torch

    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise FrontendError(f"--model must be MODULE:FUNCTION (e.g. hago.zoo:mnist_cnn), got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise FrontendError(f"--model {spec}: {e}") from None
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise FrontendError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        with np.load(weights, allow_pickle=False) as z:
            state = {k: torch.from_numpy(z[k]) for k in z.files}
        model.load_state_dict(state)
    return model.eval()


def load_labelled(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        if "input" not in z.files or "label" not in z.files:
            raise DataError(f"{path} must hold 'input' and 'label' arrays, has {', '.join(z.files)}")
        return np.asarray(z["input"], np.float32), np.asarray(z["label"], np.int64)


def run(args) -> int:
    """The ``hago qat`` command (arguments from :func:`hago.cli.build_parser`)."""
    import torch

    from .export import export
    from .layers import QuantConfig, quantize_model
    from .train import TrainConfig, logits_of, top1, train

    model = load_factory_model(args.model, args.weights)
    x, y = load_labelled(args.data)
    config = QuantConfig(weight_bits=args.bits, act_bits=args.bits, input_bits=8, grid=args.grid)
    model = quantize_model(model, torch.from_numpy(x[:256]), config)
    losses = train(model, x, y, TrainConfig(method=args.method, steps=args.steps, batch=args.batch_size,
                                            lr=args.lr, rho=args.rho, seed=args.seed))
    out = Path(args.output)
    onnx_path, strategy_path = export(model, torch.from_numpy(x[:1]), out, args.device, method=args.method,
                                      calib=x[:256])  # for edges no trained layer reads (residual adds)
    summary = {"method": args.method, "bits": args.bits, "grid": args.grid, "steps": args.steps,
               "final_loss": float(np.mean(losses[-20:]))}
    if args.eval:
        xe, ye = load_labelled(args.eval)
        summary["fake_quant_accuracy"] = top1(logits_of(model, xe), ye)
    (out / "qat.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {onnx_path}, {strategy_path} ({json.dumps(summary)}); build it with: hago compile {onnx_path} "
          f"--device {args.device} --strategy {strategy_path}")
    return 0
