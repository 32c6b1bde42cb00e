"""RayGen behind the ImageGenerator interface: impression -> text states -> MaskGIT tokens -> VQ-GAN pixels."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from models.raygen import RayGen, SamplingParams, generate
from models.vqgan import VQGAN
from tasks.config import Config
from tasks.curate import cohorts_dir
from tasks.embeddings import EmbeddingStore, pad_states
from tasks.generator import GeneratedBatch
from tasks.generator_training import FINAL_DIR, TokenTextDataset, TrainResult, train_raygen
from tasks.text import TextEncoder
from tasks.tokens import TokenStore


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 1, H, W] in [-1, 1] -> uint8 [B, H, W], the inverse of the [-1, 1] scaling the VQ-GAN was fed."""
    return ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


class RayGenImageGenerator:
    def __init__(self, generator_id: str, raygen: RayGen, vqgan: VQGAN, text_encoder: TextEncoder,
                 sampling: SamplingParams, max_text_tokens: int):
        self.generator_id = generator_id
        self.raygen = raygen.eval()
        self.vqgan = vqgan.eval()
        self.text_encoder = text_encoder
        self.sampling = sampling
        self.max_text_tokens = max_text_tokens
        self.resolution = vqgan.config.resolution

    def _embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # One prompt at a time: a prompt's states must not depend on how much padding its batch needed.
        encoded = [self.text_encoder.embed([prompt], self.max_text_tokens) for prompt in prompts]
        return pad_states([hidden[0, mask[0]] for hidden, mask in encoded])

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int]) -> GeneratedBatch:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        device = next(self.raygen.parameters()).device
        text, mask = self._embed(prompts)
        generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        tokens = generate(self.raygen, text.to(device), mask.to(device), generator=generators, **asdict(self.sampling))
        grid = self.raygen.config.grid_size
        images = self.vqgan.decode_indices(tokens.view(-1, grid, grid).to(next(self.vqgan.parameters()).device),
                                           grayscale=True)
        provenance = [{"generator_id": self.generator_id, "seed": seed, "sampling": asdict(self.sampling)}
                      for seed in seeds]
        return GeneratedBatch(images=to_uint8(images), provenance=provenance)


def generator_run_id(config: Config, vqgan_id: str, encoder_id: str, train_ids: list[str]) -> str:
    """Names the weights: the raygen section, the tokens and text they learn from, and the training rows."""
    payload = {"raygen": config.raygen.model_dump(mode="json"), "vqgan": vqgan_id, "encoder": encoder_id,
               "max_text_tokens": config.text.max_tokens, "train": sorted(train_ids)}
    return "raygen-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def raygen_dir(data_root: Path, generator_id: str) -> Path:
    return Path(data_root) / "models" / "raygen" / generator_id


def cohort_dataset(config: Config, rows: pd.DataFrame, vqgan_id: str, encoder_id: str) -> TokenTextDataset:
    """The cohort rows' cached tokens and text states (text in float16 to halve the memory it holds)."""
    data_root = config.run.data_root
    tokens = TokenStore(data_root, vqgan_id).get_many(rows["dicom_id"].tolist())
    text, mask = EmbeddingStore(data_root, encoder_id).get_many(rows["study_id"].tolist(), config.text.max_tokens)
    return TokenTextDataset(tokens, text.half(), mask)


def fit_raygen(config: Config, vqgan: VQGAN, vqgan_id: str, encoder_id: str, text_dim: int,
               on_eval=None, on_samples=None) -> tuple[str, TrainResult]:
    """Train RayGen on the generator cohort's train split (validated on its validate split), or resume it;
    a generator whose final weights exist is not trained again."""
    cohort = pq.read_table(cohorts_dir(config.run.data_root) / "generator.parquet").to_pandas()
    train_rows, val_rows = cohort[cohort["split"] == "train"], cohort[cohort["split"] == "validate"]
    generator_id = generator_run_id(config, vqgan_id, encoder_id, train_rows["dicom_id"].tolist())
    return generator_id, train_raygen(
        config.raygen, cohort_dataset(config, train_rows, vqgan_id, encoder_id),
        cohort_dataset(config, val_rows, vqgan_id, encoder_id), raygen_dir(config.run.data_root, generator_id),
        text_dim=text_dim, codebook_size=vqgan.config.n_embed, grid_size=vqgan.config.latent_resolution,
        max_text_tokens=config.text.max_tokens,
        on_eval=on_eval, on_samples=on_samples)


def load_raygen_generator(config: Config, generator_id: str, vqgan: VQGAN, text_encoder: TextEncoder
                          ) -> RayGenImageGenerator:
    device = text_encoder.device
    raygen = RayGen.from_pretrained(raygen_dir(config.run.data_root, generator_id) / FINAL_DIR, map_location=device)
    sampling = SamplingParams(**config.raygen.sampling.model_dump())
    return RayGenImageGenerator(generator_id, raygen.to(device), vqgan.to(device), text_encoder, sampling,
                                config.text.max_tokens)


def tile(images: np.ndarray, columns: int = 4) -> np.ndarray:
    """uint8 [k, R, R] -> one uint8 grid image, `columns` wide, for a look at samples."""
    rows = -(-len(images) // columns)
    side = images.shape[1]
    grid = np.zeros((rows * side, columns * side), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * side:(row + 1) * side, column * side:(column + 1) * side] = image
    return grid
