"""Latent diffusion behind the ImageGenerator interface: a condition -> UNet denoising (DDIM or DDPM, guided) ->
the VQ-GAN's decoder (or the pixels themselves).

Conditions: in text mode generate() reads the prompts, as RayGen does. In label and image mode it reads
`conditions` (tasks.generators.interface.Conditions: the labels, or the reference radiograph, of the study each
prompt came from), which tasks.generators.conditions.study_conditions builds for any cohort studies: the same
definition the model was trained on. Image mode thus gives "variations of this radiograph", which take the
reference's labels. The prompt->labels mapping is not guessed from the text: every prompt here is a real cohort
impression whose labels the classifier cohort already holds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig, sample
from models.vqgan import VQGAN
from tasks import layout
from tasks.config import DiffusionSampling, DiffusionSection, TextSection, VQGANSection
from tasks.data.pixels import PixelStore
from tasks.generators.checkpoints import final_dir
from tasks.generators.conditions import ImageEncoder, labels_digest, study_conditions
from tasks.generators.device import resolve_device
from tasks.generators.diffusion.training import train_diffusion
from tasks.generators.embeddings import embed_prompts, EmbeddingStore
from tasks.generators.interface import check_batch, Conditions, GeneratedBatch, output_id, to_uint8
from tasks.generators.text import load_text_encoder, TextEncoder
from tasks.generators.training import FitInputs, TensorRows, TrainResult
from tasks.generators.vqgan.training import prepare_vqgan, reconstruct_uint8
from tasks.pathologies import PATHOLOGIES

ENCODE_BATCH = 32


def to_diffused(images: np.ndarray, vqgan: VQGAN | None) -> Tensor:
    """uint8 [n, R, R] -> what is diffused, unscaled: the VQ-GAN's continuous latents, or the pixels in [-1, 1]."""
    device = next(vqgan.parameters()).device if vqgan is not None else torch.device("cpu")
    batches = []
    for start in range(0, len(images), ENCODE_BATCH):
        pixels = torch.from_numpy(images[start:start + ENCODE_BATCH]).to(device)[:, None].float() / 127.5 - 1.0
        batches.append((vqgan.eval().encode_latents(pixels) if vqgan is not None else pixels).cpu())
    return torch.cat(batches)


class Conditioner:
    """(prompts, conditions) -> the model's condition (values, mask), the way training built it from the stores."""

    def __init__(self, config: LatentDiffusionConfig, text_encoder: TextEncoder | None = None,
                 image_encoder: ImageEncoder | None = None):
        self.config, self.text_encoder, self.image_encoder = config, text_encoder, image_encoder
        self.needs = {"text": None, "labels": "labels", "image": "references"}[config.conditioning]

    def __call__(self, prompts: list[str], conditions: Conditions | None, device: torch.device
                 ) -> tuple[Tensor, Tensor]:
        if self.config.conditioning == "text":
            values, mask = embed_prompts(self.text_encoder, prompts, self.config.max_cond_tokens)
            return values.to(device), mask.to(device)
        if self.config.conditioning == "labels":
            values = torch.from_numpy(conditions.labels)
        else:
            values = self.image_encoder.embed(conditions.references)
        return values.float().to(device), torch.ones(len(prompts), self.config.max_cond_tokens, dtype=torch.bool,
                                                     device=device)


class DiffusionImageGenerator:
    def __init__(self, generator_id: str, model: LatentDiffusion, conditioner: Conditioner,
                 sampling: DiffusionSampling, vqgan: VQGAN | None, resolution: int):
        self.generator_id = generator_id
        self.output_id = output_id(generator_id, sampling.model_dump())
        self.model, self.conditioner, self.sampling = model.eval(), conditioner, sampling
        self.vqgan, self.resolution = vqgan, resolution
        self.needs = conditioner.needs
        if vqgan is not None:  # the VQ-GAN's reconstructions are this family's ceiling, as RayGen's
            self.reconstruct: Callable[[np.ndarray], np.ndarray] = partial(reconstruct_uint8, vqgan)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], conditions: Conditions | None = None) -> GeneratedBatch:
        check_batch(prompts, seeds, conditions, self.needs)
        device = next(self.model.parameters()).device
        values, mask = self.conditioner(prompts, conditions, device)
        generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        x = sample(self.model, values, mask, generators, **self.sampling.model_dump())
        images = self.vqgan.decode_latents(x, grayscale=True) if self.vqgan is not None else x
        provenance = [{"generator_id": self.generator_id, "seed": seed, "sampling": self.sampling.model_dump(),
                       "conditioning": self.model.config.conditioning} for seed in seeds]
        return GeneratedBatch(images=to_uint8(images), provenance=provenance)


def cohort_condition(data_root: Path, study_ids: list[int], diffusion: DiffusionSection, inputs: FitInputs,
                     image_encoder: ImageEncoder | None) -> tuple[Tensor, Tensor, str]:
    """The studies' conditions as training sees them: (values, mask, the id of what made them)."""
    if diffusion.conditioning == "text":
        values, mask = EmbeddingStore(data_root, inputs.encoder_id).get_many(study_ids, inputs.max_text_tokens)
        return values.half(), mask, f"{inputs.encoder_id}/{inputs.max_text_tokens}"
    if diffusion.conditioning == "labels":
        labels = study_conditions(data_root, study_ids).labels
        return torch.from_numpy(labels), torch.ones(len(labels), len(PATHOLOGIES), dtype=torch.bool), \
            f"labels@{labels_digest(labels)}"
    references = study_conditions(data_root, study_ids, inputs.resolution).references
    values = image_encoder.embed(references).cpu()
    return values, torch.ones(len(values), diffusion.image_tokens, dtype=torch.bool), image_encoder.encoder_id


def fit_diffusion(diffusion: DiffusionSection, inputs: FitInputs, on_eval=None) -> tuple[str, TrainResult]:
    """Train latent diffusion on the generator cohort's train split (validated on its validate split), or resume
    it; a generator whose final weights exist is not trained again."""
    data_root = inputs.data_root
    cohort = pq.read_table(layout.cohort_file(data_root, "generator")).to_pandas()
    pixels = PixelStore(data_root, inputs.resolution)
    vqgan = inputs.vqgan if diffusion.latent == "vqgan" else None
    image_encoder = (ImageEncoder(diffusion.image_encoder, resolve_device(diffusion.device))
                     if diffusion.conditioning == "image" else None)
    splits = {}
    for split in ("train", "validate"):
        rows = cohort[cohort["split"] == split]
        values, mask, condition_id = cohort_condition(data_root, rows["study_id"].tolist(), diffusion, inputs,
                                                      image_encoder)
        splits[split] = (rows, to_diffused(pixels.get_many(rows["dicom_id"].tolist()), vqgan), values, mask)
    train_rows, train_x, _, _ = splits["train"]
    # Rombach et al.'s scale factor: unit variance for the latents the noise schedule was designed for.
    latent_scale = 1.0 / train_x.std().item() if vqgan is not None else 1.0
    model_config = LatentDiffusionConfig(
        conditioning=diffusion.conditioning, sample_size=train_x.shape[-1], channels=train_x.shape[1],
        cond_dim=splits["train"][2].shape[-1],
        max_cond_tokens={"text": inputs.max_text_tokens, "image": diffusion.image_tokens,
                         "labels": len(PATHOLOGIES)}[diffusion.conditioning],
        block_channels=tuple(diffusion.block_channels), layers_per_block=diffusion.layers_per_block,
        cross_dim=diffusion.cross_dim, head_dim=diffusion.head_dim, train_timesteps=diffusion.train_timesteps,
        prediction=diffusion.prediction, latent_scale=latent_scale, clip_sample=vqgan is None)
    payload = {"diffusion": diffusion.weights_identity(), "resolution": inputs.resolution,
               "latent": inputs.vqgan_id if vqgan is not None else "pixels", "condition": condition_id,
               "train": sorted(train_rows["dicom_id"].tolist())}
    generator_id = "diffusion-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    train, val = (TensorRows(x * latent_scale, values, mask) for _, x, values, mask in splits.values())
    return generator_id, train_diffusion(diffusion, model_config, train, val,
                                         layout.model_dir(data_root, "diffusion", generator_id), on_eval=on_eval)


def load_diffusion_generator(data_root: Path, generator_id: str, resolution: int, vqgan: VQGANSection,
                             text_settings: TextSection, diffusion: DiffusionSection) -> DiffusionImageGenerator:
    """A trained latent diffusion ready to generate, with what its conditioning and latent space need."""
    device = resolve_device()
    model = LatentDiffusion.from_pretrained(final_dir(layout.model_dir(data_root, "diffusion", generator_id)),
                                            map_location=device).to(device)
    conditioning = model.config.conditioning
    conditioner = Conditioner(
        model.config,
        text_encoder=load_text_encoder(text_settings.encoder, device) if conditioning == "text" else None,
        image_encoder=ImageEncoder(diffusion.image_encoder, device) if conditioning == "image" else None)
    decoder = prepare_vqgan(data_root, vqgan, resolution, device).model if diffusion.latent == "vqgan" else None
    return DiffusionImageGenerator(generator_id, model, conditioner, diffusion.sampling, decoder, resolution)
