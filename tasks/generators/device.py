"""The device a process trains and generates on."""

from __future__ import annotations

import os

import torch


def resolve_device(choice: str = "auto") -> torch.device:
    """"auto": the CUDA device of this process (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("the device is 'cuda' but torch sees no CUDA device")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device
