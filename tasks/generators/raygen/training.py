"""RayGen's training loop: AdamW with warmup and cosine decay, accumulation, checkpoints with exact resume, DDP.

One optimizer step sees `batch_size` rows, split into world_size x grad_accum shards. Everything random in a
step is a function of (seed, step, shard): the rows come from DistributedSampler's epoch permutation, the token
masks and text dropout from a generator seeded per shard. So the step count is the whole data-order state, a
resumed run repeats exactly what an uninterrupted one would have done, and 2 processes x 1 micro-batch train the
same model as 1 process x 2 micro-batches (shard j is rank j % world_size, micro-step j // world_size).

Launch under DDP by initialising the process group first (torchrun + init_process_group, or
torch.multiprocessing.spawn); train_raygen then wraps the model, and only rank 0 evaluates, calls back and writes
files. Checkpoints go to a folder every rank can read, since every rank resumes from it.

The weights that are evaluated, sampled from and saved as final are an exponential moving average of the trained
ones (torch's AveragedModel), updated after every optimizer step and checkpointed with them: a masked-token model's
samples sharpen with averaged weights, and the average is what a resumed run must continue exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import Dataset

from models.raygen import generate, masked_token_loss, RayGen, RayGenConfig
from tasks.config import RayGenSection
from tasks.generators.checkpoints import resume_training, save_training_state
from tasks.generators.device import resolve_device
from tasks.generators.training import (adamw_warmup_cosine, ddp_wrapped, finish_training, process_rank,
                                       shard_generator, StepRows, TrainResult)
from tasks.progress import ProgressBar

Batch = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


class TokenTextDataset(Dataset):
    """Rows of (image tokens LongTensor [N], text float [T, D], text_mask bool [T], labels float [L], views long
    [V]) held as five tensors; L is 0 for a RayGen without findings tokens, V is 0 without a view token and 1 with
    one (the index of the image's view in RayGenConfig.views).

    The tensors may be memory-mapped (torch.from_numpy over np.load(..., mmap_mode="r")) and the text may be
    stored in half precision: a row is read, and its text made float32, only when it is indexed. Indexing with a
    LongTensor of rows returns the batch."""

    def __init__(self, tokens: Tensor, text: Tensor, text_mask: Tensor, labels: Tensor | None = None,
                 views: Tensor | None = None) -> None:
        labels = torch.zeros(len(tokens), 0) if labels is None else labels
        views = torch.zeros(len(tokens), 0, dtype=torch.long) if views is None else views
        named = {"tokens": tokens, "text": text, "text_mask": text_mask, "labels": labels, "views": views}
        shapes = ", ".join(f"{name} {tuple(tensor.shape)}" for name, tensor in named.items())
        if not (tokens.ndim == 2 and text.ndim == 3 and text_mask.ndim == 2 and labels.ndim == 2 and views.ndim == 2):
            raise ValueError(f"need tokens [M, N], text [M, T, D], text_mask [M, T], labels [M, L], views [M, V]; "
                             f"got {shapes}")
        if (not len(tokens) == len(text) == len(text_mask) == len(labels) == len(views)
                or text.shape[1] != text_mask.shape[1]):
            raise ValueError(f"row or text-token counts disagree: {shapes}")
        self.tokens, self.text, self.text_mask, self.labels, self.views = tokens, text, text_mask, labels, views

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int | Tensor) -> Batch:
        return (self.tokens[index].long(), self.text[index].float(), self.text_mask[index].bool(),
                self.labels[index].float(), self.views[index].long())


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[Batch],
               generators: list[torch.Generator], *, grad_clip: float,
               autocast: contextlib.AbstractContextManager) -> float:
    """One optimizer step over micro-batches whose gradients are averaged (and, under DDP, across ranks), then
    clipped to grad_clip. Returns the mean loss of this rank's micro-batches."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for index, ((tokens, text, text_mask, labels, views), generator) in enumerate(zip(micro_batches, generators)):
        # DDP all-reduces the gradients on the last micro-batch's backward only.
        last = index == len(micro_batches) - 1
        ddp_accumulating = isinstance(model, DistributedDataParallel) and not last
        with model.no_sync() if ddp_accumulating else contextlib.nullcontext():
            with autocast:
                loss, _ = masked_token_loss(model, tokens, text, text_mask, generator, labels=labels, views=views)
            (loss / len(micro_batches)).backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return total / len(micro_batches)


@torch.no_grad()
def evaluate(model: RayGen, dataset: TokenTextDataset, batch_size: int, seed: int, device: torch.device,
             autocast: contextlib.AbstractContextManager) -> dict[str, float]:
    """Validation loss and masked-token accuracy, averaged over masked tokens, with every row's text (no dropout),
    and the loss with the null text on the same masks: their gap is what the model takes from the text. A fresh
    generator per pass gives every evaluation the same masks, so values compare across steps."""
    was_training = model.training
    model.eval()
    sums = {"loss": 0.0, "accuracy": 0.0, "loss_null_text": 0.0}
    count = 0.0
    for name, drop in (("", 0.0), ("_null_text", 1.0)):
        generator = torch.Generator(device=device).manual_seed(seed)
        for start in range(0, len(dataset), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(dataset)))
            tokens, text, text_mask, labels, views = (t.to(device) for t in dataset[rows])
            with autocast:
                loss, stats = masked_token_loss(model, tokens, text, text_mask, generator, cond_drop_prob=drop,
                                                labels=labels, views=views)
            masked = stats["mask_fraction"].item() * tokens.numel()
            sums[f"loss{name}"] += loss.item() * masked
            if not name:
                sums["accuracy"] += stats["accuracy"].item() * masked
                count += masked
    model.train(was_training)
    metrics = {f"val/{key}": value / count for key, value in sums.items()}
    return metrics | {"val/text_gain": metrics["val/loss_null_text"] - metrics["val/loss"]}


def ema_decay(limit: float, updates: int) -> float:
    """The average's decay after `updates` updates: it rises from 0.1 towards `limit`, so early weights fade."""
    return min(limit, (1 + updates) / (10 + updates))


def averaged(model: RayGen, limit: float) -> AveragedModel:
    """An exponential moving average of model's parameters with the decay of ema_decay; limit 0 copies them."""

    @torch.no_grad()
    def update(averaged_params: list[Tensor], current: list[Tensor], updates: Tensor) -> None:
        decay = ema_decay(limit, int(updates))
        torch._foreach_lerp_(averaged_params, current, 1.0 - decay)

    return AveragedModel(model, multi_avg_fn=update)


def train_raygen(config: RayGenSection, train: TokenTextDataset, val: TokenTextDataset, out_dir: Path, *,
                 text_dim: int, codebook_size: int, grid_size: int, max_text_tokens: int, n_labels: int,
                 views: Sequence[str] = (),
                 on_eval: Callable[[int, dict[str, float]], None] | None = None,
                 on_samples: Callable[[int, Tensor], None] | None = None,
                 max_steps: int | None = None) -> TrainResult:
    """Train (or resume training) RayGen into out_dir up to config.steps optimizer steps.

    Every checkpoint_every steps, and when it stops, a checkpoint goes to out_dir/checkpoints; a later call
    resumes from the latest one. max_steps stops this call at that step (the schedule still spans config.steps).
    Every eval_every steps on_eval(step, {"val/loss", "val/accuracy", "val/loss_null_text", "val/text_gain",
    "train/loss", "lr"}); every sample_every
    steps on_samples(step, tokens LongTensor [sample_prompts, grid, grid]) generated from the first validation
    rows with a fixed seed; both also at the last step. The finished model goes to out_dir/final."""
    out_dir = Path(out_dir)
    distributed, rank, world = process_rank()
    shards = world * config.grad_accum
    if config.batch_size % shards:
        raise ValueError(f"raygen.batch_size {config.batch_size} is not divisible by {world} processes x "
                         f"grad_accum {config.grad_accum}")
    device = resolve_device(config.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16 and device.type == "cuda")

    torch.manual_seed(config.seed)
    model = RayGen(RayGenConfig(
        codebook_size=codebook_size, grid_size=grid_size, text_dim=text_dim, max_text_tokens=max_text_tokens,
        n_labels=n_labels, views=list(views), d_model=config.d_model, n_layers=config.n_layers, n_heads=config.n_heads,
        ffn_dim=config.ffn_dim, dropout=config.dropout, cond_drop_prob=config.cond_drop_prob)).to(device)
    ema = averaged(model, config.ema_decay)
    optimizer, scheduler = adamw_warmup_cosine(model, config.lr, config.weight_decay, config.warmup_steps,
                                               config.steps, betas=(0.9, 0.95))
    data_order = {"seed": config.seed, "batch_size": config.batch_size, "rows": len(train)}

    step, metrics = resume_training(out_dir, data_order, model=model, ema=ema, optimizer=optimizer,
                                    scheduler=scheduler)

    ddp_model = ddp_wrapped(model, device, distributed)
    step_rows = StepRows(len(train), config.batch_size, config.seed, rank, world, "raygen")
    _, prompt_text, prompt_mask, prompt_labels, prompt_views = val[torch.arange(min(config.sample_prompts,
                                                                                    len(val)))]

    stop = min(config.steps, max_steps or config.steps)
    progress = ProgressBar(total=config.steps, initial=step, disable=rank != 0, desc="raygen", unit="step",
                           description="raygen training", dynamic_ncols=True)
    train_losses = []
    while step < stop:
        rows = step_rows(step)
        # Rank r holds global-batch rows r, r + world, ... (DistributedSampler); its micro-step m takes every
        # grad_accum-th of those from m: rows j, j + shards, ... with j = r + m * world, shard j wherever it runs.
        micro_batches = [tuple(t.to(device, non_blocking=True) for t in train[rows[m::config.grad_accum]])
                         for m in range(config.grad_accum)]
        generators = [shard_generator(config.seed, step, rank + m * world, device) for m in range(config.grad_accum)]
        loss = train_step(ddp_model, optimizer, micro_batches, generators, grad_clip=config.grad_clip,
                          autocast=autocast)
        ema.update_parameters(model)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        if rank != 0:
            continue
        train_losses.append(loss)
        progress.update()
        progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        last = step == config.steps
        if step % config.eval_every == 0 or last:
            metrics = evaluate(ema.module, val, step_rows.rank_batch, config.seed, device, autocast)
            metrics |= {"train/loss": sum(train_losses) / len(train_losses), "lr": lr}
            train_losses = []
            if on_eval is not None:
                on_eval(step, metrics)
        if on_samples is not None and (step % config.sample_every == 0 or last):
            with autocast:
                tokens = generate(ema.module, prompt_text.to(device), prompt_mask.to(device),
                                  prompt_labels.to(device), prompt_views.to(device), **config.sampling.model_dump(),
                                  generator=torch.Generator(device=device).manual_seed(config.seed))
            on_samples(step, tokens.view(-1, grid_size, grid_size).cpu())
        if step % config.checkpoint_every == 0 or step == stop:
            save_training_state(out_dir, step, data_order, metrics, config.keep_checkpoints, model=model, ema=ema,
                                optimizer=optimizer, scheduler=scheduler)
    progress.close()

    return finish_training(out_dir, step, config.steps, ema.module.save_pretrained, metrics)
