"""RayGen training tokens/s and generation images/s, at the demo size and the paper's size, in one run.

    .venv/bin/python bench/raygen_throughput.py [--steps 5] [--paper-steps 2] [--skip-paper]

Each row times tasks.generators.raygen.training.train_step (AdamW, fp32 on the CPU; the fastest of --steps steps after
a warm-up step) and models.raygen.generate at K=3, 8 and 12 (the fastest of --repeats batches). The baseline
rows run the same code with attention computed naively (softmax(QK^T / sqrt(d)) V, written out) in place of
PyTorch's scaled_dot_product_attention. With a CUDA device the paper size is also timed with bf16 autocast:
step time, tokens/s, model FLOPs utilisation (6 x parameters x tokens / time / peak) and generation images/s at
batch 64.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from unittest import mock

import torch
import torch.nn.functional as F

from models.raygen import generate, RayGen, RayGenConfig
from tasks.generators.raygen.training import train_step
from tasks.generators.training import shard_generator

DEMO = RayGenConfig(codebook_size=512, grid_size=16, text_dim=384, max_text_tokens=32, n_labels=0, views=[],
                    d_model=256, n_layers=4, n_heads=8, ffn_dim=1024, dropout=0.0, cond_drop_prob=0.1)
PAPER = RayGenConfig(codebook_size=1024, grid_size=32, text_dim=768, max_text_tokens=256, n_labels=0, views=[],
                     d_model=1024, n_layers=6, n_heads=8, ffn_dim=4096, dropout=0.0, cond_drop_prob=0.1)
# Dense bf16 peak in TFLOP/s by device name, for MFU; --peak-tflops overrides.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def naive_attention(q, k, v, attn_mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -torch.inf)
    return scores.softmax(-1) @ v


def inputs(config: RayGenConfig, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.codebook_size, (batch, config.num_image_tokens), generator=g)
    text = torch.randn(batch, config.max_text_tokens, config.text_dim, generator=g)
    lengths = torch.randint(config.max_text_tokens // 4, config.max_text_tokens + 1, (batch, 1), generator=g)
    labels = torch.randint(0, 2, (batch, config.n_labels), generator=g).float()
    views = torch.randint(0, max(1, len(config.views)), (batch, int(bool(config.views))), generator=g)
    return (tokens.to(device), text.to(device), (torch.arange(config.max_text_tokens) < lengths).to(device),
            labels.to(device), views.to(device))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_seconds(work, repeats: int, device: torch.device) -> float:
    """The fastest of `repeats` runs: on a shared machine, the one least disturbed by other jobs."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        work()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def time_training(model: RayGen, batch: tuple, steps: int, autocast, device: torch.device) -> float:
    """Seconds per optimizer step: the fastest of `steps` steps after one warm-up step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = iter(range(steps + 1))

    def one_step() -> None:
        train_step(model, optimizer, [batch], [shard_generator(0, next(step), 0, device)], grad_clip=1.0,
                   autocast=autocast)

    one_step()
    return best_seconds(one_step, steps, device)


def time_generation(model: RayGen, text, mask, steps: int, repeats: int, autocast, device: torch.device) -> float:
    """Images per second for one batch decoded in `steps` steps, the fastest of `repeats` batches."""
    def one_batch() -> None:
        with autocast:
            generate(model, text, mask, steps=steps, generator=torch.Generator(device=device).manual_seed(0))

    return len(text) / best_seconds(one_batch, repeats, device)


def measure(name: str, config: RayGenConfig, batch: int, gen_batch: int, steps: int, gen_steps: list[int],
            repeats: int, attention: str, device: torch.device, bf16: bool = False) -> dict:
    torch.manual_seed(0)
    model = RayGen(config).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    patch = contextlib.nullcontext()
    if attention == "naive":
        patch = mock.patch.object(F, "scaled_dot_product_attention", naive_attention)
    with patch:
        step_s = time_training(model, inputs(config, batch, device), steps, autocast, device)
        _, text, mask, _, _ = inputs(config, gen_batch, device)
        time_generation(model, text, mask, 1, 1, autocast, device)  # warm-up: one forward pass
        images_s = {k: time_generation(model, text, mask, k, repeats, autocast, device) for k in gen_steps}
    params = sum(p.numel() for p in model.parameters())
    tokens_s = batch * config.num_image_tokens / step_s
    return {"name": name, "attention": attention, "batch": batch, "gen_batch": gen_batch, "params": params,
            "step_s": step_s, "tokens_s": tokens_s, "images_s": images_s}


def print_table(rows: list[dict], gen_steps: list[int], peak_tflops: float | None) -> None:
    header = ["size", "attention", "params", "batch", "step s", "train tokens/s", "gen batch"]
    header += [f"gen img/s K={k}" for k in gen_steps] + (["MFU"] if peak_tflops else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        cells = [row["name"], row["attention"], f"{row['params'] / 1e6:.1f}M", str(row["batch"]),
                 f"{row['step_s']:.3f}", f"{row['tokens_s']:,.0f}", str(row["gen_batch"])]
        cells += [f"{row['images_s'][k]:.3g}" for k in gen_steps]
        if peak_tflops:
            cells.append(f"{6 * row['params'] * row['tokens_s'] / (peak_tflops * 1e12):.1%}")
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps at the demo size")
    parser.add_argument("--repeats", type=int, default=3, help="timed generation batches per K")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--gen-batch", type=int, default=8)
    parser.add_argument("--gen-steps", type=int, nargs="+", default=[3, 8, 12])
    parser.add_argument("--paper-steps", type=int, default=2)
    parser.add_argument("--paper-batch", type=int, default=2)
    parser.add_argument("--paper-gen-batch", type=int, default=1)
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU bf16 peak for MFU")
    args = parser.parse_args()

    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average "
          f"{os.getloadavg()[0]:.1f}, CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    rows = [measure("demo", DEMO, args.batch, args.gen_batch, args.steps, args.gen_steps, args.repeats, attention,
                    cpu) for attention in ("sdpa", "naive")]
    if not args.skip_paper:  # one generation batch per K: a paper-size batch takes most of a minute here
        rows.append(measure("paper", PAPER, args.paper_batch, args.paper_gen_batch, args.paper_steps,
                            args.gen_steps, 1, "sdpa", cpu))
    print("\nCPU, fp32")
    print_table(rows, args.gen_steps, None)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")

    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        rows = [measure("paper", PAPER, 32, 64, 10, args.gen_steps, args.repeats, attention, gpu, bf16=True)
                for attention in ("sdpa", "naive")]
        print(f"\n{name}, bf16 autocast" + ("" if peak else " (unknown peak: pass --peak-tflops for MFU)"))
        print_table(rows, args.gen_steps, peak)


if __name__ == "__main__":
    main()
