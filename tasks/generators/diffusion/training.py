"""Latent diffusion's training loop: AdamW with warmup and cosine decay, checkpoints with exact resume, DDP.

A step's rows come from tasks.generators.training.StepRows and its timesteps, noise and condition dropout from a
generator seeded by (seed, step, rank), so a resumed run repeats exactly what an uninterrupted one does. Under DDP
(initialise the process group first, as for RayGen) each rank takes its share of the global batch, the gradients
are averaged, and only rank 0 evaluates, calls back and writes files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from models.latent_diffusion import diffusion_loss, LatentDiffusion, LatentDiffusionConfig, noise_scheduler
from tasks.config import DiffusionSection
from tasks.generators.checkpoints import resume_training, save_training_state
from tasks.generators.device import resolve_device
from tasks.generators.training import (adamw_warmup_cosine, ddp_wrapped, finish_training, process_rank,
                                       shard_generator, StepRows, TensorRows, TrainResult)
from tasks.progress import ProgressBar


@torch.no_grad()
def evaluate(model: LatentDiffusion, dataset: TensorRows, batch_size: int, seed: int,
             device: torch.device) -> dict[str, float]:
    """Validation loss with every row's condition and with the null condition, on the same timesteps and noise (a
    fresh generator per pass): their gap is what the model takes from the condition."""
    was_training = model.training
    model.eval()
    scheduler = noise_scheduler(model.config)
    metrics = {}
    for name, drop in (("val/loss", 0.0), ("val/loss_null_condition", 1.0)):
        generator, total = torch.Generator(device=device).manual_seed(seed), 0.0
        for start in range(0, len(dataset), batch_size):
            x0, values, mask = (t.to(device) for t in dataset[torch.arange(start, min(start + batch_size,
                                                                                     len(dataset)))])
            total += diffusion_loss(model, scheduler, x0, values, mask, generator, drop).item() * len(x0)
        metrics[name] = total / len(dataset)
    model.train(was_training)
    return metrics | {"val/condition_gain": metrics["val/loss_null_condition"] - metrics["val/loss"]}


def train_diffusion(section: DiffusionSection, model_config: LatentDiffusionConfig, train: TensorRows,
                    val: TensorRows, out_dir: Path, *, on_eval: Callable[[int, dict[str, float]], None] | None = None,
                    max_steps: int | None = None) -> TrainResult:
    """Train (or resume training) a LatentDiffusion of `model_config` into out_dir up to section.steps steps, on
    rows of (x0 scaled by latent_scale, condition values, condition mask).

    Every checkpoint_every steps, and when it stops, a checkpoint and on_eval(step, {"val/loss",
    "val/loss_null_condition", "val/condition_gain", "train/loss", "lr"}); max_steps stops this call at that step
    (the schedule still spans section.steps). The finished model goes to out_dir/final."""
    out_dir = Path(out_dir)
    distributed, rank, world = process_rank()
    device = resolve_device(section.device)
    torch.manual_seed(section.seed)
    model = LatentDiffusion(model_config).to(device)
    optimizer, schedule = adamw_warmup_cosine(model, section.lr, section.weight_decay, section.warmup_steps,
                                              section.steps)
    data_order = {"seed": section.seed, "batch_size": section.batch_size, "rows": len(train)}
    step, metrics = resume_training(out_dir, data_order, model=model, optimizer=optimizer, scheduler=schedule)
    ddp_model = ddp_wrapped(model, device, distributed)
    step_rows = StepRows(len(train), section.batch_size, section.seed, rank, world, "diffusion")
    noise = noise_scheduler(model_config)

    stop = min(section.steps, max_steps or section.steps)
    progress = ProgressBar(total=section.steps, initial=step, disable=rank != 0, desc="diffusion", unit="step",
                           description="diffusion training", dynamic_ncols=True)
    train_losses = []
    while step < stop:
        x0, values, mask = (t.to(device, non_blocking=True) for t in train[step_rows(step)])
        optimizer.zero_grad(set_to_none=True)
        loss = diffusion_loss(ddp_model, noise, x0, values, mask, shard_generator(section.seed, step, rank, device),
                              section.cond_drop_prob)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), section.grad_clip)
        optimizer.step()
        lr = schedule.get_last_lr()[0]
        schedule.step()
        step += 1
        if rank != 0:
            continue
        train_losses.append(loss.item())
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        if step % section.checkpoint_every == 0 or step == stop:
            metrics = evaluate(model, val, step_rows.rank_batch, section.seed, device)
            metrics |= {"train/loss": sum(train_losses) / len(train_losses), "lr": lr}
            train_losses = []
            if on_eval is not None:
                on_eval(step, metrics)
            save_training_state(out_dir, step, data_order, metrics, section.keep_checkpoints, model=model,
                                optimizer=optimizer, scheduler=schedule)
    progress.close()

    return finish_training(out_dir, step, section.steps, model.save_pretrained, metrics)
