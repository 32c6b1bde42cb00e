"""Latent diffusion: diffusers' UNet2DConditionModel and its DDPM/DDIM schedulers, with one small projector that
turns any of the three conditions into the tokens the UNet cross-attends to.

The conditions: text (a text encoder's token states and padding mask), an image embedding (one feature vector of a
reference image, projected into a few tokens) and labels (the 10-pathology vector: one token a class, a learned
embedding of (class, present or not)). As in RayGen, a learned null token is always attendable, so the null
condition of classifier-free guidance is simply every condition token masked out, in every mode alike.

The diffused space is whatever the caller encodes into: the VQ-GAN's continuous pre-quantisation latents or the
pixels themselves, scaled by `latent_scale` to about unit variance (the scale factor of Rombach et al.).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn

from models.pretrained import ModelConfig, Pretrained

CONDITIONINGS = ("text", "image", "labels")


@dataclass
class LatentDiffusionConfig(ModelConfig):
    """The network's shape and noise schedule. No defaults here: the config's diffusion section holds them
    (tasks/config.py), and a saved model carries every field in its config.json."""

    conditioning: Literal["text", "image", "labels"]
    sample_size: int  # side of the diffused array: the VQ-GAN's latent grid, or the image resolution
    channels: int  # its channels: the VQ-GAN's embed_dim, or 1 for pixels
    cond_dim: int  # text encoder width, image feature width, or the number of labels
    max_cond_tokens: int  # text tokens; image: tokens an embedding is projected into; labels: the number of labels
    block_channels: tuple[int, ...]  # one UNet level each
    layers_per_block: int
    cross_dim: int
    head_dim: int
    train_timesteps: int
    # What the UNet predicts: the noise (epsilon), or v = sqrt(a) * noise - sqrt(1 - a) * x0 (Salimans & Ho), whose
    # x0 estimate does not amplify the network's error at high noise levels the way epsilon's 1 / sqrt(a) does.
    prediction: Literal["epsilon", "v_prediction"]
    latent_scale: float  # latents are multiplied by it before diffusion and divided after sampling
    clip_sample: bool  # clip predicted x0 to [-1, 1]: right for pixels, wrong for latents

    def __post_init__(self) -> None:
        self.block_channels = tuple(self.block_channels)
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction {self.prediction!r} is not 'epsilon' or 'v_prediction'")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning {self.conditioning!r} is not one of {CONDITIONINGS}")
        if any(channels % self.head_dim for channels in self.block_channels):
            raise ValueError(f"block_channels {self.block_channels} are not multiples of head_dim {self.head_dim}")
        if self.sample_size % 2 ** (len(self.block_channels) - 1):
            raise ValueError(f"sample_size {self.sample_size} does not halve {len(self.block_channels) - 1} times")


class ConditionProjector(nn.Module):
    """A condition -> (context [B, 1 + T, cross_dim], context_mask [B, 1 + T]), the null token first."""

    def __init__(self, config: LatentDiffusionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.cross_dim
        if config.conditioning == "text":
            self.project = nn.Linear(config.cond_dim, d)
        elif config.conditioning == "image":
            self.project = nn.Linear(config.cond_dim, config.max_cond_tokens * d)
        else:  # row 2c: class c absent, 2c + 1: present
            self.project = nn.Embedding(2 * config.cond_dim, d)
        # Per token over features: statistics across the sequence would mix in padding.
        self.norm = nn.LayerNorm(d)
        self.null = nn.Parameter(torch.randn(1, 1, d) * 0.02)

    def forward(self, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """values: text [B, T, D] float, image [B, D] float, or labels [B, L] in {0, 1}; mask [B, tokens] bool,
        False for padding or a dropped condition."""
        if self.config.conditioning == "text":
            tokens = self.project(values)
        elif self.config.conditioning == "image":
            tokens = self.project(values).unflatten(-1, (self.config.max_cond_tokens, -1))
        else:
            classes = torch.arange(values.shape[1], device=values.device)
            tokens = self.project(2 * classes + values.round().long())
        batch = values.shape[0]
        context = torch.cat([self.null.expand(batch, -1, -1), self.norm(tokens)], dim=1)
        return context, torch.cat([mask.new_ones(batch, 1), mask.bool()], dim=1)


class LatentDiffusion(Pretrained):
    CONFIG_CLASS = LatentDiffusionConfig

    def __init__(self, config: LatentDiffusionConfig) -> None:
        super().__init__()
        self.config = config
        levels = len(config.block_channels)
        self.conditioner = ConditionProjector(config)
        self.unet = UNet2DConditionModel(
            sample_size=config.sample_size, in_channels=config.channels, out_channels=config.channels,
            down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
            block_out_channels=config.block_channels, layers_per_block=config.layers_per_block,
            cross_attention_dim=config.cross_dim, norm_num_groups=math.gcd(32, *config.block_channels),
            # diffusers reads attention_head_dim as the number of heads (its documented naming quirk).
            attention_head_dim=tuple(channels // config.head_dim for channels in config.block_channels))

    def forward(self, noisy: Tensor, timesteps: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """The prediction (noise or v, as config.prediction says) for `noisy` [B, C, S, S] at `timesteps` [B]
        under the condition (values, mask)."""
        context, context_mask = self.conditioner(values, mask)
        return self.unet(noisy, timesteps, encoder_hidden_states=context, encoder_attention_mask=context_mask,
                         return_dict=False)[0]


def noise_scheduler(config: LatentDiffusionConfig, kind: Literal["ddpm", "ddim"] = "ddpm"
                    ) -> DDPMScheduler | DDIMScheduler:
    """The training schedule (cosine betas, the config's prediction) as DDPM or as DDIM over the same betas."""
    ddpm = DDPMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule="squaredcos_cap_v2",
                         clip_sample=config.clip_sample, prediction_type=config.prediction)
    return ddpm if kind == "ddpm" else DDIMScheduler.from_config(ddpm.config)


def diffusion_loss(model: nn.Module, scheduler: DDPMScheduler, x0: Tensor, values: Tensor, mask: Tensor,
                   generator: torch.Generator, cond_drop_prob: float) -> Tensor:
    """The MSE of the scheduler's prediction (the noise, or v) at uniform timesteps of `scheduler`
    (noise_scheduler's); a share cond_drop_prob of rows sees the null condition. model: a LatentDiffusion, or its
    DDP wrapper. x0 is already scaled by latent_scale; every random draw comes from `generator`."""
    batch, device = x0.shape[0], x0.device
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=device)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    keep = torch.rand(batch, generator=generator, device=device) >= cond_drop_prob
    noisy = scheduler.add_noise(x0, noise, timesteps)
    return F.mse_loss(model(noisy, timesteps, values, mask & keep[:, None]),
                      prediction_target(scheduler, x0, noise, timesteps))


def prediction_target(scheduler: DDPMScheduler, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the network should output for x0 noised with `noise` at `timesteps`: the noise, or v."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(x0, noise, timesteps)


@torch.no_grad()
def sample(model: LatentDiffusion, values: Tensor, mask: Tensor, generators: Sequence[torch.Generator], *,
           scheduler: Literal["ddim", "ddpm"], steps: int, guidance_scale: float, eta: float) -> Tensor:
    """One sample per row of the condition, [B, C, S, S] unscaled (divided by latent_scale), from the starting
    noise of generators[i] and its later noise draws: row i depends on generators[i] alone. DDPM walks every
    training timestep; DDIM `steps` of them with noise eta. Guidance: uncond + scale * (cond - uncond)."""
    config = model.config
    sampler = noise_scheduler(config, scheduler)
    sampler.set_timesteps(config.train_timesteps if scheduler == "ddpm" else steps, device=values.device)
    shape = (config.channels, config.sample_size, config.sample_size)
    x = torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(values.device)
    extra = {"eta": eta} if scheduler == "ddim" else {}
    for t in sampler.timesteps:
        timesteps = t.expand(len(x)).to(values.device)
        if guidance_scale == 1.0:
            prediction = model(x, timesteps, values, mask)
        else:
            both = model(torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([values, values]),
                         torch.cat([mask, torch.zeros_like(mask)]))
            conditional, unconditional = both.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        x = sampler.step(prediction, t, x, generator=list(generators), **extra).prev_sample
    return x / config.latent_scale
