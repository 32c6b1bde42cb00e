"""Display enhancement as PACS users know it, for real and generated images alike (uint8 [R, R], bone bright).

Window level/width presets, CLAHE, unsharp masking and gamma, each from scikit-image. The images are already
windowed to uint8 at ingest (tasks/data/dicom.py), so the presets' level and width are on that 0..255 display
scale: the lung window spreads the dark (air-filled) part of the range, the mediastinum window the middle, the bone
window the bright end. The steps run in a fixed order: window, CLAHE, unsharp mask, gamma.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage import exposure, filters
from skimage.util import img_as_float, img_as_ubyte


@dataclass(frozen=True)
class Window:
    level: float  # the centre of the shown range, on the 0..255 scale
    width: float  # the shown range: level - width / 2 .. level + width / 2 spans black to white


WINDOWS: dict[str, Window | None] = {
    "none": None,
    "lung": Window(level=90, width=160),
    "mediastinum": Window(level=160, width=120),
    "bone": Window(level=200, width=110),
}


@dataclass(frozen=True)
class Enhancement:
    window: str = "none"  # a key of WINDOWS
    clahe: bool = False
    clahe_clip: float = 0.01  # skimage's clip_limit (0..1): higher, more local contrast
    unsharp: bool = False
    unsharp_radius: float = 2.0  # the Gaussian's sigma, in pixels
    unsharp_amount: float = 1.0
    gamma: float = 1.0  # below 1 brightens the dark range, above 1 darkens it

    def __post_init__(self):
        if self.window not in WINDOWS:
            raise ValueError(f"unknown window preset {self.window!r}; expected one of {sorted(WINDOWS)}")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be positive, got {self.gamma}")


def enhance(image: np.ndarray, settings: Enhancement) -> np.ndarray:
    """One uint8 [R, R] image through the settings' steps; uint8 [R, R] back (the input is not changed)."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a uint8 [R, R] image, got {image.dtype} {list(image.shape)}")
    out = img_as_float(image)
    window = WINDOWS[settings.window]
    if window is not None:
        low, high = (window.level - window.width / 2) / 255, (window.level + window.width / 2) / 255
        out = exposure.rescale_intensity(out, in_range=(low, high), out_range=(0.0, 1.0))
    if settings.clahe:
        out = exposure.equalize_adapthist(out, clip_limit=settings.clahe_clip)
    if settings.unsharp:
        out = filters.unsharp_mask(out, radius=settings.unsharp_radius, amount=settings.unsharp_amount)
    if settings.gamma != 1.0:
        out = exposure.adjust_gamma(out, settings.gamma)
    return img_as_ubyte(np.clip(out, 0.0, 1.0))
