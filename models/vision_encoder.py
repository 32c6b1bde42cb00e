"""A pretrained vision backbone from a local Hugging Face folder (RAD-DINO, another DINOv2 or ViT, CLIP's vision
tower): uint8 grey images -> its pooled embedding. The one place that prepares images as such a folder's image
processor says; RAD-DINO's FID features and image-conditioned diffusion both embed through it.

Loaded offline (local_files_only): the weights are a download this project cannot make, so the folder is given.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoImageProcessor, AutoModel

PROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")


def is_vision_folder(folder: Path) -> bool:
    """A Hugging Face model folder with an image processor (what VisionEncoder loads)."""
    return (Path(folder) / "config.json").is_file() and (Path(folder) / PROCESSOR_FILE).is_file()


class VisionEncoder(nn.Module):
    """uint8 [B, 3, H, W] (or [B, H, W] grey) -> the backbone's pooled output [B, dim], without gradients."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        folder = Path(folder)
        if not is_vision_folder(folder):
            raise ValueError(f"{folder} is not a Hugging Face vision model folder (needs config.json and "
                             f"{PROCESSOR_FILE})")
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        if not hasattr(self.model.config, "hidden_size"):
            raise ValueError(f"{folder}: {type(self.model).__name__} is not a vision backbone with a pooled output "
                             "(for CLIP, save its vision tower, CLIPVisionModel)")
        self.dim: int = self.model.config.hidden_size
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        # Square inputs: resizing the shorter side and centre-cropping to a square is one resize to that side.
        size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
        self.side = size.height or size.shortest_edge
        self.rescale = processor.rescale_factor if processor.do_rescale else 1.0
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, -1, 1, 1), persistent=False)
        weights = [folder / name for name in WEIGHTS_FILES if (folder / name).is_file()]
        if not weights:
            raise ValueError(f"{folder}: no weights file ({' or '.join(WEIGHTS_FILES)})")
        with open(weights[0], "rb") as handle:
            self.weights_digest = hashlib.file_digest(handle, "sha256").hexdigest()[:12]

    def pixel_values(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] -> the model's input [B, 3, side, side]."""
        # As the processor resizes (PIL: antialiased bicubic on uint8 pixels, so clamped: bicubic overshoots).
        x = F.interpolate(images.float(), size=(self.side, self.side), mode="bicubic", align_corners=False,
                          antialias=True)
        return (x.clamp(0, 255) * self.rescale - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.ndim == 3:  # grey: the three channels are copies, as a radiograph's RGB rendering is
            images = images[:, None].expand(-1, 3, -1, -1)
        return self.model(pixel_values=self.pixel_values(images)).pooler_output
