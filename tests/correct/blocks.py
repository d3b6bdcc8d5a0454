"""The 4-bit block case the rounding tests share: one small net quantized under several corrections."""

from __future__ import annotations

import torch

from hago.annotate import AnnotateConfig
from hago.compiler import quantize
from hago.frontend import load_model
from images import smooth_images

DEVICE = "x86-avx512-vnni"


def block_case(net, images: int, corrections, run_tvm):
    """``(net, test, ref, q, out)``: ``net`` quantized at 4-bit weights on ``images`` smooth calibration
    images under each tuple of ``corrections`` (``q[c]``), and the realized programs' outputs (``out[c]``)
    and FP32's (``ref``) on as many other images (``test``)."""
    calib, test = smooth_images(images, 1, noise=0.2), smooth_images(images, 2, noise=0.2)
    mod = load_model(net, example_inputs=(torch.from_numpy(calib[:2]),))
    cfg = AnnotateConfig(weight_bits=4)
    q = {c: quantize(mod, DEVICE, calib, annotate_config=cfg, corrections=c, batch_size=32) for c in corrections}
    with torch.no_grad():
        ref = net(torch.from_numpy(test)).numpy()
    return net, test, ref, q, {c: run_tvm(v.realized.mod, test) for c, v in q.items()}
