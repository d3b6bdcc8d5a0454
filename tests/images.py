"""Synthetic test images shared by the correction tests."""

from __future__ import annotations

import numpy as np


def smooth_images(n: int, seed: int, noise: float = 0.1) -> np.ndarray:
    """``[n, 3, 16, 16]`` float32: positive 4x4 blocks upsampled, plus Gaussian noise.

    Smooth and positive, so a layer's input mean is far from zero and rounding its
    weights shifts its output mean (what bias correction and AdaRound must fix).
    """
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (n, 3, 4, 4)).astype(np.float32)
    return np.repeat(np.repeat(base, 4, axis=2), 4, axis=3) + noise * rng.standard_normal((n, 3, 16, 16)).astype(
        np.float32)
