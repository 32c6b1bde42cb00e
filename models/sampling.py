"""MaskGIT sampling parameters, kept free of torch so that the config can take its defaults from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    steps: int  # K, decoding steps
    temperature: float  # T, annealed to 0 over the steps
    top_k_frac: float  # the share of the codebook that may be sampled (the paper's alpha = 1 - top_k_frac)
    schedule: str  # "cosine" or "linear": the share of tokens still masked after each step
    guidance_scale: float  # classifier-free guidance; 1: conditional model only, 0: unconditional


# The RayGen paper's sampler: T=1.3, K=3, alpha=0.5, no guidance. The config's raygen.sampling defaults to it.
PAPER_SAMPLING = SamplingParams(steps=3, temperature=1.3, top_k_frac=0.5, schedule="cosine", guidance_scale=1.0)
