"""RayGen behind the ImageGenerator interface: impression -> text states -> MaskGIT tokens -> VQ-GAN pixels."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from models.raygen import RayGen, SamplingParams, generate
from models.vqgan import VQGAN
from tasks.generator import GeneratedBatch
from tasks.text import TextEncoder


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
        states = [self.text_encoder.embed([prompt], self.max_text_tokens) for prompt in prompts]
        longest = max(hidden.shape[1] for hidden, _ in states)
        text = torch.zeros(len(prompts), longest, self.text_encoder.dim, device=self.text_encoder.device)
        mask = torch.zeros(len(prompts), longest, dtype=torch.bool, device=self.text_encoder.device)
        for row, (hidden, row_mask) in enumerate(states):
            text[row, : hidden.shape[1]] = hidden[0]
            mask[row, : hidden.shape[1]] = row_mask[0]
        return text, mask

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
