"""The label-conditioned GAN behind the ImageGenerator interface: labels + z -> image.

It reads `conditions.labels` (tasks.generators.interface.Conditions, built by
tasks.generators.conditions.study_conditions for the studies the prompts came from), never the prompt's text:
every prompt of synthesis and evaluation is a real cohort impression whose labels the classifier cohort holds, so
the labels are looked up, not re-derived from the words. The prompt only rides along in the caller's records.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import torch

from models.label_gan import LabelGAN, LabelGANConfig, latent_noise
from tasks import layout
from tasks.config import GANSection
from tasks.data.pixels import PixelStore
from tasks.generators.checkpoints import final_dir
from tasks.generators.conditions import labels_digest, study_conditions
from tasks.generators.device import resolve_device
from tasks.generators.gan.training import train_gan
from tasks.generators.interface import check_batch, Conditions, GeneratedBatch, output_id, to_uint8
from tasks.generators.training import FitInputs, TensorRows, TrainResult
from tasks.pathologies import PATHOLOGIES


class GANImageGenerator:
    def __init__(self, generator_id: str, gan: LabelGAN):
        self.generator_id = generator_id
        self.output_id = output_id(generator_id, {})  # no sampling settings: z ~ N(0, I), untruncated
        self.generator = gan.generator.eval()  # BatchNorm on its running statistics
        self.resolution = gan.config.resolution
        self.needs = "labels"

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], conditions: Conditions | None = None) -> GeneratedBatch:
        check_batch(prompts, seeds, conditions, self.needs)
        device = next(self.generator.parameters()).device
        z = latent_noise(self.generator.config.z_dim, [torch.Generator(device).manual_seed(s) for s in seeds], device)
        images = self.generator(z, torch.from_numpy(conditions.labels).float().to(device))
        provenance = [{"generator_id": self.generator_id, "seed": seed, "labels": labels.tolist()}
                      for seed, labels in zip(seeds, conditions.labels)]
        return GeneratedBatch(images=to_uint8(images), provenance=provenance)


def fit_gan(gan: GANSection, inputs: FitInputs, on_eval=None) -> tuple[str, TrainResult]:
    """Train the GAN on the generator cohort's train split's images and labels, or resume it; a generator whose
    final weights exist is not trained again."""
    cohort = pq.read_table(layout.cohort_file(inputs.data_root, "generator")).to_pandas()
    rows = cohort[cohort["split"] == "train"]
    labels = study_conditions(inputs.data_root, rows["study_id"].tolist()).labels
    images = PixelStore(inputs.data_root, inputs.resolution).get_many(rows["dicom_id"].tolist())
    payload = {"gan": gan.weights_identity(), "resolution": inputs.resolution, "labels": labels_digest(labels),
               "train": sorted(rows["dicom_id"].tolist())}
    generator_id = "gan-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    model_config = LabelGANConfig(resolution=inputs.resolution, n_labels=len(PATHOLOGIES), z_dim=gan.z_dim,
                                  channels=gan.channels, base=gan.base)
    return generator_id, train_gan(gan, model_config, TensorRows(torch.from_numpy(images), torch.from_numpy(labels)),
                                   layout.model_dir(inputs.data_root, "gan", generator_id), on_eval=on_eval)


def load_gan_generator(data_root: Path, generator_id: str) -> GANImageGenerator:
    device = resolve_device()
    gan = LabelGAN.from_pretrained(final_dir(layout.model_dir(data_root, "gan", generator_id)), map_location=device)
    return GANImageGenerator(generator_id, gan.to(device))
