"""How a model trained here is saved and loaded: its config dataclass as config.json beside its weights (model.pt),
so a saved folder rebuilds the network it holds without the run's config."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar, Self

import torch
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"


class ModelConfig:
    """Mixin of a model's config dataclass: to and from the dict config.json holds."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Self:
        return cls(**values)


class Pretrained(nn.Module):
    """Mixin of a model built from one `config` (an instance of CONFIG_CLASS)."""

    CONFIG_CLASS: ClassVar[type[ModelConfig]]
    config: ModelConfig

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
        torch.save(self.state_dict(), directory / WEIGHTS_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> Self:
        directory = Path(directory)
        model = cls(cls.CONFIG_CLASS.from_dict(json.loads((directory / CONFIG_FILE).read_text())))
        model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location=map_location, weights_only=True))
        return model
