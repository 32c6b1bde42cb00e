"""Which latent-diffusion settings learn on the demo: each variant of the config's diffusion section trained through
the pipeline's own fit (tasks.generators.diffusion.generator.fit_diffusion) on a data root whose tokenize stage has
run, then sampled as synthesis samples it, with what says whether it learned beside what it should be.

    .venv/bin/augment run --config configs/demo-compare.yaml --stop-after tokenize     # once: the data root
    PYTHONPATH=. .venv/bin/python bench/diffusion_variants.py --config configs/demo-compare.yaml \
        --variant '{"block_channels": [32, 64], "prediction": "epsilon", "steps": 1500}' --variant '{...}'

Per variant it prints the held-out loss with and without the condition, its train time, and on 16 validation
studies (their label vectors, seeds 0-15): the drawn latents' standard deviation beside the real latents' (a
sampler that diverges draws latents many times wider), and the error of the trained network's prediction (eps or
v) on real latents noised to t = 50, 500 and 900 (a network that learned predicts well at high noise). A grid of
the 16 real images above the 16 drawn ones (decoded as synthesis decodes them) goes to --out/<variant index>.png.
The variants train into the data root's models/diffusion/ like the pipeline's (their own generator ids), so a rerun
with the same variant only samples.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from models.latent_diffusion import noise_scheduler, prediction_target, sample
from tasks import layout
from tasks.config import load_config
from tasks.generators.conditions import study_conditions
from tasks.generators.diffusion.generator import fit_diffusion, load_diffusion_generator, to_diffused
from tasks.generators.interface import to_uint8
from tasks.generators.text import load_text_encoder
from tasks.generators.training import FitInputs
from tasks.generators.vqgan.training import prepare_vqgan

STUDIES = 16


def prediction_error(generator, latents: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> dict[int, float]:
    """MSE of the network's prediction on real latents noised to a few timesteps (fixed noise)."""
    model = generator.model
    scheduler = noise_scheduler(model.config)
    x0 = latents * model.config.latent_scale
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    errors = {}
    for t in (50, 500, 900):
        timesteps = torch.full((len(x0),), t)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        target = prediction_target(scheduler, x0, noise, timesteps)
        with torch.no_grad():
            errors[t] = torch.mean((model(noisy, timesteps, values, mask) - target) ** 2).item()
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo-compare.yaml")
    parser.add_argument("--variant", action="append", default=[], help="JSON: diffusion settings to change")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/diffusion_variants"))
    args = parser.parse_args()
    config = load_config(args.config)
    root, resolution = config.run.data_root, config.ingest.resolution
    vqgan = prepare_vqgan(root, config.vqgan, resolution, "cpu")
    encoder = load_text_encoder(config.text.encoder, "cpu")
    inputs = FitInputs(root, resolution, vqgan.model, vqgan.vqgan_id, encoder.encoder_id, encoder.dim,
                       config.text.max_tokens)
    cohort = pq.read_table(layout.cohort_file(root, "generator")).to_pandas()
    studies = cohort[cohort["split"] == "validate"].head(STUDIES)["study_id"].tolist()
    conditions = study_conditions(root, studies, resolution)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{config.run.data_root}: {STUDIES} validation studies, torch {torch.get_num_threads()} threads")
    for index, variant in enumerate(json.loads(text) for text in args.variant or ["{}"]):
        section = config.diffusion.model_copy(update=variant)
        start = time.perf_counter()
        generator_id, result = fit_diffusion(section, inputs)
        trained = time.perf_counter() - start
        generator = load_diffusion_generator(root, generator_id, resolution, config.vqgan, config.text, section)
        values, mask = generator.conditioner([""] * STUDIES, conditions, torch.device("cpu"))
        latents = to_diffused(conditions.references, generator.vqgan)
        drawn = sample(generator.model, values, mask, [torch.Generator().manual_seed(seed) for seed in range(STUDIES)],
                       **section.sampling.model_dump())
        images = to_uint8(generator.vqgan.decode_latents(drawn, grayscale=True))  # the drawn latents, decoded once
        errors = prediction_error(generator, latents, values, mask)
        print(f"[{index}] {json.dumps(variant)} -> {generator_id}, step {result.step}, {trained / 60:.1f} min")
        print(f"    val/loss {result.metrics['val/loss']:.4f}, null condition "
              f"{result.metrics['val/loss_null_condition']:.4f}, gain {result.metrics['val/condition_gain']:+.4f}")
        print(f"    latent std: drawn {drawn.std().item():.3f}, real {latents.std().item():.3f}")
        print("    prediction MSE on noised real latents: "
              + ", ".join(f"t={t} {error:.3f}" for t, error in errors.items()))
        grid = np.concatenate([np.concatenate(list(conditions.references), 1), np.concatenate(list(images), 1)])
        Image.fromarray(grid).save(args.out / f"{index}.png")
        print(f"    grid (real above, drawn below): {args.out / f'{index}.png'}")


if __name__ == "__main__":
    main()
