"""A GAN conditioned on the 10-pathology label vector, the baseline against RayGen and latent diffusion.

Generator: residual upsampling blocks whose BatchNorms take their gain and bias from the label vector (conditional
BatchNorm, Miyato & Koyama 2018 / BigGAN). Discriminator: residual downsampling blocks and a projection head,
logit = psi(h) + <embed(y), h> (Miyato & Koyama), with embed(y) the sum of the present classes' embeddings, since
findings co-occur. Spectral norm on every weight of the discriminator and the generator's convolutions; hinge loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.pretrained import ModelConfig, Pretrained
from torch.nn.utils.parametrizations import spectral_norm

MIN_CHANNELS = 16


@dataclass
class LabelGANConfig(ModelConfig):
    """The networks' shape. No defaults here: the config's gan section holds them (tasks/config.py)."""

    resolution: int  # output side: base * 2**k
    n_labels: int
    z_dim: int
    channels: int  # the widest feature map (the generator's first, the discriminator's last)
    base: int  # the generator's first feature map side

    def __post_init__(self) -> None:
        ratio = self.resolution // self.base
        if self.resolution % self.base or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(f"resolution {self.resolution} is not base {self.base} times a power of 2 (>= 2)")

    @property
    def levels(self) -> int:
        return int(math.log2(self.resolution // self.base))

    def level_channels(self) -> list[int]:
        """Channels from the widest (at base) to the narrowest (at resolution), levels + 1 of them."""
        return [max(MIN_CHANNELS, self.channels >> level) for level in range(self.levels + 1)]


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose gain (1 + W_g y) and bias (W_b y) come from the label vector y."""

    def __init__(self, channels: int, n_labels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Linear(n_labels, channels, bias=False)
        self.bias = nn.Linear(n_labels, channels, bias=False)
        nn.init.zeros_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return self.norm(x) * (1 + self.gain(labels))[..., None, None] + self.bias(labels)[..., None, None]


def _conv(in_channels: int, out_channels: int, kernel: int) -> nn.Module:
    return spectral_norm(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2))


class GeneratorBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, n_labels: int) -> None:
        super().__init__()
        self.norm1 = ConditionalBatchNorm2d(in_channels, n_labels)
        self.conv1 = _conv(in_channels, out_channels, 3)
        self.norm2 = ConditionalBatchNorm2d(out_channels, n_labels)
        self.conv2 = _conv(out_channels, out_channels, 3)
        self.skip = _conv(in_channels, out_channels, 1)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        h = F.interpolate(F.relu(self.norm1(x, labels)), scale_factor=2)
        h = self.conv2(F.relu(self.norm2(self.conv1(h), labels)))
        return h + self.skip(F.interpolate(x, scale_factor=2))


class Generator(nn.Module):
    def __init__(self, config: LabelGANConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.level_channels()
        self.stem = spectral_norm(nn.Linear(config.z_dim, channels[0] * config.base ** 2))
        self.blocks = nn.ModuleList(GeneratorBlock(a, b, config.n_labels) for a, b in pairwise(channels))
        self.out_norm = nn.BatchNorm2d(channels[-1])
        self.out = _conv(channels[-1], 1, 3)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        """z [B, z_dim], labels [B, n_labels] in [0, 1] -> images [B, 1, R, R] in [-1, 1]."""
        h = self.stem(z).view(len(z), -1, self.config.base, self.config.base)
        for block in self.blocks:
            h = block(h, labels)
        return torch.tanh(self.out(F.relu(self.out_norm(h))))


class DiscriminatorBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, first: bool) -> None:
        super().__init__()
        self.first = first  # the image itself is not passed through a ReLU
        self.conv1 = _conv(in_channels, out_channels, 3)
        self.conv2 = _conv(out_channels, out_channels, 3)
        self.skip = _conv(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        return F.avg_pool2d(h, 2) + self.skip(F.avg_pool2d(x, 2))


class Discriminator(nn.Module):
    def __init__(self, config: LabelGANConfig) -> None:
        super().__init__()
        channels = [1, *reversed(config.level_channels())]
        # levels + 1 halvings: the last feature map is base / 2 a side.
        self.blocks = nn.ModuleList(DiscriminatorBlock(a, b, first=index == 0)
                                    for index, (a, b) in enumerate(pairwise(channels)))
        self.psi = spectral_norm(nn.Linear(channels[-1], 1))
        self.embed = spectral_norm(nn.Linear(config.n_labels, channels[-1], bias=False))

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """images [B, 1, R, R] in [-1, 1], labels [B, n_labels] -> logits [B]."""
        h = images
        for block in self.blocks:
            h = block(h)
        h = F.relu(h).sum(dim=(2, 3))
        return self.psi(h)[:, 0] + (self.embed(labels) * h).sum(1)


class LabelGAN(Pretrained):
    CONFIG_CLASS = LabelGANConfig

    def __init__(self, config: LabelGANConfig) -> None:
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)


def discriminator_hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_hinge_loss(fake_logits: Tensor) -> Tensor:
    return -fake_logits.mean()


def latent_noise(z_dim: int, generators: Sequence[torch.Generator], device: torch.device) -> Tensor:
    """One z a row, row i from generators[i] alone, so an image never depends on the rest of its batch."""
    return torch.stack([torch.randn(z_dim, generator=g, device=g.device) for g in generators]).to(device)
