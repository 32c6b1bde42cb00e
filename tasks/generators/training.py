"""What every generator family's training loop shares: the result it returns, the learning-rate schedule, the
rows of each step and the per-shard random generators that make a resumed run repeat an uninterrupted one.

Everything random in a step is a function of (seed, step, shard), and the rows of a step come from
DistributedSampler's epoch permutation, so the step count is the whole data-order state that a checkpoint
(tasks/generators/checkpoints.py) must carry besides the weights and optimizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from models.vqgan import VQGAN
from tasks.generators.checkpoints import final_dir, is_trained, latest_checkpoint, save_final


class FitInputs(NamedTuple):
    """What every family's fit takes besides its config section: the data root and what the tokenize stage made."""

    data_root: Path
    resolution: int
    vqgan: VQGAN  # prepared by tokenize (tasks.generators.vqgan.training.prepare_vqgan), on the training device
    vqgan_id: str
    encoder_id: str  # the text encoder whose states the text_embeddings table holds
    text_dim: int
    max_text_tokens: int


@dataclass
class TrainResult:
    step: int  # optimizer steps done, over every run into this out_dir
    checkpoint: Path | None  # the latest checkpoint; None only when no step was run
    final_dir: Path | None  # the model's save_pretrained output; None when max_steps stopped the run early
    metrics: dict[str, float] = field(default_factory=dict)  # the latest evaluation


def finish_training(out_dir: Path, step: int, total_steps: int, save_pretrained: Callable[[Path], None],
                    metrics: dict[str, float]) -> TrainResult:
    """The end of every family's loop: at the last step rank 0 writes the final weights (once, never half written),
    every rank waits until they exist, and the result says where the checkpoint and final weights are."""
    distributed, rank, _ = process_rank()
    if step == total_steps and rank == 0 and not is_trained(out_dir):
        save_final(save_pretrained, out_dir)
    if distributed:
        dist.barrier()  # every rank returns once the files exist
    return TrainResult(step=step, checkpoint=latest_checkpoint(out_dir),
                       final_dir=final_dir(out_dir) if step == total_steps else None, metrics=metrics)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based): linear warmup reaching 1 at
    step warmup_steps - 1, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def shard_generator(seed: int, step: int, shard: int, device: torch.device) -> torch.Generator:
    """The generator behind shard `shard`'s random draws (masks, noise, condition dropout) at step `step`."""
    state = np.random.SeedSequence([seed, step, shard]).generate_state(2, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: matrices and embeddings are decayed; biases, norm gains and the like (1-d) are not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def process_rank() -> tuple[bool, int, int]:
    """(distributed, rank, world size) of this process: (False, 0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


class StepRows:
    """The training rows this rank takes at each optimizer step: its share (rows r, r + world, ...) of the global
    batch that DistributedSampler's permutation of the step's epoch gives, the tail of an epoch dropped."""

    def __init__(self, rows: int, batch_size: int, seed: int, rank: int, world: int, section: str):
        if batch_size % world:
            raise ValueError(f"{section}.batch_size {batch_size} is not divisible by {world} processes")
        self.sampler = DistributedSampler(range(rows), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.rank_batch = batch_size // world
        self.steps_per_epoch = len(self.sampler) // self.rank_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set has {rows} rows, fewer than {section}.batch_size {batch_size}")
        self._epoch, self._order = -1, []

    def __call__(self, step: int) -> Tensor:
        if step // self.steps_per_epoch != self._epoch:
            self._epoch = step // self.steps_per_epoch
            self.sampler.set_epoch(self._epoch)
            self._order = list(self.sampler)
        start = (step % self.steps_per_epoch) * self.rank_batch
        return torch.tensor(self._order[start:start + self.rank_batch])


class TensorRows(Dataset):
    """Rows of several tensors of equal length (images or latents, conditions, masks), any of them memory-mapped or
    half precision: indexing with a LongTensor of rows gives the batch, floating tensors as float32."""

    def __init__(self, *tensors: Tensor) -> None:
        if len({len(tensor) for tensor in tensors}) != 1:
            raise ValueError(f"row counts disagree: {[tuple(tensor.shape) for tensor in tensors]}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int | Tensor) -> tuple[Tensor, ...]:
        return tuple(t[index].float() if t.is_floating_point() else t[index] for t in self.tensors)


def adamw_warmup_cosine(model: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                        betas: tuple[float, float] = (0.9, 0.999)
                        ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over decay_groups and its lr_factor schedule, stepped once per optimizer step."""
    optimizer = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=betas)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps))


def ddp_wrapped(model: torch.nn.Module, device: torch.device, distributed: bool) -> torch.nn.Module:
    """The module the training step calls: the model itself, or under a process group its DDP wrapper."""
    if not distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
