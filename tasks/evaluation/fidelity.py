"""Distribution distances between image sets in a feature space, each from kept libraries, on features computed once.

- FID and KID (mean and standard deviation over subsets) by torch-fidelity's own functions on the features;
- precision, recall, density and coverage (Naeem et al. 2020) by the `prdc` package, with k nearest neighbours.

Features come from a feature extractor registered with torch-fidelity (the in-domain DenseNet of
models/fid_features.py, or Inception from a local weights file), extracted once per image set, so a generator
evaluation that compares five sets with each other extracts each of them once.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import prdc
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric, KEY_METRIC_FID
from torch_fidelity.metric_kid import kid_features_to_metric, KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # torch-fidelity's default; smaller sets use half their images, so subsets differ


@dataclass(frozen=True)
class Extractor:
    name: str  # a feature extractor registered with torch-fidelity
    weights: Path  # the local file or folder it loads: nothing is downloaded


def features(images: np.ndarray, extractor: Extractor, batch_size: int = 64) -> np.ndarray:
    """float64 [n, D] features of uint8 [n, R, R] images in the extractor's default feature space."""
    if not extractor.weights.exists():
        raise FileNotFoundError(f"{extractor.name} weights {extractor.weights} do not exist")
    cuda = torch.cuda.is_available()
    model = create_feature_extractor(extractor.name, [_default_layer(extractor.name)], cuda=cuda,
                                     feature_extractor_weights_path=str(extractor.weights), verbose=False)
    found = get_featuresdict_from_dataset(_GreyAsRGB(images), model, batch_size, cuda, save_cpu_ram=True,
                                          verbose=False)
    return next(iter(found.values())).double().numpy()


def fid(real: np.ndarray, generated: np.ndarray) -> float:
    """Fréchet distance between two feature sets [n, D]."""
    stats = [fid_features_to_statistics(torch.from_numpy(side)) for side in (real, generated)]
    return float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])


def kid(real: np.ndarray, generated: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Kernel distance (unbiased MMD^2, cubic polynomial kernel): (mean, standard deviation) over random subsets."""
    size = min(KID_SUBSET_SIZE, min(len(real), len(generated)) // 2)
    out = kid_features_to_metric(torch.from_numpy(real), torch.from_numpy(generated), kid_subsets=KID_SUBSETS,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def precision_recall_density_coverage(real: np.ndarray, generated: np.ndarray, nearest_k: int) -> dict[str, float]:
    """Fidelity (precision, density) and diversity (recall, coverage) of generated features against real ones."""
    if min(len(real), len(generated)) <= nearest_k:
        raise ValueError(f"precision/recall need more than nearest_k={nearest_k} images a side, got "
                         f"{len(real)} real and {len(generated)} generated")
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        return {key: float(value) for key, value in prdc.compute_prdc(real, generated, nearest_k).items()}


def distances(real: np.ndarray, generated: np.ndarray, nearest_k: int, seed: int = 0) -> dict[str, float]:
    """Every distance of this module between two feature sets, keyed fid, kid, kid_std, precision, recall,
    density, coverage."""
    kid_mean, kid_std = kid(real, generated, seed)
    return {"fid": fid(real, generated), "kid": kid_mean, "kid_std": kid_std,
            **precision_recall_density_coverage(real, generated, nearest_k)}


def nearest_distances(queries: np.ndarray, references: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each query feature, the Euclidean distance to its nearest reference and that reference's index."""
    dist, index = nearest_neighbours(queries, references, 1, batch)
    return dist[:, 0], index[:, 0]


def nearest_neighbours(queries: np.ndarray, references: np.ndarray, k: int, batch: int = 1024
                       ) -> tuple[np.ndarray, np.ndarray]:
    """For each query feature, the Euclidean distances [n, k] to its k nearest references, nearest first, and
    their indices [n, k]."""
    reference = torch.from_numpy(references)
    dist, index = [], []
    for start in range(0, len(queries), batch):
        d = torch.cdist(torch.from_numpy(queries[start:start + batch]), reference)
        best = d.topk(min(k, len(references)), dim=1, largest=False)
        dist.append(best.values)
        index.append(best.indices)
    return torch.cat(dist).numpy(), torch.cat(index).numpy()


def _default_layer(name: str) -> str:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    return FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")


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
