"""The taming-transformers VQ-GAN (Esser et al., 2021), the image tokenizer of RayGen, in plain torch.

Module and parameter names follow taming's `VQModel` (taming/models/vqgan.py) with its `Encoder` and `Decoder`
(taming/modules/diffusionmodules/model.py) and `VectorQuantizer2` (taming/modules/vqvae/quantize.py) key for key,
so a taming checkpoint, such as UniXGen's MIMIC-CXR tokenizer (512 px, 32x32 tokens, 1024 codes), loads strictly.

Channels: UniXGen trained its tokenizer on MIMIC-CXR JPEGs converted to RGB (three equal channels) and scaled to
[-1, 1]. A grayscale X-ray is fed to such a 3-channel model by repeating its channel (`encode_to_indices` and
`forward` do that for 1-channel input) and read back as the mean of the decoded channels
(`decode_indices(..., grayscale=True)`). A model trained here can be 1-channel end to end.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# taming's VQModel keeps its training loss (VQLPIPSWithDiscriminator) as `self.loss`, so a Lightning checkpoint
# carries LPIPS (VGG16, linear heads, scaling buffers) and the PatchGAN discriminator next to the model. These are
# the only keys skipped on load; anything else that does not match the model is an error.
TRAINING_LOSS_PREFIXES = ("loss.perceptual_loss.", "loss.discriminator.")

# taming's Normalize: GroupNorm with 32 groups, so every feature width must be a multiple of 32.
_NORM_GROUPS = 32

_DDCONFIG_REQUIRED = ("resolution", "in_channels", "out_ch", "ch", "num_res_blocks", "attn_resolutions", "z_channels")
# The defaults of taming's Encoder/Decoder signatures, which apply when a project YAML leaves the key out.
_DDCONFIG_TAMING_DEFAULTS = {"ch_mult": (1, 2, 4, 8), "dropout": 0.0, "double_z": True}


@dataclass(frozen=True)
class VQGANConfig:
    """taming's ddconfig plus n_embed and embed_dim, and the knobs for training a tokenizer here.

    Defaults are taming's ImageNet f16 model (256 px in, 16x16 tokens, 1024 codes).
    """

    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    double_z: bool = False
    dropout: float = 0.0
    n_embed: int = 1024
    embed_dim: int = 256
    beta: float = 0.25
    """Weight of the commitment term that keeps encoder outputs near their codes."""
    dead_code_restart_after: int | None = 16
    """Re-seed a code on a current encoder output once no training batch has chosen it for this many steps, so the
    codebook does not collapse onto a few entries; None turns it off. Inference never changes the codebook."""

    def __post_init__(self) -> None:
        # YAML and JSON give lists; tuples keep configs comparable and hashable.
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        if self.double_z:
            raise ValueError("double_z=True is for KL autoencoders; a VQ-GAN's quant_conv takes z_channels inputs")
        narrow = sorted({self.ch * m for m in self.ch_mult if (self.ch * m) % _NORM_GROUPS})
        if narrow:
            raise ValueError(f"feature widths {narrow} (ch * ch_mult) must be multiples of {_NORM_GROUPS} for GroupNorm")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution {self.resolution} is not divisible by {self.downsample_factor}")
        if self.dead_code_restart_after is not None and self.dead_code_restart_after < 1:
            raise ValueError("dead_code_restart_after must be >= 1, or None to turn restarts off")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_resolution(self) -> int:
        """Side of the token grid for an image at `resolution` (32 for UniXGen's 512 px model)."""
        return self.resolution // self.downsample_factor

    @classmethod
    def from_taming_yaml(cls, path: str | Path, **overrides: Any) -> VQGANConfig:
        """Read a taming/UniXGen project YAML (model.params.ddconfig, n_embed, embed_dim); `overrides` set the
        fields taming's YAML has no place for (beta, dead_code_restart_after)."""
        path = Path(path)
        doc = yaml.safe_load(path.read_text())
        try:
            model = doc["model"]
            params = model["params"]
            ddconfig, n_embed, embed_dim = params["ddconfig"], params["n_embed"], params["embed_dim"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a taming project YAML, model.params lacks {exc}") from None
        target = model.get("target", "")
        if not target.endswith(".VQModel"):
            raise ValueError(f"{path}: model.target is {target!r}; only taming's VQModel is supported")
        if params.get("remap") is not None:
            raise ValueError(f"{path}: index remapping (model.params.remap) is not supported")
        missing = [k for k in _DDCONFIG_REQUIRED if k not in ddconfig]
        unknown = sorted(set(ddconfig) - set(_DDCONFIG_REQUIRED) - set(_DDCONFIG_TAMING_DEFAULTS))
        if missing or unknown:
            raise ValueError(f"{path}: ddconfig lacks {missing} / has unsupported keys {unknown}")
        return cls(**{**_DDCONFIG_TAMING_DEFAULTS, **ddconfig, "n_embed": n_embed, "embed_dim": embed_dim, **overrides})


def _normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_NORM_GROUPS, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # taming creates the 1x1 projection only where the width changes, so only there does the key exist.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with taming's 1x1-conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, height, width))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # taming pads right and bottom only, which a symmetric conv padding cannot express.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResolutionLevel(nn.Module):
    """Residual blocks at one resolution, each followed by attention where the level attends; the owner attaches
    the `downsample` or `upsample` that leaves the level, under taming's names."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attend: bool, dropout: float) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(i, o, dropout) for i, o in zip(widths, widths[1:]))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attend else 0))

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return h


class MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        resolution, width = config.resolution, config.ch
        for i, mult in enumerate(config.ch_mult):
            level = ResolutionLevel(
                width, config.ch * mult, config.num_res_blocks, resolution in config.attn_resolutions, config.dropout
            )
            width = config.ch * mult
            if i != len(config.ch_mult) - 1:
                level.downsample = Downsample(width)
                resolution //= 2
            self.down.append(level)
        self.mid = MidBlock(width, config.dropout)
        self.norm_out = _normalize(width)
        self.conv_out = nn.Conv2d(width, config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            h = level(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        width = config.ch * config.ch_mult[-1]
        resolution = config.latent_resolution
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid = MidBlock(width, config.dropout)
        levels = []
        for i in reversed(range(len(config.ch_mult))):
            level = ResolutionLevel(
                width, config.ch * config.ch_mult[i], config.num_res_blocks + 1,
                resolution in config.attn_resolutions, config.dropout,
            )
            width = config.ch * config.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(width)
                resolution *= 2
            levels.append(level)
        # taming indexes `up` by level (up.0 is the full-resolution level) although it runs them deepest first.
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _normalize(width)
        self.conv_out = nn.Conv2d(width, config.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class CodebookUsage(NamedTuple):
    perplexity: Tensor
    """exp(entropy) of the batch's code histogram: n_embed when codes are used uniformly, 1 when collapsed."""
    used_fraction: Tensor
    """Share of the codebook chosen at least once in the batch."""


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient (taming's VectorQuantizer2 layout:
    `embedding.weight`), plus dead-code restarts while training."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float, restart_after: int | None) -> None:
        super().__init__()
        self.n_embed = n_embed
        self.beta = beta
        self.restart_after = restart_after
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        # Not persistent: taming checkpoints have no such key, and a reload only postpones the next restart.
        self.register_buffer("steps_unused", torch.zeros(n_embed, dtype=torch.long), persistent=False)

    def nearest_indices(self, z: Tensor) -> Tensor:
        """[B, embed_dim, h, w] latents -> [B, h, w] indices of the nearest codes (squared L2)."""
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        # In fp32 even under autocast: in bf16 near-equal distances round together and argmin picks wrong codes.
        with torch.autocast(z.device.type, enabled=False):
            flat, codes = flat.float(), self.embedding.weight.detach().float()
            distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)
        return distances.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def get_codebook_entry(self, indices: Tensor) -> Tensor:
        """[B, h, w] indices -> [B, embed_dim, h, w] code vectors."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, CodebookUsage]:
        restarting = self.training and self.restart_after is not None
        if restarting:
            self._restart_dead_codes(z)
        indices = self.nearest_indices(z)
        z_q = self.get_codebook_entry(indices)
        # Codebook term moves codes to the encoder outputs; the beta-weighted commitment term keeps the encoder near
        # its codes. (taming's VQModel puts beta on the codebook term, a bug it keeps as legacy=True; it only matters
        # when training, and a trained checkpoint is unaffected.)
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        counts = torch.bincount(indices.flatten(), minlength=self.n_embed)
        if restarting:
            self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        p = counts.float() / counts.sum()
        usage = CodebookUsage(torch.exp(-torch.special.xlogy(p, p).sum()), (counts > 0).float().mean())
        straight_through = z + (z_q - z).detach()
        return straight_through, loss, indices, usage

    @torch.no_grad()
    def _restart_dead_codes(self, z: Tensor) -> None:
        dead = (self.steps_unused >= self.restart_after).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # Re-seeded on encoder outputs of this batch, a code sits where the data is and gets chosen again. Each
        # process draws its own: under DDP the codebooks would drift apart, so train the tokenizer in one process.
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        weights = torch.ones(flat.shape[0], device=z.device)
        picks = torch.multinomial(weights, dead.numel(), replacement=dead.numel() > flat.shape[0])
        self.embedding.weight[dead] = flat[picks].to(self.embedding.weight.dtype)
        self.steps_unused[dead] = 0


class VQGANOutput(NamedTuple):
    reconstruction: Tensor
    """[B, out_ch, H, W], the decoder's unclamped output, for the training loss."""
    vq_loss: Tensor
    indices: Tensor
    """[B, h, w] code indices."""
    usage: CodebookUsage


class VQGAN(nn.Module):
    """taming's VQModel without its training loss: encoder -> quant_conv -> quantize -> post_quant_conv -> decoder.

    Images are [B, C, H, W] in [-1, 1], with C = config.in_channels or 1 (repeated, see the module docstring) and H,
    W multiples of config.downsample_factor.
    """

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, config.beta, config.dead_code_restart_after)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def forward(self, images: Tensor) -> VQGANOutput:
        z_q, vq_loss, indices, usage = self.quantize(self._latents(images))
        return VQGANOutput(self._decode(z_q), vq_loss, indices, usage)

    @torch.no_grad()
    def encode_to_indices(self, images: Tensor) -> Tensor:
        """[B, C, H, W] in [-1, 1] -> LongTensor [B, H/f, W/f]. Never changes the codebook, even in train mode."""
        return self.quantize.nearest_indices(self._latents(images))

    def decode_indices(self, indices: Tensor, grayscale: bool = False) -> Tensor:
        """LongTensor [B, h, w] -> [B, out_ch, h*f, w*f] in [-1, 1]; with grayscale=True, [B, 1, ...] as the mean of
        the channels, which is how an X-ray comes back out of an RGB checkpoint."""
        images = self._decode(self.quantize.get_codebook_entry(indices)).clamp(-1.0, 1.0)
        return images.mean(1, keepdim=True) if grayscale else images

    @torch.no_grad()
    def encode_latents(self, images: Tensor) -> Tensor:
        """[B, C, H, W] in [-1, 1] -> the continuous pre-quantisation latents [B, embed_dim, H/f, W/f] (what latent
        diffusion diffuses)."""
        return self._latents(images)

    def decode_latents(self, latents: Tensor, grayscale: bool = False) -> Tensor:
        """Continuous latents -> images as decode_indices gives them, through the nearest codes: the decoder was
        only ever trained on quantised latents."""
        return self.decode_indices(self.quantize.nearest_indices(latents), grayscale)

    def get_last_layer(self) -> nn.Parameter:
        """The decoder's final conv weight, on which taming measures the gradients that set the adaptive weight of
        the adversarial loss."""
        return self.decoder.conv_out.weight

    def _latents(self, images: Tensor) -> Tensor:
        channels, factor = self.config.in_channels, self.config.downsample_factor
        if images.ndim != 4 or images.shape[1] not in (1, channels) or images.shape[2] % factor or images.shape[3] % factor:
            raise ValueError(
                f"expected images [B, {channels} or 1, H, W] with H and W multiples of {factor}, got {tuple(images.shape)}"
            )
        if images.shape[1] != channels:
            images = images.repeat(1, channels, 1, 1)
        return self.quant_conv(self.encoder(images))

    def _decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | Path, config: VQGANConfig) -> VQGAN:
        """Load a taming/UniXGen Lightning checkpoint (weights under 'state_dict') strictly, in eval mode: every
        model key must be present with its shape, only TRAINING_LOSS_PREFIXES are skipped."""
        ckpt_path = Path(ckpt_path)
        checkpoint = _load_lightning_checkpoint(ckpt_path)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(f"{ckpt_path}: not a Lightning checkpoint, it has no 'state_dict'")
        weights = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(TRAINING_LOSS_PREFIXES)}
        model = cls(config)
        model._load_strict(weights, ckpt_path)
        return model.eval()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors, which from_pretrained reads back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        save_file(self.state_dict(), str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VQGAN:
        """Load what save_pretrained wrote, in eval mode."""
        directory = Path(directory)
        model = cls(VQGANConfig(**json.loads((directory / CONFIG_NAME).read_text())))
        model._load_strict(load_file(str(directory / WEIGHTS_NAME)), directory / WEIGHTS_NAME)
        return model.eval()

    def _load_strict(self, weights: dict[str, Tensor], source: Path) -> None:
        expected = self.state_dict()
        problems = {
            "missing": sorted(expected.keys() - weights.keys()),
            "unexpected": sorted(weights.keys() - expected.keys()),
            "shape mismatch": [
                f"{k} {tuple(weights[k].shape)} in file, {tuple(v.shape)} in model"
                for k, v in expected.items()
                if k in weights and weights[k].shape != v.shape
            ],
        }
        if any(problems.values()):
            listing = "\n".join(f"  {kind}: {', '.join(keys)}" for kind, keys in problems.items() if keys)
            raise ValueError(f"{source} does not fit VQGAN with {self.config}:\n{listing}")
        self.load_state_dict(weights, strict=True)


class _Inert:
    """Stand-in for a class pickled in a checkpoint that the loader neither imports nor runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _load_lightning_checkpoint(path: Path) -> Any:
    """torch.load(weights_only=True) that tolerates the objects Lightning pickles next to the weights.

    Lightning 1.x keys checkpoint['callbacks'] by callback class and may store OmegaConf hyper-parameters, globals
    that weights_only refuses. Allowing inert stand-ins under their names, rather than the real classes, keeps the
    load free of imports and of code execution; nothing is read from them.
    """
    # The scan reads the zip format (torch >= 1.6, all Lightning checkpoints); a legacy file loads without it.
    foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path) if zipfile.is_zipfile(path) else []
    stand_ins = [(type(name.rpartition(".")[2], (_Inert,), {}), name) for name in foreign]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True)
