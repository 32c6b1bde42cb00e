"""How well the demo-size VQ-GAN (tasks.generators.vqgan.training) reconstructs X-rays, beside a baseline with as
many positions.

    .venv/bin/python bench/vqgan_reconstruction.py [--studies 1500] [--steps 300] [--batch-size 8] \
        [--cache-dir runs/bench-vqgan]

The cohort: the demo source's phantom (tasks.demo.source.plan_studies / render_image at 512 px, the demo config's
image_size) for the AP images of --studies studies, scaled to 8 bit and reduced to ingest.resolution with ingest's
own square_reduce + resize_square, split as the demo source splits patients. The VQ-GAN is configs/demo.yaml's
vqgan section with --steps and --batch-size, trained through prepare_vqgan in --cache-dir (a second run loads it).
Scored on the validate split and on the real chest X-rays of ../shared/data/covid_chestxray_ieee8023/images (skipped
when absent): MSE and SSIM on [0, 1] images, and the baseline: bicubic down-sampling to the token grid (16x16 at
128 px) and back up, which keeps the same number of spatial positions as the tokens.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from tasks import layout
from tasks.config import load_config
from tasks.data import catalog
from tasks.data.dicom import resize_square, square_reduce
from tasks.data.pixels import PixelStore, write_shard
from tasks.demo.source import plan_studies, render_image
from tasks.generators.vqgan.training import cohort_split_ids, evaluate_vqgan, prepare_vqgan, reconstruction_metrics

REPO = Path(__file__).resolve().parent.parent
REAL_XRAYS = REPO.parent / "shared" / "data" / "covid_chestxray_ieee8023" / "images"


def write_phantom_cohort(root: Path, studies: int, image_size: int, resolution: int) -> None:
    """The AP phantom images of `studies` demo studies as a pixel shard and a generator cohort under root."""
    rows, images = [], []
    for plan in plan_studies(studies, seed=0, image_size=image_size, defects=False):
        for j, image in enumerate(plan.images):
            if image.view == "AP":
                pixels = render_image(plan, j).astype(np.float32) * (255.0 / 4095.0)
                images.append(resize_square(square_reduce(pixels, resolution), resolution))
                rows.append({"dicom_id": image.dicom_id, "subject_id": plan.subject_id, "study_id": plan.study_id,
                             "split": plan.split})
    write_shard(root, resolution, "phantoms", np.stack(images))
    catalog.write_part(root, "pixels", "phantoms", [
        {"dicom_id": row["dicom_id"], "resolution": resolution, "shard": "phantoms", "shard_row": index}
        for index, row in enumerate(rows)
    ])
    layout.cohorts_dir(root).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), layout.cohorts_dir(root) / "generator.parquet")


def real_xrays(resolution: int) -> np.ndarray:
    """The real PNGs (grayscale, shorter side 256 px) reduced to resolution as ingest reduces an image."""
    return np.stack([resize_square(square_reduce(np.asarray(Image.open(path).convert("L"), dtype=np.float32),
                                                 resolution), resolution)
                     for path in sorted(REAL_XRAYS.glob("*.png"))])


def bicubic_through(images: np.ndarray, grid: int) -> np.ndarray:
    """uint8 [n, R, R] -> float [n, R, R] in [0, 1], down-sampled (anti-aliased) to grid x grid and back up."""
    x = torch.from_numpy(images)[:, None].float() / 255.0
    small = F.interpolate(x, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=images.shape[1:], mode="bicubic", align_corners=False).clamp(0, 1)[:, 0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "bench-vqgan")
    args = parser.parse_args()

    config = load_config(REPO / "configs" / "demo.yaml", [
        f"run.data_root={args.cache_dir}", f"vqgan.steps={args.steps}", f"vqgan.batch_size={args.batch_size}"])
    resolution, root = config.ingest.resolution, config.run.data_root
    if not (layout.cohorts_dir(root) / "generator.parquet").exists():
        write_phantom_cohort(root, args.studies, config.source.image_size, resolution)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    prepared = prepare_vqgan(config.run.data_root, config.vqgan, config.ingest.resolution, device)
    seconds = time.perf_counter() - start
    model = prepared.model
    grid = model.config.latent_resolution
    print(f"VQ-GAN {prepared.vqgan_id}: {resolution} px -> {grid}x{grid} tokens, {model.config.n_embed} codes, "
          f"{args.steps} steps x batch {args.batch_size} on {device}; prepare_vqgan took {seconds:.0f} s "
          f"(training, or loading from {root})")

    held_out = cohort_split_ids(root, "generator", "validate")[:config.vqgan.eval_images]
    sets = {"phantom, validate split": PixelStore(root, resolution).get_many(held_out)}
    if REAL_XRAYS.is_dir():
        sets["real X-rays (covid_chestxray)"] = real_xrays(resolution)
    else:
        print(f"real X-rays: skipped, {REAL_XRAYS} is absent")
    print(f"{'images':31} {'n':>4}  {'method':20} {'MSE':>8} {'SSIM':>7} {'perplexity':>10} {'codes used':>10}")
    for name, images in sets.items():
        scores = evaluate_vqgan(model, images, config.vqgan.encode_batch_size, device)
        baseline = reconstruction_metrics(images, bicubic_through(images, grid))
        print(f"{name:31} {len(images):4d}  {'VQ-GAN tokens':20} {scores['mse']:8.5f} {scores['ssim']:7.4f} "
              f"{scores['perplexity']:10.1f} {scores['codebook_used']:10.3f}")
        print(f"{'':31} {'':4}  {f'bicubic via {grid}x{grid}':20} {baseline['mse']:8.5f} {baseline['ssim']:7.4f}")

if __name__ == "__main__":
    main()
