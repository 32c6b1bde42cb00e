"""The VQ-GAN's adversary: taming's NLayerDiscriminator (pix2pix's PatchGAN)."""

from __future__ import annotations

from torch import nn, Tensor


class PatchDiscriminator(nn.Module):
    """taming's NLayerDiscriminator (pix2pix's PatchGAN): one real/fake logit per overlapping image patch."""

    def __init__(self, channels: int, width: int, layers: int) -> None:
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        out = width
        for n in range(1, layers + 1):
            inp, out = out, width * min(2**n, 8)
            modules += [nn.Conv2d(inp, out, 4, 2 if n < layers else 1, 1, bias=False), nn.BatchNorm2d(out),
                        nn.LeakyReLU(0.2)]
        modules.append(nn.Conv2d(out, 1, 4, 1, 1))
        self.main = nn.Sequential(*modules)
        for module in self.modules():  # taming's weights_init: DCGAN's
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.main(images)

    def features(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """The output of every LeakyReLU, coarser with depth (what pix2pixHD's feature-matching loss compares), and
        the logits forward gives, from the same pass."""
        out = []
        for module in self.main:
            images = module(images)
            if isinstance(module, nn.LeakyReLU):
                out.append(images)
        return out, images
