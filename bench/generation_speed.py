"""Generation speed of the families at equal parameter count, in one run: RayGen at K=3, 8, 16 beside latent
diffusion with DDIM at 25 and 50 steps and DDPM at 1000, on the CPU.

    .venv/bin/python bench/generation_speed.py [--batch 4] [--ddpm-batch 1] [--repeats 3]

Both networks work on the demo's 16 x 16 latent grid (configs/demo.yaml: 64 px through the VQ-GAN) and cross-attend
to 32 text states of MiniLM's width (384), with classifier-free guidance 2 (two forward passes a step in both).
RayGen is the demo's size (d 192, 3 layers); the UNet's levels (32, 64, 64) give it the same ~2.0M parameters.
Images/s counts the generator network only: the VQ-GAN decoder that follows is the same for both. Each row is the
fastest of --repeats batches, and prints its speed as a multiple of RayGen at K=8 (the demo's sampling), timed in
the same run. DDPM is timed on one image, once: its 1000 steps take minutes here.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig, sample
from models.raygen import generate, RayGen, RayGenConfig

TEXT_TOKENS, TEXT_DIM, GUIDANCE = 32, 384, 2.0
RAYGEN = RayGenConfig(codebook_size=256, grid_size=16, text_dim=TEXT_DIM, max_text_tokens=128, n_labels=0, views=[],
                      d_model=192, n_layers=3, n_heads=6, ffn_dim=768, dropout=0.0, cond_drop_prob=0.1)
DIFFUSION = LatentDiffusionConfig(conditioning="text", sample_size=16, channels=64, cond_dim=TEXT_DIM,
                                  max_cond_tokens=128, block_channels=(32, 64, 64), layers_per_block=1,
                                  cross_dim=192, head_dim=32, train_timesteps=1000, prediction="epsilon",
                                  latent_scale=1.0, clip_sample=False)


def text(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g), torch.ones(batch, TEXT_TOKENS, dtype=torch.bool)


def images_per_second(work, batch: int, repeats: int) -> float:
    """batch / the fastest of `repeats` runs: on a shared machine, the one least disturbed by other jobs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return batch / min(times)


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--ddpm-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average "
          f"{os.getloadavg()[0]:.1f}")

    torch.manual_seed(0)
    raygen, diffusion = RayGen(RAYGEN).eval(), LatentDiffusion(DIFFUSION).eval()
    rows = []  # (family, sampler, params, batch, forward passes an image, images/s)
    values, mask = text(args.batch)
    for k in (3, 8, 16):
        def decode(k=k):
            generate(raygen, values, mask, steps=k, guidance_scale=GUIDANCE,
                     generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            decode(k=1)  # warm-up
            rows.append(("RayGen", f"MaskGIT K={k}", parameters(raygen), args.batch, 2 * k,
                         images_per_second(decode, args.batch, args.repeats)))
    for scheduler, steps, batch in (("ddim", 25, args.batch), ("ddim", 50, args.batch),
                                    ("ddpm", 1000, args.ddpm_batch)):
        values, mask = text(batch)

        def denoise(scheduler=scheduler, steps=steps, batch=batch):
            sample(diffusion, values[:batch], mask[:batch], [torch.Generator().manual_seed(i) for i in range(batch)],
                   scheduler=scheduler, steps=steps, guidance_scale=GUIDANCE, eta=0.0)
        repeats = 1 if scheduler == "ddpm" else args.repeats
        rows.append(("latent diffusion", f"{scheduler.upper()} {steps}", parameters(diffusion), batch, 2 * steps,
                     images_per_second(denoise, batch, repeats)))

    baseline = next(row[-1] for row in rows if row[1] == "MaskGIT K=8")
    header = ["family", "sampler", "params", "batch", "forward passes / image", "images/s", "x RayGen K=8"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for family, sampler, params, batch, passes, speed in rows:
        print(f"| {family} | {sampler} | {params / 1e6:.2f}M | {batch} | {passes} | {speed:.3g} | "
              f"{speed / baseline:.3g} |")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
