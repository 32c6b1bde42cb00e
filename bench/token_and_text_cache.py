"""RayGen's cached inputs: computing them (tasks.generators.embeddings, tasks.generators.tokens) and reading them
back, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/token_and_text_cache.py [--studies 256] [--batch 32] [--resolution 128]

Text: demo impressions (tasks.demo.reports) through the builtin MiniLM; the baseline is one encoder call per study,
beside embed_cohort at --batch, then EmbeddingStore.get_many beside re-embedding the same batches (what the cache
saves each training epoch). Images: random-walk phantoms at --resolution through the demo-size VQ-GAN (the vqgan
config section's defaults); encode_cohort at batch 1 (baseline) and at --batch, then TokenStore.get_many beside
re-encoding. Each figure is the best of --repeats passes, in items/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from models.vqgan import VQGAN, VQGANConfig
from tasks import layout
from tasks.config import VQGANSection
from tasks.data import catalog
from tasks.data.catalog import chunk
from tasks.data.pixels import write_shard
from tasks.data.reports import parse_report
from tasks.demo.reports import sample_truth, write_report
from tasks.generators.embeddings import embed_cohort, EmbeddingStore
from tasks.generators.text import BUILTIN_MINILM, load_text_encoder
from tasks.generators.tokens import encode_cohort, TokenStore


def best_rate(items: int, repeats: int, run: Callable[[], object], reset: Callable[[], object] = lambda: None) -> float:
    times = []
    for _ in range(repeats):
        reset()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return items / min(times)


def demo_impressions(count: int) -> list[str]:
    rng = np.random.default_rng(0)
    impressions: list[str] = []
    while len(impressions) < count:
        truth = sample_truth(rng, portable=True, chronic_heart=rng.random() < 0.3, has_implant=False)
        impression = parse_report(write_report(truth, rng, 70, "F").text).impression
        if impression:
            impressions.append(impression)
    return impressions


def bench_text(root: Path, studies: int, batch: int, repeats: int) -> None:
    encoder = load_text_encoder(BUILTIN_MINILM)
    cohort = pa.table({"study_id": list(range(studies)), "impression": demo_impressions(studies)})
    texts = cohort["impression"].to_pylist()
    lengths = [len(encoder.tokenizer(text)["input_ids"]) for text in texts]
    print(f"text: {studies} demo impressions, {np.mean(lengths):.0f} tokens on average (max {max(lengths)}), "
          f"{encoder.encoder_id}, D={encoder.dim}")

    def forget() -> None:  # the cache emptied, so embed_cohort does all the work again
        for path in [*layout.tables_dir(root).glob("text_embeddings/text-*.parquet"),
                     *layout.text_dir(root, encoder.encoder_id).glob("*.npy")]:
            path.unlink()

    per_study = best_rate(studies, repeats, lambda: [encoder.embed([text], 256) for text in texts])
    cohort_rate = best_rate(studies, repeats, lambda: embed_cohort(root, encoder, cohort, 256, batch, 1024, False),
                            forget)
    store = EmbeddingStore(root, encoder.encoder_id)
    batches = chunk(list(range(studies)), batch)
    cached = best_rate(studies, repeats, lambda: [store.get_many(ids, 256) for ids in batches])
    recomputed = best_rate(studies, repeats, lambda: [encoder.embed([texts[i] for i in ids], 256) for ids in batches])
    print(f"  embed, one call per study (baseline)      {per_study:9.1f} studies/s")
    print(f"  embed_cohort, batch {batch:<3}                  {cohort_rate:9.1f} studies/s")
    print(f"  re-embed a batch of {batch:<3} (no cache)        {recomputed:9.1f} studies/s")
    print(f"  EmbeddingStore.get_many, batch {batch:<3}       {cached:9.1f} studies/s")


def bench_tokens(root: Path, images: int, batch: int, resolution: int, repeats: int) -> None:
    section = VQGANSection()
    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(resolution=resolution, in_channels=1, out_ch=1, ch=section.ch,
                              ch_mult=tuple(section.ch_mult), num_res_blocks=section.num_res_blocks,
                              attn_resolutions=tuple(section.attn_resolutions), z_channels=section.z_channels,
                              n_embed=section.n_embed, embed_dim=section.embed_dim)).eval()
    walks = np.random.default_rng(0).normal(0, 4, (images, resolution, resolution)).cumsum(1).cumsum(2)
    pixels = np.clip(128 + walks / walks.std() * 40, 0, 255).astype(np.uint8)
    write_shard(root, resolution, "images-bench", pixels)
    ids = [f"dicom-{index}" for index in range(images)]
    catalog.write_part(root, "pixels", "images-bench", [
        {"dicom_id": dicom_id, "resolution": resolution, "shard": "images-bench", "shard_row": row}
        for row, dicom_id in enumerate(ids)
    ])
    side = resolution // vqgan.config.downsample_factor
    print(f"tokens: {images} images at {resolution} px -> {side}x{side} tokens, demo-size VQ-GAN "
          f"(ch {section.ch}, ch_mult {section.ch_mult}, {section.n_embed} codes)")

    def forget() -> None:
        for path in layout.tables_dir(root).glob("tokens/tokens-*.parquet"):
            path.unlink()

    one = best_rate(images, repeats, lambda: encode_cohort(root, vqgan, "bench", ids, resolution, 1, 1024, False),
                    forget)
    batched = best_rate(images, repeats,
                        lambda: encode_cohort(root, vqgan, "bench", ids, resolution, batch, 1024, False), forget)
    store = TokenStore(root, "bench")
    batches = chunk(ids, batch)
    tensors = [torch.from_numpy(pixels[index:index + batch]).float()[:, None] / 127.5 - 1
               for index in range(0, images, batch)]
    recomputed = best_rate(images, repeats, lambda: [vqgan.encode_to_indices(t) for t in tensors])
    cached = best_rate(images, repeats, lambda: [store.get_many(b) for b in batches])
    print(f"  encode_cohort, batch 1 (baseline)         {one:9.1f} images/s")
    print(f"  encode_cohort, batch {batch:<3}                 {batched:9.1f} images/s")
    print(f"  re-encode a batch of {batch:<3} (no cache)       {recomputed:9.1f} images/s")
    print(f"  TokenStore.get_many, batch {batch:<3}           {cached:9.1f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=256, help="impressions, and images")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as root:
        bench_text(Path(root), args.studies, args.batch, args.repeats)
        bench_tokens(Path(root), args.studies, args.batch, args.resolution, args.repeats)


if __name__ == "__main__":
    main()
