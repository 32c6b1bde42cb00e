"""The label-conditioned GAN's training loop: d_steps discriminator steps, then one generator step, Adam with
BigGAN's betas (0, 0.9), hinge loss, checkpoints with exact resume.

Each discriminator step takes its own real batch (StepRows at index step * d_steps + k) and every z of a step comes
from a generator seeded by (seed, step, rank), so a resumed run repeats exactly what an uninterrupted one does. Under
DDP each rank takes its share of the global batch, both networks' gradients are averaged and only rank 0 calls back
and writes files; the generator's BatchNorms use each rank's own batch statistics (BigGAN's per-device kind).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from models.label_gan import discriminator_hinge_loss, generator_hinge_loss, LabelGAN, LabelGANConfig
from tasks.config import GANSection
from tasks.generators.checkpoints import resume_training, save_training_state
from tasks.generators.device import resolve_device
from tasks.generators.training import (ddp_wrapped, finish_training, process_rank, shard_generator, StepRows,
                                       TensorRows, TrainResult)
from tasks.progress import ProgressBar

BETAS = (0.0, 0.9)


def train_gan(section: GANSection, model_config: LabelGANConfig, train: TensorRows, out_dir: Path, *,
              on_eval: Callable[[int, dict[str, float]], None] | None = None,
              max_steps: int | None = None) -> TrainResult:
    """Train (or resume training) a LabelGAN into out_dir up to section.steps generator steps, on rows of (images
    uint8 [R, R], labels [n_labels]). Every checkpoint_every steps, and when it stops, a checkpoint and
    on_eval(step, {"train/d_loss", "train/g_loss"}, the means since the last); the finished model goes to
    out_dir/final."""
    out_dir = Path(out_dir)
    distributed, rank, world = process_rank()
    device = resolve_device(section.device)
    torch.manual_seed(section.seed)
    model = LabelGAN(model_config).to(device)
    g_optimizer = torch.optim.Adam(model.generator.parameters(), lr=section.g_lr, betas=BETAS)
    d_optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=section.d_lr, betas=BETAS)
    data_order = {"seed": section.seed, "batch_size": section.batch_size, "rows": len(train),
                  "d_steps": section.d_steps}
    step, metrics = resume_training(out_dir, data_order, model=model, g_optimizer=g_optimizer,
                                    d_optimizer=d_optimizer)
    step_rows = StepRows(len(train), section.batch_size, section.seed, rank, world, "gan")
    ddp_generator = ddp_wrapped(model.generator, device, distributed)
    ddp_discriminator = ddp_wrapped(model.discriminator, device, distributed)

    def noise(generator: torch.Generator) -> torch.Tensor:
        return torch.randn(step_rows.rank_batch, model_config.z_dim, generator=generator, device=device)

    def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Real and fake rows in one pass: DDP reduces gradients once per forward, and spectral norm's power
        # iteration then runs once a step, with or without DDP.
        logits = ddp_discriminator(torch.cat([real, fake]), torch.cat([labels, labels]))
        return discriminator_hinge_loss(*logits.chunk(2))

    stop = min(section.steps, max_steps or section.steps)
    losses = {"train/d_loss": [], "train/g_loss": []}
    model.train()
    with ProgressBar(total=section.steps, initial=step, disable=rank != 0, desc="gan", unit="step",
                     description="gan training", dynamic_ncols=True) as progress:
        while step < stop:
            generator = shard_generator(section.seed, step, rank, device)
            for k in range(section.d_steps):
                images, labels = train[step_rows(step * section.d_steps + k)]
                real = images.to(device).float()[:, None] / 127.5 - 1.0
                labels = labels.to(device)
                with torch.no_grad():
                    fake = model.generator(noise(generator), labels)
                d_loss = discriminator_loss(real, fake, labels)
                d_optimizer.zero_grad(set_to_none=True)
                d_loss.backward()
                d_optimizer.step()
            g_loss = generator_hinge_loss(model.discriminator(ddp_generator(noise(generator), labels), labels))
            g_optimizer.zero_grad(set_to_none=True)
            g_loss.backward()
            g_optimizer.step()
            step += 1
            if rank != 0:
                continue
            losses["train/d_loss"].append(d_loss.item())
            losses["train/g_loss"].append(g_loss.item())
            progress.update()
            progress.set_postfix(d=f"{d_loss.item():.3f}", g=f"{g_loss.item():.3f}")
            if step % section.checkpoint_every == 0 or step == stop:
                metrics = {name: sum(values) / len(values) for name, values in losses.items()}
                losses = {name: [] for name in losses}
                if on_eval is not None:
                    on_eval(step, metrics)
                save_training_state(out_dir, step, data_order, metrics, section.keep_checkpoints, model=model,
                                    g_optimizer=g_optimizer, d_optimizer=d_optimizer)

    return finish_training(out_dir, step, section.steps, model.save_pretrained, metrics)
