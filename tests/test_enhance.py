"""The display presets: each step changes the image the way a PACS user expects, and none changes its input."""

import numpy as np
import pytest

from tasks.enhance import enhance, Enhancement, WINDOWS


def ramp(low: int = 0, high: int = 255, side: int = 64) -> np.ndarray:
    return np.tile(np.linspace(low, high, side).round().astype(np.uint8), (side, 1))


def test_no_preset_is_the_identity_and_the_input_is_left_alone():
    image = ramp()
    before = image.copy()
    np.testing.assert_array_equal(enhance(image, Enhancement()), image)
    enhance(image, Enhancement(window="bone", clahe=True, unsharp=True, gamma=0.5))
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("name", [name for name, window in WINDOWS.items() if window is not None])
def test_a_window_spans_black_to_white_over_its_range_and_clips_outside(name):
    window = WINDOWS[name]
    low, high = window.level - window.width / 2, window.level + window.width / 2
    values = np.array([[0, int(np.ceil(low)), int(window.level), int(np.floor(high)), 255]], dtype=np.uint8)
    out = enhance(values, Enhancement(window=name))[0]
    assert out[0] == 0 and out[1] <= 2 and abs(int(out[2]) - 128) <= 2 and out[3] >= 253 and out[4] == 255


def test_the_lung_window_shows_the_dark_range_and_the_bone_window_the_bright_one():
    dark, bright = np.full((8, 8), 60, np.uint8), np.full((8, 8), 210, np.uint8)
    assert enhance(dark, Enhancement(window="lung")).mean() > 60
    assert enhance(dark, Enhancement(window="bone")).mean() == 0
    assert enhance(bright, Enhancement(window="lung")).mean() == 255
    assert enhance(bright, Enhancement(window="bone")).mean() < 255


def test_clahe_and_unsharp_raise_local_contrast_and_gamma_moves_the_mid_tones():
    rng = np.random.default_rng(0)
    flat = (120 + rng.integers(0, 8, (64, 64))).astype(np.uint8)  # a low-contrast film
    assert enhance(flat, Enhancement(clahe=True)).std() > 2 * flat.std()
    edge = np.zeros((32, 32), np.uint8)
    edge[:, 16:] = 100
    sharpened = enhance(edge, Enhancement(unsharp=True)).astype(int)
    assert sharpened[:, 16].mean() > 100 and sharpened[:, 15].mean() < 1  # overshoot either side of the edge
    mid = np.full((4, 4), 128, np.uint8)
    assert enhance(mid, Enhancement(gamma=0.5)).mean() > 170 and enhance(mid, Enhancement(gamma=2.0)).mean() < 80


def test_bad_settings_and_images_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown window preset 'brain'"):
        Enhancement(window="brain")
    with pytest.raises(ValueError, match="gamma must be positive"):
        Enhancement(gamma=0)
    with pytest.raises(ValueError, match="uint8"):
        enhance(np.zeros((4, 4), np.float32), Enhancement())
