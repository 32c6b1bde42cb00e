"""How good are the generated X-rays: FID, diversity between images of one prompt, and label faithfulness.

- FID goes through torch-fidelity, in two feature spaces. In-domain: the pooled 1024-d features of the DenseNet
  trained on real images (the paper used a CheXpert model), registered with torch-fidelity as "densenet121-xrv"
  (models/fid_features.py) and loaded from the folder `save_classifier` wrote. Inception ("inception-v3-compat"):
  only from a local weights file, because torch-fidelity would otherwise download it; without one it is skipped,
  with the reason.
- MS-SSIM diversity: the mean MS-SSIM over every pair of images generated from the same prompt (the paper's
  protocol, it reported 0.79); lower is more diverse.
- Each comes with a real-data reference measured the same way in the same run, since a bare FID or MS-SSIM says
  little at these image sizes and feature spaces: FID between two disjoint sets of real training images of the same
  size (the floor a perfect generator would reach), and MS-SSIM over pairs of real images of different studies.
- Label faithfulness: the real-trained classifier's per-class AUROC on synthetic images against the labels of the
  studies whose prompts made them.

Images are uint8 [n, R, R] throughout, as PixelStore and the generators return them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from pytorch_msssim import ms_ssim
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from models.fid_features import DenseNetFeatures
from tasks.config import GeneratorEvalSection
from tasks.evaluation.classifier import LabelledImages, load_classifier, predict
from tasks.evaluation.metrics import auroc_per_class, MetricReport
from tasks.generators.interface import ImageGenerator
from tasks.pathologies import PATHOLOGIES

DENSENET = "densenet121-xrv"
INCEPTION = "inception-v3-compat"
# MS-SSIM's five scales with the weights of Wang et al. (2003), as in the paper and pytorch-msssim.
MS_SSIM_SCALES = 5
MS_SSIM_WINDOW = 11
PAIRS_PER_BATCH = 64


@dataclass(frozen=True)
class Extractor:
    name: str  # a feature extractor registered with torch-fidelity
    weights: Path  # the local file or folder it loads: nothing is downloaded


def register_densenet_extractor() -> None:
    """Register DenseNetFeatures with torch-fidelity; calling it again is a no-op (its registry refuses repeats)."""
    registered = FEATURE_EXTRACTORS_REGISTRY.get(DENSENET)
    if registered is None:
        torch_fidelity.register_feature_extractor(DENSENET, DenseNetFeatures)
    elif registered is not DenseNetFeatures:
        raise RuntimeError(f"torch-fidelity already has a different feature extractor named {DENSENET}: {registered}")


def fid_extractors(classifier_dir: Path, inception_weights: Path | None) -> tuple[list[Extractor], dict[str, str]]:
    """The feature spaces to compute FID in, and {extractor: why it is skipped}."""
    register_densenet_extractor()
    extractors, skipped = [Extractor(DENSENET, Path(classifier_dir))], {}
    if inception_weights is None:
        skipped[INCEPTION] = "no generator_eval.inception_weights configured (torch-fidelity would download them)"
    else:
        extractors.append(Extractor(INCEPTION, Path(inception_weights)))
    return extractors, skipped


def fid(real: np.ndarray, generated: np.ndarray, extractor: Extractor, batch_size: int = 64) -> float:
    """Fréchet distance between the feature distributions of two uint8 [n, R, R] image sets."""
    if not extractor.weights.exists():
        raise FileNotFoundError(f"{extractor.name} weights {extractor.weights} do not exist")
    metrics = torch_fidelity.calculate_metrics(
        input1=_GreyAsRGB(real), input2=_GreyAsRGB(generated), fid=True,
        feature_extractor=extractor.name, feature_extractor_weights_path=str(extractor.weights),
        batch_size=batch_size, cuda=torch.cuda.is_available(), save_cpu_ram=True, cache=False, verbose=False,
    )
    return float(metrics[torch_fidelity.KEY_METRIC_FID])


def ms_ssim_diversity(groups: list[np.ndarray]) -> float:
    """Mean MS-SSIM over all pairs of images within each group (one group per prompt, uint8 [k, R, R], k >= 2).

    Every pair weighs the same. 5 scales with an 11-px window need images over 160 px; smaller images keep the 5
    scales and Gaussian sigma 1.5 but truncate the window to the widest odd size that fits (7 px at 128, 3 px at
    64), so their values are comparable with each other, not with the paper's 0.79 at 512 px."""
    if not groups:
        raise ValueError("no image groups to measure")
    for index, group in enumerate(groups):
        if group.dtype != np.uint8 or group.ndim != 3 or len(group) < 2:
            raise ValueError(f"group {index} must be uint8 [k >= 2, R, R], got {group.dtype} {list(group.shape)}")
        if group.shape[1:] != groups[0].shape[1:]:
            raise ValueError(f"group {index} has images {list(group.shape[1:])}, group 0 {list(groups[0].shape[1:])}")
    window = _ms_ssim_window(min(groups[0].shape[1:]))
    firsts, seconds = zip(*(
        (group[i], group[j]) for group in groups for i, j in zip(*np.triu_indices(len(group), k=1))
    ))
    values = [
        ms_ssim(_as_float_batch(firsts[start:start + PAIRS_PER_BATCH]),
                _as_float_batch(seconds[start:start + PAIRS_PER_BATCH]),
                data_range=255, size_average=False, win_size=window)
        for start in range(0, len(firsts), PAIRS_PER_BATCH)
    ]
    return float(torch.cat(values).mean())


def label_faithfulness(
    classifier: nn.Module, images: np.ndarray, labels: np.ndarray, image_size: int
) -> MetricReport:
    """Per-class AUROC of the real-trained classifier on synthetic images against their intended labels [n, C]."""
    dataset = LabelledImages(images, labels)
    return auroc_per_class(dataset.labels, predict(classifier, dataset, image_size))


class _GreyAsRGB(Dataset):
    """uint8 [n, R, R] as torch-fidelity's inputs: uint8 [3, R, R] tensors, the grey channel repeated."""

    def __init__(self, images: np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 3 or len(images) < 2:
            raise ValueError(f"FID needs uint8 images [n >= 2, R, R], got {images.dtype} {list(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return torch.from_numpy(np.asarray(self.images[index])).expand(3, -1, -1)


def _ms_ssim_window(side: int) -> int:
    # pytorch-msssim needs side > (window - 1) * 2 ** 4 for its four halvings.
    window = min(MS_SSIM_WINDOW, (side - 1) // 2 ** (MS_SSIM_SCALES - 1) + 1)
    if window % 2 == 0:
        window -= 1
    if window < 3:
        raise ValueError(f"MS-SSIM over {MS_SSIM_SCALES} scales needs images of at least 33 px, got {side} px")
    return window


def _as_float_batch(images: tuple[np.ndarray, ...]) -> Tensor:
    return torch.from_numpy(np.stack(images)).float()[:, None]


@dataclass(frozen=True)
class GeneratorEvaluation:
    fid: dict[str, float]  # extractor name -> FID, synthetic vs real training images
    fid_reference: dict[str, float]  # extractor name -> FID, real vs other real training images, as many
    fid_skipped: dict[str, str]  # extractor name -> why it was not computed
    ms_ssim: float  # mean pairwise MS-SSIM between images generated from the same prompt (lower: more diverse)
    ms_ssim_reference: float  # the same over pairs of real images of different studies
    faithfulness: MetricReport  # the real-trained classifier's AUROC on synthetic images vs their intended labels
    samples: dict[str, np.ndarray]  # pathology -> a few synthetic images whose prompt's study is positive for it


def evaluate_generator(generator: ImageGenerator, plan_rows: list[dict], synthetic: np.ndarray,
                       synthetic_labels: np.ndarray, real: np.ndarray, classifier_dir: Path,
                       section: GeneratorEvalSection, seed: int) -> GeneratorEvaluation:
    """The paper's three views of a generator, on images already synthesized for the plan (`synthetic`, in plan
    order) plus a few fresh ones: several seeds per prompt for the diversity measure."""
    n = min(section.images, len(synthetic), len(real) // 2)  # half the real images: the other half is the reference
    extractors, skipped = fid_extractors(classifier_dir, section.inception_weights)
    fids = {extractor.name: fid(real[:n], synthetic[:n], extractor) for extractor in extractors}
    fid_reference = {extractor.name: fid(real[:n], real[n:2 * n], extractor) for extractor in extractors}
    prompts = [row["prompt"] for row in plan_rows[:section.diversity_prompts]]
    per_prompt = section.images_per_prompt
    groups = [generator.generate([prompt] * per_prompt, [seed * 1_000_003 + k for k in range(per_prompt)]).images
              for prompt in prompts]
    real_groups = [real[start:start + per_prompt] for start in range(0, len(prompts) * per_prompt, per_prompt)]
    trained = load_classifier(classifier_dir)
    faithfulness = label_faithfulness(trained.model, synthetic, synthetic_labels, trained.config.image_size)
    samples = {name: synthetic[synthetic_labels[:, c] == 1][:4] for c, name in enumerate(PATHOLOGIES)}
    return GeneratorEvaluation(fids, fid_reference, skipped, ms_ssim_diversity(groups),
                               ms_ssim_diversity([group for group in real_groups if len(group) >= 2]), faithfulness,
                               samples)
