"""A procedural chest radiograph: anatomy and findings drawn as projected densities, pure numpy/scipy.

The picture is built in "density" (tissue thickness along the beam, soft-tissue units): a body of soft tissue,
lungs that replace tissue with air, heart and mediastinum, bones, then findings that add density (fluid, airspace
opacity, nodules) or remove it (pneumothorax, air bronchograms). Display follows film: a sigmoid of density, so
air is black and bone white. Coordinates are normalised: x across the patient (-1 = image left = patient's right,
as radiographs are read), y from head (-1) to feet (+1); on a lateral view x runs anterior (-) to posterior (+).
Anatomy is drawn on a grid of at most WORK_SIZE pixels and upsampled (smooth fields come from even smaller grids);
noise and detector blur are added at the full size, so a 1024 px image costs little more than a 512 px one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from scipy import ndimage

from tasks.demo.reports import Finding

WORK_SIZE = 384  # longer side of the grid anatomy is drawn on
SEVERITY_LEVEL = {"mild": 0, "moderate": 1, "severe": 2}
ZONE_Y = {"upper": -0.36, "middle": -0.08, "lower": 0.18}  # centre height of a focal finding's lung zone
# Size of a finding by severity level (normalised units).
EFFUSION_HEIGHT = (0.09, 0.2, 0.36)
AIRSPACE_EXTENT = (0.13, 0.19, 0.27)
LESION_RADIUS = (0.03, 0.05, 0.09)  # nodule, larger nodule, mass


@dataclass(frozen=True)
class Anatomy:
    """One patient on one day: the subject's build plus the study's positioning and exposure."""

    scale: float  # patient size relative to the field of view
    width: float  # chest width factor (broad vs. narrow thorax)
    heart: float  # heart size factor, 1.0 = normal cardiothoracic ratio
    inspiration: float  # 0 = poor (high domes), 1 = deep
    rotation: float  # radians, in-plane tilt
    shift_x: float
    shift_y: float
    female: bool
    exposure: float  # shifts the film curve: >0 darker (over-exposed)
    contrast: float  # film curve steepness
    noise: float  # quantum noise level
    seed: int  # texture (vessels, tissue) of this patient


def sample_anatomy(subject_rng: np.random.Generator, study_rng: np.random.Generator, portable: bool,
                   female: bool) -> Anatomy:
    """Build from the subject (stable across their studies); positioning and exposure from the study."""
    return Anatomy(
        scale=subject_rng.uniform(0.86, 1.0),
        width=subject_rng.uniform(0.92, 1.06),
        heart=subject_rng.uniform(0.9, 1.08),
        female=female,
        seed=int(subject_rng.integers(2**31)),
        inspiration=study_rng.uniform(0.0, 0.6) if portable else study_rng.uniform(0.45, 1.0),
        rotation=study_rng.normal(0, 0.045 if portable else 0.02),
        shift_x=study_rng.normal(0, 0.03),
        shift_y=study_rng.normal(0, 0.03) + (0.04 if portable else 0.0),
        exposure=study_rng.normal(0, 0.12),
        contrast=study_rng.uniform(0.85, 1.15) * (0.85 if portable else 1.0),
        noise=study_rng.uniform(0.6, 1.0) * (1.5 if portable else 1.0),
    )


def _smoothstep(edge0: float, edge1: float, v: np.ndarray) -> np.ndarray:
    t = np.clip((v - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _low_freq(rng: np.random.Generator, grid: int, shape: tuple[int, int]) -> np.ndarray:
    """Smooth random field (zero mean, unit-ish std) upsampled from a grid x grid lattice."""
    small = rng.standard_normal((grid, grid)).astype(np.float32)
    return ndimage.zoom(small, (shape[0] / grid, shape[1] / grid), order=1, mode="nearest", grid_mode=True)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0):
    """Normalised squared radius of a rotated ellipse (<1 inside)."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    return ((dx * c + dy * s) / ax) ** 2 + ((-dx * s + dy * c) / ay) ** 2


def _ball(rho2: np.ndarray) -> np.ndarray:
    """Thickness profile of a sphere/cylinder seen in projection, from the normalised squared radius."""
    return np.sqrt(np.clip(1.0 - rho2, 0.0, None))


@lru_cache(maxsize=32)  # a patient's tree is the same on every image of theirs a worker renders
def _vessel_table(seed: int, n_r: int = 64, n_t: int = 720) -> np.ndarray:
    """Vascular tree around a hilum in polar coordinates: rows = radius (0..1), columns = angle.

    Trunks leave the hilum and branch outwards; each vessel keeps a roughly constant width in pixels and tapers.
    Each (vessel, radius) point is splatted as a short Gaussian in angle, so the table costs no per-pixel work."""
    rng = np.random.default_rng(seed)
    radius = np.linspace(0.0, 1.0, n_r)
    paths, alive, amps = [], [], []
    for _ in range(22):
        walk = rng.uniform(-np.pi, np.pi) + np.cumsum(rng.normal(0, 0.03, n_r))
        paths.append(walk)
        alive.append(np.ones(n_r, bool))
        amps.append(1.0)
        for _ in range(3):  # branches peel off the trunk further out
            at = int(rng.integers(n_r // 6, n_r * 2 // 3))
            branch = walk.copy()
            branch[at:] += rng.choice([-1, 1]) * np.cumsum(np.full(n_r - at, rng.uniform(0.008, 0.02)))
            branch[at:] += np.cumsum(rng.normal(0, 0.03, n_r - at))
            paths.append(branch)
            alive.append(np.arange(n_r) >= at)
            amps.append(0.7)
    path, alive = np.array(paths), np.array(alive)
    half = 16  # splat window in angle bins
    bins_per_rad = n_t / (2 * np.pi)
    width = np.clip(0.022 * (1.0 - 0.7 * radius) / (radius + 0.03) * bins_per_rad, 0.7, half / 2.5)
    centre = path * bins_per_rad
    offsets = np.arange(-half, half + 1)
    cols = np.floor(centre)[:, :, None] + offsets  # (vessels, radius, window)
    weight = np.exp(-(((cols - centre[:, :, None]) / width[None, :, None]) ** 2))
    weight *= (np.array(amps)[:, None] * np.clip(1.15 - radius, 0.0, 1.0)[None, :] * alive)[:, :, None]
    flat = np.arange(n_r)[None, :, None] * n_t + cols.astype(np.int64) % n_t
    table = np.bincount(flat.ravel(), weight.ravel(), minlength=n_r * n_t).reshape(n_r, n_t)
    return np.minimum(table, 1.5).astype(np.float32)


def _lookup_polar(table: np.ndarray, x: np.ndarray, y: np.ndarray, cx: float, cy: float, reach: float) -> np.ndarray:
    """Sample a polar table centred on (cx, cy); its last row lies `reach` away."""
    n_r, n_t = table.shape
    dx, dy = x - cx, y - cy
    r_idx = np.minimum((np.sqrt(dx * dx + dy * dy) / reach * (n_r - 1)).astype(np.int32), n_r - 1)
    t_idx = ((np.arctan2(dy, dx) + np.pi) * (n_t / (2 * np.pi))).astype(np.int32) % n_t
    return table[r_idx, t_idx]


class _Canvas:
    """Coordinate grids of one image (rows x columns pixels, the longer side spans -1..1) and the patient pose."""

    def __init__(self, rows: int, columns: int, anatomy: Anatomy, magnify: float):
        self.shape = (rows, columns)
        half = max(rows, columns) / 2
        u, v = np.meshgrid((np.arange(columns, dtype=np.float32) - columns / 2 + 0.5) / half,
                           (np.arange(rows, dtype=np.float32) - rows / 2 + 0.5) / half)
        c, s = np.cos(anatomy.rotation), np.sin(anatomy.rotation)
        scale = anatomy.scale * magnify
        u, v = u - anatomy.shift_x, v - anatomy.shift_y
        self.x = ((u * c + v * s) / (scale * anatomy.width)).astype(np.float32)
        self.y = ((-u * s + v * c) / scale).astype(np.float32)
        self.px = 1.0 / (half * scale)  # one pixel in normalised units


def _draw_curves(canvas: _Canvas, curves: list[np.ndarray], width: float) -> np.ndarray:
    """Rasterise polylines (arrays of (x, y) points, dense enough) as soft lines `width` units wide."""
    rows, columns = canvas.shape
    img = np.zeros(canvas.shape, np.float32)
    # The pose is affine: pixel (row, col) = origin + col * d_col + row * d_row in patient coordinates; invert it.
    origin = np.array([canvas.x[0, 0], canvas.y[0, 0]], np.float64)
    basis = np.array([[canvas.x[0, 1] - canvas.x[0, 0], canvas.x[1, 0] - canvas.x[0, 0]],
                      [canvas.y[0, 1] - canvas.y[0, 0], canvas.y[1, 0] - canvas.y[0, 0]]], np.float64)
    inverse = np.linalg.inv(basis)
    for points in curves:
        col, row = np.round(inverse @ (_resample(points, canvas.px * 0.7) - origin).T).astype(int)
        keep = (col >= 0) & (col < columns) & (row >= 0) & (row < rows)
        img[row[keep], col[keep]] = 1.0
    sigma = max(width / canvas.px / 2.5, 0.6)
    blurred = ndimage.gaussian_filter(img, sigma)
    return np.minimum(blurred * (sigma * 2.5), 1.0)


def _resample(points: np.ndarray, step: float) -> np.ndarray:
    seg = np.sqrt((np.diff(points, axis=0) ** 2).sum(1))
    dist = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.arange(0.0, dist[-1], step)
    return np.stack([np.interp(t, dist, points[:, 0]), np.interp(t, dist, points[:, 1])], axis=1)


def _bezier(*control: tuple[float, float], n: int = 64) -> np.ndarray:
    pts = np.array(control, dtype=np.float64)
    t = np.linspace(0, 1, n)[:, None]
    while len(pts) > 1:
        pts = np.stack([(1 - t) * pts[i] + t * pts[i + 1] for i in range(len(pts) - 1)])
    return pts[0]


# ----------------------------------------------------------------------------------------------------------------
# Frontal (PA / AP) view


def _lung(x: np.ndarray, y: np.ndarray, side: int, dome_top: float, cp_y: float, lateral: float) -> np.ndarray:
    """Air depth of one lung (0..1), side -1 = patient's right (image left). Apex rounded, domed base."""
    xs = x * side  # lateral is positive on both sides
    apex = -0.66
    reach = np.clip((y - apex) / 0.62, 0.0, 1.0) ** 0.45  # the lung widens below the apex, widest at the base
    lat_edge = 0.08 + (lateral - 0.08) * reach
    t = np.clip((xs - 0.05) / (lateral - 0.05), 0.0, 1.0)
    dome = dome_top + (cp_y - dome_top) * np.clip((t - 0.3) / 0.7, 0.0, 1.0) ** 1.6 - 0.04 * (1 - t) ** 2
    inside = (
        _smoothstep(0.0, 0.1, lat_edge - xs)
        * _smoothstep(0.0, 0.08, xs - 0.05)
        * _smoothstep(0.0, 0.06, dome - y)
        * _smoothstep(apex, apex + 0.1, y)
    )
    return np.sqrt(inside) * (0.8 + 0.2 * _smoothstep(apex, 0.0, y))


def _frontal(canvas: _Canvas, a: Anatomy, findings: dict[str, Finding], devices: tuple[str, ...],
             portable: bool, rng: np.random.Generator) -> np.ndarray:
    x, y, shape = canvas.x, canvas.y, canvas.shape
    tex_rng = np.random.default_rng(a.seed)
    sev = _severities(findings)

    # Soft tissue: neck, shoulders, chest wall, abdomen; breasts over the lower zones.
    half_width = np.interp(y, [-1.0, -0.82, -0.70, -0.58, 0.0, 0.6, 1.0], [0.17, 0.18, 0.86, 0.88, 0.86, 0.84, 0.82])
    body = 1.0 * _ball((x / half_width) ** 2)
    if a.female:
        for side in (-1, 1):
            body += 0.15 * _smoothstep(1.0, 0.6, _ellipse(x, y, side * 0.45, 0.3, 0.36, 0.24))

    inspire = 0.08 * (1.0 - a.inspiration)  # poor inspiration raises the domes
    cp_y = 0.52 + 0.04 * a.inspiration
    domes = {-1: 0.24 + inspire, 1: 0.29 + inspire}
    if "Atelectasis" in sev and sev["Atelectasis"] == 2:  # lobar collapse pulls the hemidiaphragm up
        domes[_sides(findings["Atelectasis"])[0]] -= 0.07

    lungs = {s: _lung(x, y, s, domes[s], cp_y + (domes[s] - domes[-1]), 0.74) for s in (-1, 1)}
    collapsed = {}
    if "Pneumothorax" in sev:
        for s in _sides(findings["Pneumothorax"]):
            # The collapsed lung is the lung shrunk towards the lower hilum; between it and the wall: air only.
            shrink = (0.16, 0.26, 0.42)[sev["Pneumothorax"]]
            px_, py_ = s * 0.12, 0.25
            collapsed[s] = _lung(px_ + (x - px_) / (1 - shrink), py_ + (y - py_) / (1 - shrink), s,
                                 domes[s], cp_y, 0.74)

    # Heart, mediastinum, aortic knob; the heart displaces lung.
    heart_scale = a.heart * (1.0 + 0.12 * portable)  # AP projection magnifies the heart
    if "Cardiomegaly" in sev:
        heart_scale *= 1.22 + 0.12 * sev["Cardiomegaly"]
    hx = 0.07 + 0.05 * (heart_scale - 1.0)
    heart_rho = _ellipse(x, y, hx, domes[1] - 0.13, 0.33 * heart_scale, 0.25 * min(heart_scale, 1.25), -0.5)
    heart = _ball(heart_rho)
    med_half = np.interp(y, [-1.0, -0.7, -0.35, -0.1, 0.3], [0.09, 0.1, 0.12, 0.14, 0.14])
    mediastinum = _smoothstep(0.02, -0.01, np.abs(x - 0.01) - med_half) * _smoothstep(0.45, 0.3, y)
    knob = _ball(_ellipse(x, y, 0.11, -0.33, 0.065, 0.06))
    solid = np.maximum.reduce([_smoothstep(1.0, 0.7, heart_rho), mediastinum, np.minimum(knob * 3, 1)])

    air = np.zeros(shape, np.float32)
    vessels = np.zeros(shape, np.float32)
    reach = 0.75
    for s in (-1, 1):
        table = _vessel_table(a.seed + s)
        lung = lungs[s] * (1 - solid)
        vessel = _lookup_polar(table, x, y, s * 0.06, -0.08, reach) * (x * s > 0)
        if s in collapsed:
            rim = lungs[s] * (1 - collapsed[s])
            pleural_line = _smoothstep(0.25, 0.45, collapsed[s]) * _smoothstep(0.75, 0.45, collapsed[s])
            vessel = vessel * collapsed[s]
            lung = lung + 0.45 * rim - 0.2 * collapsed[s]  # air only in the rim; the collapsed lung is denser
            vessels += 1.2 * pleural_line * (lungs[s] > 0.3)
        air += lung
        vessels += vessel * lungs[s]

    # Trachea and main bronchi (air), spine, ribs, clavicles, humeral heads (bone).
    trachea = _smoothstep(0.03, 0.018, np.abs(x - 0.005)) * _smoothstep(-0.95, -0.9, y) * _smoothstep(-0.28, -0.34, y)
    bone = _spine(x, y) + _ribs(x, y, a) + _clavicles(x, y)
    for s in (-1, 1):
        bone += 0.9 * _ball(_ellipse(x, y, s * 0.86, -0.67, 0.1, 0.11))

    # Gastric bubble under the left hemidiaphragm (patient's left = image right).
    bubble = _ball(_ellipse(x, y, 0.33, domes[1] + 0.13, 0.1, 0.06))

    density = 1.3 * body + 0.3 * heart + 0.2 * mediastinum - 0.8 * air - 0.3 * trachea - 0.4 * bubble
    engorged = 1 + 0.2 * (sev.get("Edema", -1) + 1)  # edema: prominent, indistinct vessels
    density += 0.55 * bone + 0.35 * vessels * engorged
    density += 0.05 * _low_freq(tex_rng, 12, shape) * (body > 0.1) + 0.04 * _low_freq(tex_rng, 48, shape) * air

    density += _frontal_findings(canvas, findings, sev, lungs, domes, cp_y, portable, rng)
    density += 1.4 * _devices(canvas, devices, domes[1])
    return density


def _severities(findings: dict[str, Finding]) -> dict[str, int]:
    """Present findings that have a severity (all but Support Devices), as 0, 1, 2."""
    return {name: SEVERITY_LEVEL[f.severity] for name, f in findings.items() if f.present and f.severity}


def _sides(finding: Finding) -> tuple[int, ...]:
    return {"right": (-1,), "left": (1,), "bilateral": (-1, 1)}.get(finding.side or "", (-1, 1))


def _spine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    column = _smoothstep(0.085, 0.06, np.abs(x)) * _smoothstep(-0.95, -0.85, y) * _smoothstep(0.9, 0.5, y)
    phase = (y + 1.0) / 0.085
    within = phase % 1.0
    endplates = 0.75 + 0.25 * (np.abs(within - 0.5) > 0.42)  # the detector blur softens these steps
    pedicles = (np.abs(np.abs(x) - 0.05) < 0.014) & (np.abs(within - 0.4) < 0.2)
    return column * (endplates * 0.3 + 0.25 * pedicles)


def _ribs(x: np.ndarray, y: np.ndarray, a: Anatomy) -> np.ndarray:
    """Posterior and anterior ribs as two families of parallel curved bands (one phase field each)."""
    xs = np.abs(x)
    t = np.clip((xs - 0.06) / 0.8, 0.0, 1.0)
    spacing = 0.098 + 0.012 * a.inspiration
    # Posterior ribs rise a little from the spine, then sweep down along the lateral chest wall.
    post = (y + 0.86 + 0.09 * t - 0.5 * t**2.6) / spacing
    post = post + 0.04 * np.maximum(post, 0.0) ** 1.3  # lower ribs spread a little more
    index, frac = np.floor(post), post % 1.0
    band = _smoothstep(0.0, 0.06, frac) * _smoothstep(0.48, 0.40, frac)
    cortex = np.exp(-(((frac - 0.03) / 0.05) ** 2)) + np.exp(-(((frac - 0.44) / 0.05) ** 2))
    posterior = (0.3 * band + 0.25 * cortex * band) * ((index >= 0) & (index < 10))
    posterior *= _smoothstep(0.06, 0.1, xs) * _smoothstep(0.9, 0.8, xs)
    # Anterior ribs slope down towards the sternum and fade where the costal cartilage is.
    ant = (y + 0.62 - 0.42 * (1 - t)) / (spacing * 1.25)
    aidx, afrac = np.floor(ant), ant % 1.0
    anterior = 0.15 * _smoothstep(0.0, 0.08, afrac) * _smoothstep(0.5, 0.42, afrac) * ((aidx >= 0) & (aidx < 6))
    anterior *= _smoothstep(0.22, 0.4, xs) * _smoothstep(0.88, 0.78, xs)
    return posterior + anterior


def _clavicles(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xs = np.abs(x)
    t = np.clip((xs - 0.07) / 0.7, 0.0, 1.0)
    centre = -0.63 - 0.10 * t + 0.05 * np.sin(np.pi * t) ** 2
    band = _smoothstep(0.035, 0.022, np.abs(y - centre)) * _smoothstep(0.06, 0.09, xs) * _smoothstep(0.8, 0.74, xs)
    return 0.6 * band


def _frontal_findings(canvas: _Canvas, findings: dict[str, Finding], sev: dict[str, int],
                      lungs: dict[int, np.ndarray], domes: dict[int, float], cp_y: float, portable: bool,
                      rng: np.random.Generator) -> np.ndarray:
    x, y, shape = canvas.x, canvas.y, canvas.shape
    out = np.zeros(shape, np.float32)
    for s in (-1, 1):
        lung = lungs[s]
        xs = x * s
        lateral = np.clip((xs - 0.05) / 0.7, 0.0, 1.0)
        if "Pleural Effusion" in sev and s in _sides(findings["Pleural Effusion"]):
            height = EFFUSION_HEIGHT[sev["Pleural Effusion"]]
            # Fluid fills the costophrenic angle first and climbs the lateral wall (meniscus), erasing the dome.
            surface = domes[s] + 0.1 - height * (0.2 + 1.0 * lateral)
            fluid = _smoothstep(surface - 0.03, surface + 0.05, y) * (xs > 0.04)
            fluid *= _smoothstep(0.9, 0.75, xs)
            if portable:  # supine: fluid layers behind the lung, a veil over the whole hemithorax
                fluid = np.maximum(fluid * 0.7, 0.25 * (1 + sev["Pleural Effusion"]) * _smoothstep(-0.6, 0.5, y)
                                   * (lung > 0.05))
            out += 0.95 * fluid * lung
        if "Edema" in sev:
            level = 0.3 + 0.25 * sev["Edema"]
            perihilar = np.exp(-_ellipse(x, y, s * 0.2, 0.0, 0.32, 0.45))
            kerley = ((y * 55.0) % 1.0 < 0.25) * _smoothstep(0.55, 0.68, xs) * _smoothstep(0.05, 0.3, y)
            out += lung * (level * (0.55 * perihilar + 0.25 * _smoothstep(-0.3, 0.4, y)) + 0.12 * kerley)
    for name, strength in (("Consolidation", 0.85), ("Pneumonia", 0.7), ("Lung Opacity", 0.55)):
        if name in sev:
            for s in _sides(findings[name]):
                out += strength * _airspace(canvas, lungs[s], s, name, findings[name], rng)
    if "Atelectasis" in sev:
        for s in _sides(findings["Atelectasis"]):
            out += _atelectasis(x, y, s, sev["Atelectasis"], lungs[s], domes[s], rng)
    if "Lung Lesion" in sev:
        s = _sides(findings["Lung Lesion"])[0]
        for _ in range(20):  # a point well inside the lung (else the last draw: a pleural-based lesion)
            cx, cy = s * rng.uniform(0.2, 0.6), ZONE_Y[findings["Lung Lesion"].zone or "middle"] + rng.normal(0, 0.06)
            if _lung(np.float32(cx), np.float32(cy), s, domes[s], cp_y, 0.74) > 0.9:
                break
        radius = LESION_RADIUS[sev["Lung Lesion"]]
        angle = np.arctan2(y - cy, x - cx)
        lobulation = 1 + 0.12 * np.sin(3 * angle + rng.uniform(0, 6)) + 0.06 * np.sin(5 * angle)
        out += 0.9 * _ball(_ellipse(x, y, cx, cy, radius, radius) / lobulation**2) * (radius / 0.05) ** 0.5
    if "Fracture" in sev:
        s = _sides(findings["Fracture"])[0]
        cx, cy = s * rng.uniform(0.6, 0.72), rng.uniform(-0.35, 0.1)
        size = (0.022, 0.03, 0.04)[sev["Fracture"]]
        callus = _ball(_ellipse(x, y, cx, cy, size, size * 1.4, 0.5))
        gap = _smoothstep(0.006, 0.002, np.abs((x - cx) * 0.8 + (y - cy) * 0.6)) * (callus > 0)
        out += 0.9 * callus - 0.5 * gap
    return out


def _airspace(canvas: _Canvas, lung: np.ndarray, side: int, kind: str, finding: Finding,
              rng: np.random.Generator) -> np.ndarray:
    """Consolidation: dense lobar patch with air bronchograms; pneumonia: multifocal patchy; opacity: hazy."""
    x, y, shape = canvas.x, canvas.y, canvas.shape
    zone = ZONE_Y[finding.zone or "lower"]
    extent = AIRSPACE_EXTENT[SEVERITY_LEVEL[finding.severity]]
    cx = side * rng.uniform(0.3, 0.5)
    if kind == "Pneumonia":
        region = sum(np.exp(-_ellipse(x, y, cx + rng.normal(0, 0.1), zone + rng.normal(0, 0.08),
                                      extent * 0.45, extent * 0.4)) for _ in range(4))
        patch = np.clip(region * _smoothstep(-0.2, 0.9, _low_freq(rng, 24, shape)), 0, 1)
    elif kind == "Consolidation":
        region = _smoothstep(1.2, 0.6, _ellipse(x, y, cx, zone, extent * 1.2, extent))
        patch = region * _smoothstep(-0.8, -0.1, _low_freq(rng, 14, shape))
        bronchi = _lookup_polar(_vessel_table(int(rng.integers(2**31)), n_t=540), x, y, side * 0.15, -0.06, 0.7)
        patch = patch * (1 - 0.45 * np.minimum(bronchi, 1))
    else:
        patch = np.exp(-_ellipse(x, y, cx, zone, extent * 1.4, extent * 1.2)) * (0.75 + 0.25 * _low_freq(rng, 8, shape))
    return patch * np.minimum(lung * 1.5, 1.0)


def _atelectasis(x: np.ndarray, y: np.ndarray, side: int, level: int, lung: np.ndarray, dome: float,
                 rng: np.random.Generator) -> np.ndarray:
    if level == 2:  # lobar collapse: a triangle of density against the mediastinum / heart
        xs = x * side
        wedge = _smoothstep(0.0, 0.04, (y - dome + 0.35) * 0.4 - (xs - 0.08) * 0.55)
        return 0.7 * wedge * _smoothstep(dome + 0.02, dome - 0.1, y) * (xs > 0.04)
    out = np.zeros_like(x)
    for _ in range(1 + level):  # plate-like (discoid) bands at the base
        cy = dome - rng.uniform(0.05, 0.2)
        cx = side * rng.uniform(0.25, 0.5)
        out += np.exp(-_ellipse(x, y, cx, cy, 0.16, 0.012 + 0.006 * level, rng.normal(0, 0.12)))
    return 0.75 * out * np.minimum(lung * 2, 1.0)


def _devices(canvas: _Canvas, devices: tuple[str, ...], dome_left: float) -> np.ndarray:
    """Radiopaque lines, tubes and generators; tips end where they belong (ETT above the carina...)."""
    x, y = canvas.x, canvas.y
    lines: list[np.ndarray] = []
    out = np.zeros_like(x)
    if "endotracheal tube" in devices:
        lines.append(_bezier((0.0, -1.1), (0.005, -0.7), (0.005, -0.42)))
    if "nasogastric tube" in devices:
        lines.append(_bezier((-0.02, -1.1), (-0.02, -0.2), (0.02, dome_left + 0.3), (0.3, dome_left + 0.2)))
    if "central venous catheter" in devices:
        lines.append(_bezier((-0.3, -1.05), (-0.15, -0.75), (-0.06, -0.45), (-0.05, -0.22)))
    if "pacemaker" in devices:
        out += 2.0 * _smoothstep(1.0, 0.8, _ellipse(x, y, 0.45, -0.58, 0.1, 0.065)) ** 0.5
        lines.append(_bezier((0.4, -0.56), (0.2, -0.6), (-0.05, -0.3), (0.0, 0.05), (0.12, 0.2)))
        lines.append(_bezier((0.4, -0.54), (0.15, -0.5), (-0.06, -0.25), (-0.05, -0.05)))
    if "sternal wires" in devices:
        for cy in np.linspace(-0.5, 0.1, 5):
            out += 1.5 * (np.abs(_ellipse(x, y, 0.0, cy, 0.025, 0.015) - 1) < 0.35)
    if lines:
        out += _draw_curves(canvas, lines, 0.011)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Lateral view: anterior to the image left, spine on the right, both lungs superimposed.


def _lateral(canvas: _Canvas, a: Anatomy, findings: dict[str, Finding], devices: tuple[str, ...],
             rng: np.random.Generator) -> np.ndarray:
    x, y, shape = canvas.x, canvas.y, canvas.shape
    tex_rng = np.random.default_rng(a.seed + 1)
    sev = _severities(findings)
    front = np.interp(y, [-1.0, -0.7, -0.4, 0.2, 0.7, 1.0], [-0.3, -0.55, -0.66, -0.7, -0.68, -0.64])
    back = np.interp(y, [-1.0, -0.7, -0.4, 0.2, 0.7, 1.0], [0.45, 0.72, 0.8, 0.82, 0.8, 0.76])
    mid, half = (front + back) / 2, (back - front) / 2
    body = _ball(((x - mid) / half) ** 2)

    inspire = 0.08 * (1.0 - a.inspiration)
    t = np.clip((x + 0.55) / 1.1, 0.0, 1.0)
    dome = 0.12 + inspire + 0.22 * t + 0.2 * t**3  # diaphragm sweeps down to the posterior costophrenic sulcus
    # Both lungs superimposed: a rounded field from the retrosternal space to the spine.
    outline = _ellipse(x, y, 0.02, 0.05, 0.58, 0.72)
    lung = _smoothstep(1.0, 0.8, outline) * _smoothstep(0.0, 0.06, dome - y) * _smoothstep(-0.68, -0.58, y)
    heart_scale = a.heart * ((1.25 + 0.12 * sev["Cardiomegaly"]) if "Cardiomegaly" in sev else 1.0)
    heart_rho = _ellipse(x, y, -0.3, 0.2, 0.3 * heart_scale, 0.28 * heart_scale, 0.6)
    heart = _smoothstep(1.3, 0.5, heart_rho)
    lung = np.sqrt(lung) * (1 - _smoothstep(1.3, 0.6, heart_rho)) * (0.75 + 0.25 * _smoothstep(-0.6, 0.0, y))

    vertebra = (y + 1) / 0.09
    spine_x = 0.6 + 0.05 * np.sin((y + 1) * 1.4)
    spine = (_smoothstep(0.1, 0.07, np.abs(x - spine_x))
             * (0.7 + 0.3 * (np.abs(vertebra % 1 - 0.5) < 0.4)) * _smoothstep(-0.95, -0.85, y))
    sternum = _smoothstep(0.03, 0.015, np.abs(x - front - 0.05)) * _smoothstep(-0.62, -0.55, y)
    sternum *= _smoothstep(0.2, 0.1, y)
    arms = _smoothstep(1.0, 0.5, _ellipse(x, y, 0.0, -0.95, 0.5, 0.3))
    hilum = _smoothstep(0.1, 0.3, np.abs(x + 0.05) + np.abs(y - 0.05))  # the trunks' origin hides in the hilum
    vessels = _lookup_polar(_vessel_table(a.seed + 2), x, y, -0.05, 0.05, 0.8) * lung * hilum

    density = 1.6 * body + 0.25 * arms - 0.8 * lung + 0.15 * heart + 0.4 * spine + 0.3 * sternum + 0.3 * vessels
    density += 0.05 * _low_freq(tex_rng, 12, shape) * (body > 0.1)

    if "Pleural Effusion" in sev:  # fluid in the posterior costophrenic sulcus
        height = EFFUSION_HEIGHT[sev["Pleural Effusion"]]
        density += 0.9 * _smoothstep(dome - height - 0.2 * t - 0.05, dome - height - 0.2 * t + 0.05, y) * lung
    if "Edema" in sev:
        density += (0.2 + 0.15 * sev["Edema"]) * lung * np.exp(-_ellipse(x, y, 0.0, -0.05, 0.45, 0.45))
    for name, strength in (("Consolidation", 0.7), ("Pneumonia", 0.5), ("Lung Opacity", 0.35)):
        if name in sev:
            extent = AIRSPACE_EXTENT[sev[name]]
            cx, cy = rng.uniform(-0.2, 0.35), ZONE_Y[findings[name].zone or "lower"]
            patch = np.exp(-_ellipse(x, y, cx, cy, extent * 1.3, extent)) * (0.8 + 0.2 * _low_freq(rng, 10, shape))
            density += strength * patch * lung
    if "Lung Lesion" in sev:
        radius = LESION_RADIUS[sev["Lung Lesion"]]
        cy = ZONE_Y[findings["Lung Lesion"].zone or "middle"]
        density += 0.9 * _ball(_ellipse(x, y, rng.uniform(-0.2, 0.3), cy, radius, radius))
    if devices:
        lines = []
        if "endotracheal tube" in devices or "nasogastric tube" in devices:
            lines.append(_bezier((-0.1, -1.1), (-0.02, -0.7), (0.05, -0.4)))
        if "central venous catheter" in devices or "pacemaker" in devices:
            lines.append(_bezier((-0.2, -0.95), (-0.15, -0.5), (-0.2, -0.1)))
        if lines:
            density += 1.4 * _draw_curves(canvas, lines, 0.011)
        if "pacemaker" in devices:
            density += 2.0 * _smoothstep(1.0, 0.8, _ellipse(x, y, -0.5, -0.5, 0.04, 0.08)) ** 0.5
    return density


# ----------------------------------------------------------------------------------------------------------------


def render(anatomy: Anatomy, findings: dict[str, Finding], devices: tuple[str, ...], view: str,
           rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """The radiograph as uint16 values in 0..4095 (MONOCHROME2: bright = dense), shape (rows, columns).

    view: PA, AP, LATERAL or LL. rng drives this image's finding placement and noise."""
    factor = min(1.0, WORK_SIZE / max(rows, columns))
    work = (max(8, round(rows * factor)), max(8, round(columns * factor)))
    if view in ("LATERAL", "LL"):
        canvas = _Canvas(*work, replace(anatomy, rotation=anatomy.rotation * 0.5), magnify=0.95)
        density = _lateral(canvas, anatomy, findings, devices, rng)
        centre = 1.55
    else:
        canvas = _Canvas(*work, anatomy, magnify=1.0)
        density = _frontal(canvas, anatomy, findings, devices, view == "AP", rng)
        centre = 1.0
    if work != (rows, columns):
        density = ndimage.zoom(density, (rows / work[0], columns / work[1]), order=1, grid_mode=True, mode="nearest")
    # Quantum noise is worse where fewer photons pass (dense regions); a little blur stands for the detector.
    noise = rng.standard_normal(density.shape, dtype=np.float32) * (0.02 * anatomy.noise)
    density = ndimage.gaussian_filter(density + noise * np.exp(0.5 * density), 0.6 * max(rows, columns) / 512)
    scatter = 0.04 * (view == "AP")  # portable films look flatter (scatter, no grid)
    film = 1.0 / (1.0 + np.exp(-(density - centre - anatomy.exposure) * (2.8 * anatomy.contrast)))
    image = scatter + (1.0 - scatter) * (film - 0.04) / 0.96
    return np.clip(image * 4095.0, 0, 4095).astype(np.uint16)
