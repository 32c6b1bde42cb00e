"""The configured VQ-GAN beside variants of its vqgan section, on the cohorts and images of a finished demo run:
what each one's reconstructions lose, measured as the generator evaluation measures its "tokenizer (ceiling)".

    .venv/bin/python bench/tokenizer_variants.py --data-root runs/demo \
        --variant steps=300 --variant disc_start=0 --variant feature_weight=1.0 [--config configs/demo.yaml] \
        [--cache-dir runs/bench-tokenizer]

Each VQ-GAN is trained through the pipeline's train_vqgan on the run's classifier-cohort training images (as the
tokenize stage trains it) into --cache-dir/<vqgan_id>, so a second run loads it. Scores: reconstruction MSE, SSIM,
perplexity and codes used on the held-out images the stage reports on; in-domain FID, precision, recall and coverage
(the run's real-only DenseNet, the evaluation's patient-disjoint halves: half A the reference, half B reconstructed,
half B's real images the floor). The first row is the configured section, the baseline of the same run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from models.vqgan import VQGAN
from tasks.config import VQGANSection, load_config
from tasks.data.pixels import PixelStore
from tasks.evaluation import fidelity
from tasks.evaluation.generator_eval import cohort_and_labels, evaluation_set, in_domain_extractor
from tasks.generators.checkpoints import final_dir, is_trained
from tasks.generators.vqgan.training import (
    cohort_split_ids, evaluate_vqgan, reconstruct_uint8, train_vqgan, trained_vqgan_id,
)

REPO = Path(__file__).resolve().parent.parent


def variant(section: VQGANSection, spec: str) -> VQGANSection:
    """section with the comma-separated key=value (YAML values) of spec, validated as the config is."""
    updates = dict(item.split("=", 1) for item in spec.split(",")) if spec else {}
    return VQGANSection.model_validate(section.model_dump() | {key: yaml.safe_load(value)
                                                                for key, value in updates.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, required=True, help="a demo run that has passed the retrain stage")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--variant", action="append", default=[], help="key=value[,key=value] over the vqgan section")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "bench-tokenizer")
    args = parser.parse_args()

    config = load_config(args.config, [f"run.data_root={args.data_root}"])
    root, resolution, device = config.run.data_root, config.ingest.resolution, torch.device("cpu")
    pixels = PixelStore(root, resolution)
    train_ids = cohort_split_ids(root, "classifier", "train")
    held_out = pixels.get_many(cohort_split_ids(root, "generator", "validate")[:config.vqgan.eval_images])
    halves = evaluation_set(*cohort_and_labels(root), pixels, config.generator_eval.images, config.run.seed)
    extractor = in_domain_extractor(config.retrain.judge_dir(root))
    reference = fidelity.features(halves.reference.images, extractor)
    k = config.generator_eval.nearest_k
    floor = fidelity.distances(reference, fidelity.features(halves.prompted.images, extractor), k)

    print(f"{len(train_ids)} training images at {resolution} px; held-out: {len(held_out)} images for MSE/SSIM, "
          f"{len(halves.reference.images)} + {len(halves.prompted.images)} for FID")
    print(f"{'variant':34} {'train s':>7} {'MSE':>7} {'SSIM':>6} {'perpl.':>6} {'FID':>6} {'prec.':>5} "
          f"{'recall':>6} {'cover.':>6}")
    print(f"{'real half B (floor)':34} {'':7} {'':7} {'':6} {'':6} {floor['fid']:6.1f} {floor['precision']:5.2f} "
          f"{floor['recall']:6.2f} {floor['coverage']:6.2f}")
    for spec in ["", *args.variant]:
        section = variant(config.vqgan, spec)
        out_dir = args.cache_dir / trained_vqgan_id(section, resolution, train_ids)
        start = time.perf_counter()
        if not is_trained(out_dir):
            train_vqgan(section, resolution, pixels, train_ids, out_dir, device)
        seconds = time.perf_counter() - start
        model = VQGAN.from_pretrained(final_dir(out_dir))
        scores = evaluate_vqgan(model, held_out, config.vqgan.encode_batch_size, device)
        reconstructed = fidelity.features(reconstruct_uint8(model, halves.prompted.images), extractor)
        ceiling = fidelity.distances(reference, reconstructed, k)
        print(f"{spec or 'configured':34} {seconds:7.0f} {scores['mse']:7.4f} {scores['ssim']:6.3f} "
              f"{scores['perplexity']:6.1f} {ceiling['fid']:6.1f} {ceiling['precision']:5.2f} "
              f"{ceiling['recall']:6.2f} {ceiling['coverage']:6.2f}")


if __name__ == "__main__":
    main()
