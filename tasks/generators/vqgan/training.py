"""The pipeline's image tokenizer: UniXGen's VQ-GAN checkpoint when configured, else a small one trained here.

prepare_vqgan returns the model, its vqgan_id (the key its tokens are stored under) and reconstruction metrics on
held-out cohort images. A configured checkpoint is keyed by its file's SHA256, so tokens are keyed by the weights
that made them. A VQ-GAN trained here is keyed by the vqgan section (less the fields that cannot change the
weights), ingest.resolution and the training cohort's dicom ids, and lives in <data_root>/models/vqgan/<vqgan_id>/:
checkpoints/step-*.pt while it trains (a later call resumes from the latest), then final/ (VQGAN.save_pretrained:
config.json and model.safetensors), whose presence means that training is done (tasks/generators/checkpoints.py).

Training follows taming's recipe without LPIPS (its VGG weights are a download): L1 + L2 reconstruction, the
quantizer's codebook and commitment terms with dead-code restarts, and from vqgan.disc_start on a PatchGAN hinge
loss with taming's adaptive weight. In LPIPS's place, optionally (vqgan.feature_weight), pix2pixHD's feature
matching on the PatchGAN's layers, with the discriminator learning from step 0. Everything random in step s (the
batch, the codes restarted) is drawn from a seed of (vqgan.seed, s), and the checkpoint holds the restart counters,
so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import duckdb
import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from torch import Tensor, nn

from models.patch_discriminator import PatchDiscriminator
from models.vqgan import CONFIG_NAME, VQGAN, VQGANConfig, WEIGHTS_NAME
from tasks import layout
from tasks.config import ConfigError, VQGANSection
from tasks.data.catalog import atomic_write_bytes, read_sql
from tasks.data.pixels import PixelStore
from tasks.generators.checkpoints import final_dir, is_trained, latest_checkpoint, save_checkpoint, save_final
from tasks.progress import ProgressBar

class PreparedVQGAN(NamedTuple):
    model: VQGAN  # in eval mode, on the device asked for
    vqgan_id: str
    metrics: dict[str, float]  # val/mse, val/ssim (images in [0, 1]), val/perplexity, val/codebook_used


class TrainingRun(NamedTuple):
    resumed_from: int  # the checkpoint's step this call started from (0: a fresh start)
    step: int  # the step this call stopped at; vqgan.steps when the final model was written


def vqgan_config(section: VQGANSection, resolution: int) -> VQGANConfig:
    """The 1-channel VQ-GAN the vqgan section describes, for images of `resolution` px."""
    return VQGANConfig(
        resolution=resolution, in_channels=1, out_ch=1, ch=section.ch, ch_mult=tuple(section.ch_mult),
        num_res_blocks=section.num_res_blocks, attn_resolutions=tuple(section.attn_resolutions),
        z_channels=section.z_channels, n_embed=section.n_embed, embed_dim=section.embed_dim,
        dead_code_restart_after=section.dead_code_restart_after,
    )


def cohort_split_ids(data_root: Path, cohort: str, split: str) -> list[str]:
    """Sorted dicom ids of one split of a cohort ("generator" or "classifier")."""
    path = layout.cohort_file(data_root, cohort)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {cohort} cohort; run the curate stage first")
    with duckdb.connect() as con:
        rows = con.execute(read_sql("cohort_split_ids"), {"path": str(path), "split": split}).fetchall()
    if not rows:
        raise ValueError(f"{path}: the {split!r} split is empty")
    return [dicom_id for (dicom_id,) in rows]


def trained_vqgan_id(section: VQGANSection, resolution: int, train_ids: Sequence[str]) -> str:
    payload = {"vqgan": section.weights_identity(), "resolution": resolution, "train_ids": sorted(train_ids)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def checkpoint_vqgan_id(path: Path) -> str:
    """The id of a configured VQ-GAN: its weights file's SHA256 (a .ckpt, or a trained folder's model.safetensors)."""
    with open(path / WEIGHTS_NAME if path.is_dir() else path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:12]


def load_configured_checkpoint(section: VQGANSection, resolution: int) -> VQGAN:
    """vqgan.checkpoint, strictly, for images of ingest.resolution px: a .ckpt with its vqgan.checkpoint_yaml, or a
    folder VQGAN.save_pretrained wrote."""
    pinned = section.checkpoint.is_dir()
    if pinned:
        config = VQGANConfig(**json.loads((section.checkpoint / CONFIG_NAME).read_text()))
        described = f"vqgan.checkpoint {section.checkpoint}"
    else:
        config = VQGANConfig.from_taming_yaml(section.checkpoint_yaml)
        described = f"vqgan.checkpoint_yaml {section.checkpoint_yaml}"
    # Checked before the weights are read: a paper-size .ckpt is a gigabyte.
    if config.resolution != resolution:
        raise ConfigError(
            f"{described}: the checkpoint works at {config.resolution} px but ingest.resolution is {resolution}; "
            f"set ingest.resolution to {config.resolution} or configure a checkpoint for {resolution} px")
    return VQGAN.from_pretrained(section.checkpoint) if pinned else VQGAN.from_checkpoint(section.checkpoint, config)


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: nn.Parameter) -> Tensor:
    """taming's calculate_adaptive_weight: scale the adversarial loss so its gradient at the decoder's last layer is
    as large as the reconstruction's, which keeps the GAN from overpowering reconstruction whatever the scales."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def _to_model(images: np.ndarray, device: torch.device) -> Tensor:
    """uint8 [n, R, R] -> float [n, 1, R, R] in [-1, 1]."""
    return torch.from_numpy(images).to(device)[:, None].float() / 127.5 - 1.0


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0])


def train_vqgan(section: VQGANSection, resolution: int, pixels: PixelStore, train_ids: Sequence[str],
                out_dir: Path, device: torch.device, *, max_steps: int | None = None) -> TrainingRun:
    """Train, or resume training, a VQ-GAN on `train_ids` into out_dir up to vqgan.steps, then write the final
    model there. max_steps stops this call at that step, leaving a checkpoint to resume from."""
    out_dir, device = Path(out_dir), torch.device(device)
    torch.manual_seed(section.seed)
    model = VQGAN(vqgan_config(section, resolution)).to(device).train()
    disc = PatchDiscriminator(1, section.ch, section.disc_layers).to(device).train()
    # taming's betas: a short memory of the gradient's scale suits the shifting adversarial game.
    optimizer = torch.optim.AdamW(model.parameters(), lr=section.lr, betas=(0.5, 0.9))
    disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=section.lr, betas=(0.5, 0.9))

    step, checkpoint = 0, latest_checkpoint(out_dir)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        # Not in the state dict (taming checkpoints lack it), yet it decides when codes restart.
        model.quantize.steps_unused.copy_(state["steps_unused"])
        disc.load_state_dict(state["disc"])
        optimizer.load_state_dict(state["optimizer"])
        disc_optimizer.load_state_dict(state["disc_optimizer"])
        step = state["step"]
    resumed_from = step

    ids = list(train_ids)
    stop = min(section.steps, max_steps or section.steps)
    progress = ProgressBar(total=section.steps, initial=step, desc="vqgan", unit="step",
                           description="vqgan training", dynamic_ncols=True)
    while step < stop:
        adversarial = section.disc_weight > 0 and step >= section.disc_start
        train_disc = adversarial or section.feature_weight > 0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(_step_seed(section.seed, step))
            rows = torch.randperm(len(ids))[:section.batch_size].tolist()
            images = _to_model(pixels.get_many([ids[row] for row in rows]), device)
            out = model(images)  # dead-code restarts draw from the seeded generator in here
        reconstruction = out.reconstruction
        rec_loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images)
        loss = rec_loss + out.vq_loss
        if train_disc:  # one pass of the reconstruction through the discriminator serves both terms below
            fake_features, fake_logits = disc.features(reconstruction)
        if section.feature_weight > 0:
            with torch.no_grad():
                real_features, _ = disc.features(images)
            matching = sum(F.l1_loss(fake, real) for fake, real in zip(fake_features, real_features))
            loss = loss + section.feature_weight * matching / len(real_features)
        if adversarial:
            g_loss = -fake_logits.mean()
            loss = loss + section.disc_weight * adaptive_weight(rec_loss, g_loss, model.get_last_layer()) * g_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if train_disc:
            # Hinge loss on the same batch, the reconstruction detached so only the discriminator learns here.
            d_loss = 0.5 * (F.relu(1.0 - disc(images)).mean() + F.relu(1.0 + disc(reconstruction.detach())).mean())
            disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_optimizer.step()

        step += 1
        progress.update()
        progress.set_postfix(rec=f"{rec_loss.item():.4f}", perplexity=f"{out.usage.perplexity.item():.1f}",
                             gan="on" if adversarial else "off")
        if step % section.checkpoint_every == 0 or step == stop:
            save_checkpoint(out_dir, step, {
                "model": model.state_dict(), "steps_unused": model.quantize.steps_unused,
                "disc": disc.state_dict(), "optimizer": optimizer.state_dict(),
                "disc_optimizer": disc_optimizer.state_dict(),
            })
    progress.close()
    if step == section.steps:
        save_final(model.save_pretrained, out_dir)
    return TrainingRun(resumed_from=resumed_from, step=step)


@torch.no_grad()
def reconstruct(model: VQGAN, images: np.ndarray, batch_size: int, device: torch.device) -> tuple[np.ndarray, Tensor]:
    """uint8 [n, R, R] -> their reconstructions through the codebook, float [n, R, R] in [0, 1], and how often
    each code was chosen. Leaves the model in eval mode."""
    model.eval()
    out = np.empty(images.shape, dtype=np.float32)
    counts = torch.zeros(model.config.n_embed, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        indices = model.encode_to_indices(_to_model(images[start:start + batch_size], device))
        decoded = model.decode_indices(indices, grayscale=True)
        out[start:start + batch_size] = ((decoded[:, 0] + 1.0) / 2.0).cpu().numpy()
        counts += torch.bincount(indices.flatten().cpu(), minlength=model.config.n_embed)
    return out, counts


def reconstruct_uint8(model: VQGAN, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """uint8 [n, R, R] through the codebook and back, as uint8: a latent family's ceiling (ImageGenerator's
    reconstruct), on the model's device."""
    reconstructed, _ = reconstruct(model, images, batch_size, next(model.parameters()).device)
    return (reconstructed * 255.0).round().astype(np.uint8)


def reconstruction_metrics(images: np.ndarray, reconstructions: np.ndarray) -> dict[str, float]:
    """Mean MSE and SSIM over images: uint8 [n, R, R] originals, float [n, R, R] reconstructions in [0, 1]."""
    targets = images.astype(np.float32) / 255.0
    ssim = [structural_similarity(t, r, data_range=1.0) for t, r in zip(targets, reconstructions)]
    return {"mse": float(((targets - reconstructions) ** 2).mean()), "ssim": float(np.mean(ssim))}


def evaluate_vqgan(model: VQGAN, images: np.ndarray, batch_size: int, device: torch.device) -> dict[str, float]:
    """Reconstruction MSE and SSIM of uint8 [n, R, R] images, and the codebook usage over all their tokens:
    perplexity (n_embed when uniform, 1 when collapsed) and the fraction of codes used."""
    reconstructions, counts = reconstruct(model, images, batch_size, device)
    p = counts.double() / counts.sum()
    usage = {"perplexity": torch.exp(-torch.special.xlogy(p, p).sum()).item(),
             "codebook_used": (counts > 0).double().mean().item()}
    return reconstruction_metrics(images, reconstructions) | usage


def prepare_vqgan(data_root: Path, section: VQGANSection, resolution: int, device: torch.device | str
                  ) -> PreparedVQGAN:
    """The VQ-GAN the section asks for: vqgan.checkpoint loaded strictly, or one trained on every training image of
    the classifier cohort, both views (it needs no text, and more images teach it more anatomy than the generator
    cohort's AP films alone; skipped when already trained, resumed when interrupted); measured on the generator
    cohort's validate split, the images RayGen's tokens come from."""
    device = torch.device(device)
    pixels = PixelStore(data_root, resolution)
    if section.checkpoint is not None:
        model, vqgan_id = load_configured_checkpoint(section, resolution), checkpoint_vqgan_id(section.checkpoint)
    else:
        train_ids = cohort_split_ids(data_root, "classifier", "train")
        vqgan_id = trained_vqgan_id(section, resolution, train_ids)
        out_dir = layout.model_dir(data_root, "vqgan", vqgan_id)
        if not is_trained(out_dir):
            train_vqgan(section, resolution, pixels, train_ids, out_dir, device)
        model = VQGAN.from_pretrained(final_dir(out_dir))
    model = model.to(device)
    return PreparedVQGAN(model, vqgan_id, held_out_metrics(data_root, section, model, vqgan_id, pixels, device))


def held_out_metrics(data_root: Path, section: VQGANSection, model: VQGAN, vqgan_id: str, pixels: PixelStore,
                     device: torch.device) -> dict[str, float]:
    """Reconstruction metrics on the first vqgan.eval_images of the validate split, measured once per (VQ-GAN,
    held-out images) and kept in the VQ-GAN's folder/held_out_metrics.json: three stages prepare the same VQ-GAN."""
    held_out_ids = cohort_split_ids(data_root, "generator", "validate")[:section.eval_images]
    key = hashlib.sha256("\n".join(held_out_ids).encode()).hexdigest()[:16]
    path = layout.model_dir(data_root, "vqgan", vqgan_id) / "held_out_metrics.json"
    if path.is_file() and (record := json.loads(path.read_text()))["held_out"] == key:
        return record["metrics"]
    measured = evaluate_vqgan(model, pixels.get_many(held_out_ids), section.encode_batch_size, device)
    metrics = {f"val/{name}": value for name, value in measured.items()}
    atomic_write_bytes(path, json.dumps({"held_out": key, "metrics": metrics}, indent=2).encode())
    return metrics
