"""Tiny PyTorch models of the shapes users bring, exported to ONNX at test time the usual way.

Shared by ``test_ops_fallback.py`` (one op pattern per model) and
``test_corpus.py`` (whole small nets). Weights are random (seeded); every
model is small enough to compile in seconds on two cores.

:func:`export_onnx` is what a user runs: ``torch.onnx.export(..., dynamo=False)``
with a dynamic batch ``N`` by default; ``static=True`` exports the example's
batch (1) as most files in the wild have it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CROSS_CXX = "aarch64-linux-gnu-g++"
#: why rpi4 builds are skipped here, or None when the aarch64 toolchain is installed
NO_ARM_TOOLCHAIN = (None if shutil.which(CROSS_CXX)
                    else f"{CROSS_CXX} not installed: make install (tools/install_arm.sh)")
EM_AARCH64 = 183
FP32_TOL = 1e-4  # TVM FP32 vs ONNX Runtime (fast erf/exp/tanh approximations are ~1e-6 relative)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, *, static: bool = False) -> Path:
    """``torch.onnx.export`` as users call it.

    ``static=False``: the TorchScript exporter with input ``x``, output ``y``
    and a dynamic batch ``N``. ``static=True``: ``torch.onnx.export(model,
    (x,), path)`` with every default (the dynamo exporter, the example's
    batch of 1 in every shape, weights in an external ``.data`` file); its
    input is named after ``forward``'s argument, ``x`` in every model here.
    """
    import contextlib
    import io

    model.eval()
    if static:
        with contextlib.redirect_stdout(io.StringIO()):  # the dynamo exporter's progress lines
            torch.onnx.export(model, (example,), str(path))
    else:
        torch.onnx.export(model, (example,), str(path), input_names=["x"], output_names=["y"], dynamo=False,
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return path


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's output for ``x``, one sample at a time (so static batch-1 files work too)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": np.ascontiguousarray(s[None])})[0] for s in x])


def run_build(executable, xs: np.ndarray) -> np.ndarray:
    """Run a batch-1 build over ``xs`` one sample at a time."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    return np.concatenate([vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x[None]))).numpy() for x in xs])


def is_aarch64_elf(path: Path) -> bool:
    head = Path(path).read_bytes()[:20]
    return head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == EM_AARCH64


@dataclass
class Case:
    """A model, its example input shape, and how to draw inputs for it."""

    make: object  # () -> nn.Module
    shape: tuple
    dtype: str = "float32"
    high: int = 0  # int inputs: token ids in [0, high)
    expect: dict = field(default_factory=dict)

    def samples(self, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        if self.dtype == "int64":
            return rng.integers(0, self.high, (n, *self.shape[1:])).astype(np.int64)
        return rng.standard_normal((n, *self.shape[1:])).astype(np.float32)

    def export(self, path: Path, *, static: bool = False, seed: int = 0) -> Path:
        torch.manual_seed(seed)
        model = self.make().eval()
        _randomize_norm_stats(model)
        example = torch.from_numpy(self.samples(1, seed=seed + 1))
        return export_onnx(model, example, path, static=static)


def _randomize_norm_stats(model: nn.Module) -> None:
    """Give batch norms non-trivial statistics, so folding them is actually exercised."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)


# --------------------------------------------------------------------------- op patterns

class ConvAct(nn.Module):
    """conv -> activation: the conv is integer, the activation is what is under test."""

    def __init__(self, act: nn.Module, cin: int = 4, cout: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x))


class TokenAct(nn.Module):
    """dense -> op on ``[N, T, C]`` tokens (transformer element-wise and normalisation ops)."""

    def __init__(self, op: nn.Module, c: int = 16):
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.op = op

    def forward(self, x):
        return self.op(self.fc(x))


class SqueezeExcite(nn.Module):
    """MobileNetV3's squeeze-excite: global pool, two 1x1 convs, hardsigmoid gate."""

    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class ConvSE(nn.Module):
    """conv + ReLU6, squeeze-excite, 1x1 project: an inverted residual's tail, as MobileNetV3 has it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.se = SqueezeExcite(8)
        self.project = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.project(self.se(F.relu6(self.conv(x))))


class PaddedConv(nn.Module):
    """TF-style "same" padding of a stride-2 conv: an explicit asymmetric zero pad (EfficientNet ports)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2)

    def forward(self, x):
        return F.relu(self.conv(F.pad(x, (0, 1, 0, 1))))


class Upsample(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.mode = mode

    def forward(self, x):
        extra = {} if self.mode == "nearest" else {"align_corners": False}
        return F.interpolate(self.conv(x), scale_factor=2, mode=self.mode, **extra)


class ChannelSplit(nn.Module):
    """ShuffleNetV2's unit: ``chunk`` the channels in two (ONNX ``Split``), convolve one half, join, shuffle."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 1)
        self.out = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        a, b = F.relu(self.conv(x)).chunk(2, dim=1)
        y = torch.cat([a, F.relu(self.branch(b))], dim=1)
        y = y.reshape(-1, 2, 4, 8, 8).transpose(1, 2).reshape(-1, 8, 8, 8)  # channel shuffle
        return self.out(y)


class BiasFreeHead(nn.Module):
    """A classifier whose last layer is a bias-free ``Linear``: the model's output is the matmul itself."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10, bias=False)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


class ConvTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        return self.up(F.relu(self.conv(x)))


class Conv1dNet(nn.Module):
    """Two Conv1d layers (stride, padding, a max pool) and a 1-D output."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, x):
        return F.relu(self.c2(F.max_pool1d(F.relu(self.c1(x)), 2)))


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.act = nn.PReLU(12)

    def forward(self, x):
        return self.act(self.g(F.relu(self.c1(x))))


class EinsumTranspose(nn.Module):
    """An op TVM's importer emits as its own PrimFunc (``einsum``), between two integer convs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.c2(torch.einsum("nchw->ncwh", F.relu(self.c1(x))) + 1.0)


class Recurrent(nn.Module):
    def __init__(self, cell: type):
        super().__init__()
        self.rnn = cell(16, 8, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


IMG = (1, 4, 8, 8)
TOK = (1, 5, 16)

# expect: "fallback" = relax ops that must appear among float_ops reasons; "float_ops" = exact number
PATTERNS: dict[str, Case] = {
    "relu6": Case(lambda: ConvAct(nn.ReLU6()), IMG, expect={"float_ops": 0}),
    "hardsigmoid": Case(lambda: ConvAct(nn.Hardsigmoid()), IMG, expect={"fallback": ["relax.multiply"]}),
    "hardswish": Case(lambda: ConvAct(nn.Hardswish()), IMG, expect={"fallback": ["relax.multiply"]}),
    # torch.onnx.export writes SiLU as x * sigmoid(x): one nn.silu, applied in the conv's requantize
    "silu": Case(lambda: ConvAct(nn.Sequential(nn.SiLU(), nn.Conv2d(8, 4, 1))), IMG,
                 expect={"float_ops": 0, "integer": ["silu"]}),
    "prelu": Case(lambda: ConvAct(nn.PReLU(8)), IMG, expect={"fallback": ["relax.nn.prelu"]}),
    "leakyrelu": Case(lambda: ConvAct(nn.LeakyReLU(0.1)), IMG, expect={"fallback": ["relax.nn.leakyrelu"]}),
    "gelu_erf": Case(lambda: TokenAct(nn.GELU()), TOK, expect={"fallback": ["relax.nn.gelu"]}),
    "layernorm": Case(lambda: TokenAct(nn.LayerNorm(16)), TOK, expect={"fallback": ["relax.nn.layer_norm"]}),
    "softmax": Case(lambda: TokenAct(nn.Softmax(-1)), TOK, expect={"fallback": ["relax.nn.softmax"]}),
    # the pool and the gate's multiply run on the codes; the hardsigmoid gate itself is float
    "squeeze_excite": Case(ConvSE, IMG, expect={"fallback": ["relax.multiply", "relax.add"],
                                                "integer": ["global_avg_pool2d", "multiply"]}),
    "same_pad": Case(PaddedConv, IMG, expect={"float_ops": 0}),  # pads from Shape ops: hago.onnx_prep folds them
    "resize_nearest": Case(lambda: Upsample("nearest"), IMG, expect={"fallback": ["relax.image.resize2d"]}),
    "resize_bilinear": Case(lambda: Upsample("bilinear"), IMG, expect={"fallback": ["relax.image.resize2d"]}),
    # dynamic-batch TorchScript export: TVM's importer gives the Split's parts no shape, so hago pins the batch
    "channel_split": Case(ChannelSplit, IMG, expect={"fallback": ["relax.strided_slice"],
                                                     "note": "imported at batch 1"}),
    "bias_free_head": Case(BiasFreeHead, IMG, expect={"float_ops": 0}),
    "conv_transpose": Case(ConvTranspose, IMG, expect={"fallback": ["relax.nn.conv2d_transpose"]}),
    "conv1d": Case(Conv1dNet, (1, 4, 32), expect={"float_ops": 1}),  # the input's expand_dims (float input)
    "grouped_conv": Case(GroupedConv, IMG, expect={"fallback": ["relax.nn.prelu"]}),
    "importer_helper": Case(EinsumTranspose, IMG, expect={"fallback": ["call_tir einsum"]}),
}


# --------------------------------------------------------------------------- corpus models

class MobileNetV3Block(nn.Module):
    """Stem (conv, BN, hardswish), then an inverted residual: 1x1 expand + hardswish, depthwise + ReLU6,
    squeeze-excite (hardsigmoid gate), 1x1 project, skip add; pooled linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.se = SqueezeExcite(16)
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.se(self.dw(self.expand(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.dk = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        n, t, d = x.shape
        split = lambda y: y.reshape(n, t, self.heads, self.dk).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / self.dk**0.5, dim=-1)
        return self.o((a @ v).transpose(1, 2).reshape(n, t, d))


class TransformerLayer(nn.Module):
    """Post-norm (BERT) or pre-norm (ViT) encoder layer: attention, LayerNorm, GELU MLP."""

    def __init__(self, d: int = 32, heads: int = 2, pre_norm: bool = False):
        super().__init__()
        self.attn = _Attention(d, heads)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.pre_norm = pre_norm

    def forward(self, x):
        if self.pre_norm:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class TinyViT(nn.Module):
    """Patch embedding (conv 4x4 stride 4), position embedding, one pre-norm block, mean-pool head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, 16, 32) * 0.1)
        self.block = TransformerLayer(32, 2, pre_norm=True)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.block(t)).mean(1))


class UNetDecoder(nn.Module):
    """Encoder conv, strided down conv, ConvTranspose up, concat with the skip, conv, 1x1 head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e = self.enc(x)
        return self.head(self.dec(torch.cat([self.up(self.down(e)), e], dim=1)))


class AudioCNN(nn.Module):
    """Conv1d / BatchNorm1d / ReLU / pools over a raw waveform, a grouped Conv1d, global pool, linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(1, 8, 9, stride=2, padding=4), nn.BatchNorm1d(8)
        self.c2, self.b2 = nn.Conv1d(8, 16, 5, padding=2), nn.BatchNorm1d(16)
        self.c3 = nn.Conv1d(16, 16, 3, padding=1, groups=4)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.max_pool1d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool1d(F.relu(self.b2(self.c2(x))), 2)
        x = F.relu(self.c3(x))
        return self.fc(F.adaptive_avg_pool1d(x, 1).flatten(1))


class EmbeddingClassifier(nn.Module):
    def __init__(self, vocab: int = 50):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.emb(x).mean(1))))


class GroupedPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.PReLU(16))
        self.grouped = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.PReLU(16))
        self.head = nn.Linear(16, 6)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.grouped(self.stem(x)), 1).flatten(1))


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return F.relu(self.c2(self.c1(x)) + self.skip(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.layers = nn.Sequential(_Basic(16, 16, 1), _Basic(16, 32, 2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


# expect: "fallback" = relax ops among float_ops reasons; "integer" = spec kinds whose nodes must all be integer;
# "refused" = the one-line import error's text
CORPUS: dict[str, Case] = {
    "mobilenetv3_block": Case(MobileNetV3Block, (1, 3, 16, 16),
                              expect={"fallback": ["relax.multiply"], "integer": ["depthwise_conv2d"]}),
    "vit_block": Case(TinyViT, (1, 3, 16, 16),
                      expect={"fallback": ["relax.nn.layer_norm", "relax.nn.softmax", "relax.nn.gelu"]}),
    "bert_layer": Case(lambda: TransformerLayer(32, 2), (1, 8, 32),
                       expect={"fallback": ["relax.nn.layer_norm", "relax.nn.softmax", "relax.nn.gelu"]}),
    "unet_decoder": Case(UNetDecoder, (1, 3, 16, 16), expect={"fallback": ["relax.nn.conv2d_transpose"]}),
    "audio_cnn": Case(AudioCNN, (1, 1, 256), expect={"integer": ["conv2d"]}),
    "lstm_classifier": Case(lambda: Recurrent(nn.LSTM), (1, 6, 16), expect={"refused": "LSTM"}),
    "embedding_classifier": Case(EmbeddingClassifier, (1, 12), dtype="int64", high=50,
                                 expect={"fallback": ["relax.take"], "integer": ["dense"]}),
    "grouped_conv_prelu": Case(GroupedPReLU, (1, 3, 16, 16),
                               expect={"fallback": ["relax.nn.prelu"], "integer": ["conv2d"]}),
    "resnet_small": Case(TinyResNet, (1, 3, 16, 16), expect={"integer": ["conv2d", "add"]}),
}
