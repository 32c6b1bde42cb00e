"""RayGen behind the ImageGenerator interface: impression (and, with findings tokens, the study's labels; with a view
token, the view to draw) -> text states -> MaskGIT tokens -> VQ-GAN pixels."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from models.raygen import generate, RayGen
from models.sampling import SamplingParams
from models.vqgan import VQGAN
from tasks import layout
from tasks.config import RayGenSampling, RayGenSection, TextSection, VQGANSection
from tasks.generators.checkpoints import final_dir
from tasks.generators.conditions import labels_digest, StudyConditions
from tasks.generators.device import resolve_device
from tasks.generators.embeddings import embed_prompts, EmbeddingStore
from tasks.generators.interface import check_batch, Conditions, GeneratedBatch, output_id, to_uint8
from tasks.generators.raygen.training import TokenTextDataset, train_raygen
from tasks.generators.training import TrainResult
from tasks.generators.text import load_text_encoder, TextEncoder
from tasks.generators.tokens import TokenStore
from tasks.generators.vqgan.training import prepare_vqgan, reconstruct_uint8


class RayGenImageGenerator:
    def __init__(self, generator_id: str, raygen: RayGen, vqgan: VQGAN, text_encoder: TextEncoder,
                 sampling: SamplingParams, max_text_tokens: int):
        self.generator_id = generator_id
        self.output_id = output_id(generator_id, asdict(sampling))
        self.raygen = raygen.eval()
        self.vqgan = vqgan.eval()
        self.text_encoder = text_encoder
        self.sampling = sampling
        self.max_text_tokens = max_text_tokens
        self.resolution = vqgan.config.resolution
        # The prompt's text alone, or with findings tokens its study's labels too (conditions.labels).
        self.needs = "labels" if raygen.config.n_labels else None
        self.views = raygen.config.views  # with a view token, the views it draws (conditions.views); else []

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], conditions: Conditions | None = None) -> GeneratedBatch:
        """conditions are read only by a RayGen with findings tokens (needs "labels") or a view token (views)."""
        check_batch(prompts, seeds, conditions, self.needs)
        device = next(self.raygen.parameters()).device
        text, mask = embed_prompts(self.text_encoder, prompts, self.max_text_tokens)
        labels = torch.from_numpy(conditions.labels).to(device) if self.needs else None
        views = self._view_indices(conditions).to(device) if self.views else None
        generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        tokens = generate(self.raygen, text.to(device), mask.to(device), labels, views, generator=generators,
                          **asdict(self.sampling))
        grid = self.raygen.config.grid_size
        images = self.vqgan.decode_indices(tokens.view(-1, grid, grid).to(next(self.vqgan.parameters()).device),
                                           grayscale=True)
        provenance = [{"generator_id": self.generator_id, "seed": seed, "sampling": asdict(self.sampling)}
                      | ({"labels": conditions.labels[row].tolist()} if self.needs else {})
                      | ({"view": str(conditions.views[row])} if self.views else {})
                      for row, seed in enumerate(seeds)]
        return GeneratedBatch(images=to_uint8(images), provenance=provenance)

    def _view_indices(self, conditions: Conditions | None) -> torch.Tensor:
        if conditions is None or conditions.views is None:
            raise ValueError(f"{self.generator_id} has a view token: pass conditions with views, one of {self.views}")
        return view_indices(self.views, conditions.views.tolist(), self.generator_id)

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """uint8 [n, R, R] through the VQ-GAN's codebook and back: the ceiling of any image made from its tokens."""
        return reconstruct_uint8(self.vqgan, images)


def view_indices(learned: list[str], views: list[str], owner: str) -> torch.Tensor:
    """Views by name as indices into the views a RayGen learns (RayGenConfig.views), LongTensor [n, 1]; a view it
    does not know is a ValueError naming `owner`."""
    unknown = sorted(set(views) - set(learned))
    if unknown:
        raise ValueError(f"{owner} learned the views {learned}, not {unknown}")
    return torch.tensor([learned.index(view) for view in views], dtype=torch.long)[:, None]


def generator_run_id(raygen: RayGenSection, max_text_tokens: int, vqgan_id: str, encoder_id: str,
                     train_ids: list[str], labels: np.ndarray) -> str:
    """Names the weights: what changes them (the raygen section less its sampling and bookkeeping, the tokens and
    text they learn from, the findings with findings tokens, the training rows). Sampling settings are synthesis's
    and evaluation's inputs instead."""
    payload = {"raygen": raygen.weights_identity(), "vqgan": vqgan_id, "encoder": encoder_id,
               "max_text_tokens": max_text_tokens, "train": sorted(train_ids)}
    if raygen.findings_tokens:  # a text-only RayGen keeps the id it had before findings tokens existed
        payload["labels"] = labels_digest(labels)
    return "raygen-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def cohort_dataset(data_root: Path, rows: pd.DataFrame, vqgan_id: str, encoder_id: str,
                   max_text_tokens: int, findings: StudyConditions | None, views: list[str]) -> TokenTextDataset:
    """The cohort rows' cached tokens and text states (text in float16 to halve the memory it holds); with
    findings tokens their studies' labels from `findings` (as the label families read them; None: no labels); with
    a view token (views: the vocabulary, [] none) the index of each row's view_position."""
    tokens = TokenStore(data_root, vqgan_id).get_many(rows["dicom_id"].tolist())
    text, mask = EmbeddingStore(data_root, encoder_id).get_many(rows["study_id"].tolist(), max_text_tokens)
    labels = (findings(rows["study_id"].tolist()).labels if findings is not None
              else np.zeros((len(rows), 0), np.float32))
    view_rows = (view_indices(views, rows["view_position"].tolist(),
                              f"RayGen on {layout.cohort_file(data_root, 'generator')}'s train split")
                 if views else None)
    return TokenTextDataset(tokens, text.half(), mask, torch.from_numpy(labels), view_rows)


def fit_raygen(data_root: Path, raygen: RayGenSection, max_text_tokens: int, vqgan: VQGAN, vqgan_id: str,
               encoder_id: str, text_dim: int, on_eval=None, on_samples=None) -> tuple[str, TrainResult]:
    """Train RayGen on the generator cohort's train split (validated on its validate split), or resume it;
    a generator whose final weights exist is not trained again."""
    cohort = pq.read_table(layout.cohort_file(data_root, "generator")).to_pandas()
    train_rows, val_rows = cohort[cohort["split"] == "train"], cohort[cohort["split"] == "validate"]
    findings = StudyConditions(data_root) if raygen.findings_tokens else None  # the cohorts read once
    views = sorted(train_rows["view_position"].unique()) if raygen.view_token else []
    train = cohort_dataset(data_root, train_rows, vqgan_id, encoder_id, max_text_tokens, findings, views)
    generator_id = generator_run_id(raygen, max_text_tokens, vqgan_id, encoder_id, train_rows["dicom_id"].tolist(),
                                    train.labels.numpy())
    return generator_id, train_raygen(
        raygen, train, cohort_dataset(data_root, val_rows, vqgan_id, encoder_id, max_text_tokens, findings, views),
        layout.model_dir(data_root, "raygen", generator_id),
        text_dim=text_dim, codebook_size=vqgan.config.n_embed, grid_size=vqgan.config.latent_resolution,
        max_text_tokens=max_text_tokens, n_labels=train.labels.shape[1], views=views, on_eval=on_eval,
        on_samples=on_samples)


def load_raygen_generator(data_root: Path, generator_id: str, vqgan: VQGAN, text_encoder: TextEncoder,
                          sampling: SamplingParams, max_text_tokens: int) -> RayGenImageGenerator:
    device = text_encoder.device
    raygen = RayGen.from_pretrained(final_dir(layout.model_dir(data_root, "raygen", generator_id)),
                                    map_location=device)
    return RayGenImageGenerator(generator_id, raygen.to(device), vqgan.to(device), text_encoder, sampling,
                                max_text_tokens)


def load_generator(data_root: Path, generator_id: str, resolution: int, vqgan: VQGANSection,
                   text_settings: TextSection, sampling: RayGenSampling) -> RayGenImageGenerator:
    """A trained RayGen ready to generate: its VQ-GAN and text encoder prepared as the config names them."""
    device = resolve_device()
    prepared = prepare_vqgan(data_root, vqgan, resolution, device)
    encoder = load_text_encoder(text_settings.encoder, device)
    return load_raygen_generator(data_root, generator_id, prepared.model, encoder, sampling.params(),
                                 text_settings.max_tokens)
