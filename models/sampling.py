"""MaskGIT sampling parameters, kept free of torch so that the config can take its defaults from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    steps: int  # K, decoding steps
    # Two temperatures, as in MaskGIT: `temperature` for drawing each token from its logits, and
    # `confidence_temperature` for the Gumbel noise on the confidences that decide which tokens to keep; the second
    # always anneals linearly to 0, the first does so only with temperature_decay "linear" (a constant token
    # temperature keeps late steps from collapsing onto the mode).
    temperature: float
    temperature_decay: str  # "linear" (T at the first step, greedy at the last) or "constant"
    confidence_temperature: float
    top_k_frac: float  # the share of the codebook that may be sampled (the paper's alpha = 1 - top_k_frac)
    schedule: str  # "cosine" or "linear": the share of tokens still masked after each step
    guidance_scale: float  # classifier-free guidance; 1: conditional model only, 0: unconditional
    guidance_schedule: str  # "constant", or "linear": from 1 at the first step up to guidance_scale at the last


# The RayGen paper's sampler: T=1.3 annealed to 0 for tokens and confidences alike, K=3, alpha=0.5, no guidance.
# The config's raygen.sampling defaults to it.
PAPER_SAMPLING = SamplingParams(steps=3, temperature=1.3, temperature_decay="linear", confidence_temperature=1.3,
                                top_k_frac=0.5, schedule="cosine", guidance_scale=1.0, guidance_schedule="constant")
