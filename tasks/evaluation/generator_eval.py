"""How good are the generated X-rays, measured the way CheXGenBench (2025) does where this machine allows.

The evaluation set: held-out (validate and test) studies of the generator cohort, drawn at random, split into two
patient-disjoint halves. Half A's real images are the reference. Half B's impressions prompt the generator, one image
each, and half B's real images give the floor a perfect generator would reach (real vs real, same sizes, disjoint
patients, the same class mix in expectation); the VQ-GAN's reconstructions of half B's images (a generator that
has a tokenizer or autoencoder: `reconstruct`) give the tokenizer's ceiling, so the generator's gap splits into what
the tokenizer loses and what the rest loses.

- Fidelity and coverage (tasks/evaluation/fidelity.py): FID, KID with its standard deviation over subsets,
  precision, recall, density, coverage (k nearest neighbours), in each configured feature space: the in-domain
  DenseNet trained here on real images (models/fid_features.py, "densenet121-xrv"), and Inception
  ("inception-v3-compat") only from a local weights file (torch-fidelity would download it), and RAD-DINO
  ("rad-dino", a chest X-ray DINOv2's CLS embedding) only from a local Hugging Face folder; without one each is
  skipped, with the reason. Per pathology: KID and FID between the generated and the real images of the studies
  positive for it, where both sides have enough of them; FID beside half B's real positives at the same counts.
- Diversity: MS-SSIM between images generated from one prompt with different seeds (lower: more diverse), and
  between images of different prompts (which catches a model that ignores the text), beside the same over pairs of
  real images of different studies.
- Label faithfulness: per-class AUROC on the generated images against the labels of the studies whose impressions
  made them, by two judges, each beside its reference (tasks/evaluation/decoded_judge.py): the real-trained
  classifier (beside its AUROC on half B's real images and on their reconstructions), and a judge refitted on
  reconstructions of the training images (beside its AUROC on half B's reconstructions), which reads decoded
  images in their own domain. Beside each macro, the macro over the classes with at least min_per_class positive
  prompts: a class with one to five positives swings by 0.2 or more with a single image, so the plain macro of a
  small evaluation set moves with them more than with the generator.
- Retrieval: the share of generated images whose nearest real image of half B in the in-domain feature space is
  that of their own prompt's study (top 1), or among the 5 nearest (top 5), beside chance (1/n, 5/n): an image
  that shows what its own impression describes, rather than any plausible X-ray, finds its study.
- Memorisation: each generated image's distance to its nearest real training image in the in-domain feature space,
  beside the same distance for the real held-out images; the share of generated images closer than the 1st
  percentile of the held-out distances, and the closest pairs to look at.

Images are uint8 [n, R, R] throughout, as PixelStore and the generators return them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
import torch_fidelity
from pytorch_msssim import ms_ssim
from torch import Tensor, nn
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from models.fid_features import DenseNetFeatures, RadDinoFeatures
from tasks import layout
from tasks.config import GeneratorEvalSection
from tasks.data.curate import LABEL_COLUMNS
from tasks.data.pixels import PixelStore
from tasks.evaluation import fidelity
from tasks.evaluation.decoded_judge import fit_on_reconstructions
from tasks.evaluation.classifier import LabelledImages, load_classifier, predict
from tasks.evaluation.fidelity import Extractor
from tasks.evaluation.metrics import auroc_per_class, MetricReport
from tasks.generators.conditions import absent_if_unknown
from tasks.generators.interface import Conditions, ImageGenerator
from tasks.pathologies import PATHOLOGIES

DENSENET = "densenet121-xrv"
INCEPTION = "inception-v3-compat"
RAD_DINO = "rad-dino"
# MS-SSIM's five scales with the weights of Wang et al. (2003), as in the paper and pytorch-msssim.
MS_SSIM_SCALES = 5
MS_SSIM_WINDOW = 11
PAIRS_PER_BATCH = 64


OUR_EXTRACTORS = {DENSENET: DenseNetFeatures, RAD_DINO: RadDinoFeatures}


def register_extractors() -> None:
    """Register this pipeline's feature extractors (OUR_EXTRACTORS) with torch-fidelity; calling it again is a no-op
    (its registry refuses repeats)."""
    for name, extractor in OUR_EXTRACTORS.items():
        registered = FEATURE_EXTRACTORS_REGISTRY.get(name)
        if registered is None:
            torch_fidelity.register_feature_extractor(name, extractor)
        elif registered is not extractor:
            raise RuntimeError(f"torch-fidelity already has a different feature extractor named {name}: {registered}")


def in_domain_extractor(classifier_dir: Path) -> Extractor:
    """The in-domain feature space: the pooled features of the DenseNet trained here on real images (registered)."""
    register_extractors()
    return Extractor(DENSENET, Path(classifier_dir))


def fid_extractors(classifier_dir: Path, inception_weights: Path | None, rad_dino: Path | None
                   ) -> tuple[list[Extractor], dict[str, str]]:
    """The feature spaces to compute FID in, and {extractor: why it is skipped}."""
    extractors, skipped = [in_domain_extractor(classifier_dir)], {}
    if inception_weights is None:
        skipped[INCEPTION] = "no generator_eval.inception_weights configured (torch-fidelity would download them)"
    else:
        extractors.append(Extractor(INCEPTION, Path(inception_weights)))
    if rad_dino is None:
        skipped[RAD_DINO] = "no generator_eval.rad_dino configured (a local Hugging Face folder of RAD-DINO)"
    else:
        extractors.append(Extractor(RAD_DINO, Path(rad_dino)))
    return extractors, skipped


def fid(real: np.ndarray, generated: np.ndarray, extractor: Extractor, batch_size: int = 64) -> float:
    """Fréchet distance between the feature distributions of two uint8 [n, R, R] image sets."""
    return fidelity.fid(fidelity.features(real, extractor, batch_size), fidelity.features(generated, extractor,
                                                                                          batch_size))


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


def populated_classes(labels: np.ndarray, min_positives: int) -> tuple[str, ...]:
    """The pathologies with at least min_positives positive rows in labels [n, C] (NaN: masked)."""
    return tuple(name for name, count in zip(PATHOLOGIES, (labels == 1).sum(axis=0)) if count >= min_positives)


def macro_over(report: MetricReport, classes: tuple[str, ...]) -> float | None:
    """The mean AUROC of those of `classes` the report could score; None when none."""
    values = [report.per_class[name] for name in classes if report.per_class[name] is not None]
    return float(np.mean(values)) if values else None


def label_faithfulness(
    classifier: nn.Module, images: np.ndarray, labels: np.ndarray, image_size: int
) -> MetricReport:
    """Per-class AUROC of the real-trained classifier on synthetic images against their intended labels [n, C]."""
    dataset = LabelledImages(images, labels)
    return auroc_per_class(dataset.labels, predict(classifier, dataset, image_size))


RETRIEVAL_K = (1, 5)


def own_study_retrieval(generated: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """Row i of `generated` [n, D] was made from the impression of the study whose real image is row i of `real`
    [n, D]: the share of generated rows whose k nearest real rows (Euclidean) hold their own study's, for k in
    RETRIEVAL_K, as top<k>, beside top<k>_chance (k / n, what an image unrelated to its prompt gets)."""
    if generated.shape != real.shape or len(real) < 2:
        raise ValueError(f"retrieval pairs each generated row with a real one: got {list(generated.shape)} and "
                         f"{list(real.shape)}")
    _, nearest = fidelity.nearest_neighbours(generated, real, max(RETRIEVAL_K))
    own = nearest == np.arange(len(real))[:, None]
    return {name: value for k in RETRIEVAL_K for name, value in (
        (f"top{k}", float(own[:, :k].any(axis=1).mean())), (f"top{k}_chance", min(k, len(real)) / len(real)))}


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
class Studies:
    images: np.ndarray  # uint8 [n, R, R], one real image per study
    prompts: list[str]  # the studies' impressions
    labels: np.ndarray  # float32 [n, C], NaN = masked
    subject_ids: np.ndarray  # [n]
    views: np.ndarray | None = None  # str [n]: the views of the images

    @property
    def conditions(self) -> Conditions:
        """What the label and image families (and a RayGen with findings or a view token) generate from for these
        studies: their labels, images and views, as tasks.generators.conditions.study_conditions gives them."""
        return Conditions(labels=absent_if_unknown(self.labels), references=self.images, views=self.views)


@dataclass(frozen=True)
class EvaluationSet:
    reference: Studies  # half A: the real images everything is compared with
    prompted: Studies  # half B: its impressions prompt the generator; its real images are the floor


def evaluation_set(cohort: pd.DataFrame, labels: pd.DataFrame, pixels: PixelStore, size: int, seed: int
                   ) -> EvaluationSet:
    """Up to `size` held-out studies of the generator cohort (rows with split validate or test), drawn at random,
    in two patient-disjoint halves of equal size (as near as whole patients allow). `labels` holds the label
    columns by dicom_id (the classifier cohort's); a study without labels has all of its labels masked."""
    held_out = cohort[cohort["split"].isin(["validate", "test"])].sort_values("dicom_id")
    if len(held_out) < 4:
        raise ValueError(f"the generator cohort has {len(held_out)} held-out studies; the evaluation needs 4")
    rng = np.random.default_rng(seed)
    held_out = held_out.iloc[rng.permutation(len(held_out))[:size]]
    subjects = held_out["subject_id"].unique()
    rng.shuffle(subjects)
    # Subjects fill half A until it holds half the studies, the rest go to half B: no patient is on both sides.
    counts = held_out["subject_id"].value_counts()
    in_a, filled = set(), 0
    for subject in subjects:
        if filled >= len(held_out) / 2:
            break
        in_a.add(subject)
        filled += counts[subject]
    joined = held_out.merge(labels, on="dicom_id", how="left")
    in_half_a = joined["subject_id"].isin(in_a)
    return EvaluationSet(_studies(joined[in_half_a], pixels), _studies(joined[~in_half_a], pixels))


def cohort_and_labels(data_root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The generator cohort, and the classifier cohort's label columns by dicom_id: what evaluation_set and
    training_studies join."""
    cohort = pq.read_table(layout.cohort_file(data_root, "generator")).to_pandas()
    labels = pq.read_table(layout.cohort_file(data_root, "classifier"),
                           columns=["dicom_id", *LABEL_COLUMNS]).to_pandas()
    return cohort, labels


def training_studies(cohort: pd.DataFrame, labels: pd.DataFrame, pixels: PixelStore) -> Studies:
    """The generator cohort's training studies with their labels (as evaluation_set joins them): what memorisation
    compares with and what the decoded-domain judge learns from."""
    train = cohort[cohort["split"] == "train"].sort_values("dicom_id")
    return _studies(train.merge(labels, on="dicom_id", how="left"), pixels)


def _studies(rows: pd.DataFrame, pixels: PixelStore) -> Studies:
    return Studies(pixels.get_many(rows["dicom_id"].tolist()), rows["impression"].tolist(),
                   rows[LABEL_COLUMNS].to_numpy(dtype=np.float32, na_value=np.nan), rows["subject_id"].to_numpy(),
                   rows["view_position"].to_numpy(dtype=str))


@dataclass(frozen=True)
class Faithfulness:
    """Label faithfulness by two judges, each beside its reference (tasks/evaluation/decoded_judge.py)."""

    generated: MetricReport  # the real-trained classifier on the generated images
    real: MetricReport  # the real-trained classifier on half B's real images: what it can tell at all
    reconstructed: MetricReport | None  # the real-trained classifier on half B's reconstructions (None: no tokenizer)
    decoded_generated: MetricReport | None  # the decoded-domain judge on the generated images
    decoded_ceiling: MetricReport | None  # the decoded-domain judge on half B's reconstructions
    populated: tuple[str, ...]  # the classes with at least generator_eval.min_per_class positive prompts

    def columns(self) -> dict[str, MetricReport]:
        """The reports by MLflow metric prefix (generator/<prefix>/auroc/<class>), those that were computed."""
        return {name: report for name, report in (
            ("faithfulness", self.generated), ("faithfulness_real_reference", self.real),
            ("faithfulness_tokenizer", self.reconstructed),
            ("faithfulness_decoded_judge", self.decoded_generated),
            ("faithfulness_decoded_judge_tokenizer", self.decoded_ceiling)) if report is not None}


def faithfulness_by_both_judges(classifier_dir: Path, generated: np.ndarray, prompted: Studies,
                                reconstructed: np.ndarray | None, train: Studies,
                                reconstruct: Callable[[np.ndarray], np.ndarray] | None,
                                in_domain: dict[str, np.ndarray], min_positives: int) -> Faithfulness:
    """Faithfulness of the module doc; `reconstructed` is reconstruct(prompted.images) (None without a tokenizer),
    `in_domain` holds the in-domain features of "generated" and, with a tokenizer, "reconstructed", already
    computed."""
    trained = load_classifier(classifier_dir)
    populated = populated_classes(prompted.labels, min_positives)

    def judged(images: np.ndarray) -> MetricReport:
        return label_faithfulness(trained.model, images, prompted.labels, trained.config.image_size)

    if reconstruct is None:
        return Faithfulness(judged(generated), judged(prompted.images), None, None, None, populated)
    judge = fit_on_reconstructions(train.images, train.labels, reconstruct, in_domain_extractor(classifier_dir))
    return Faithfulness(judged(generated), judged(prompted.images), judged(reconstructed),
                        judge.report(in_domain["generated"], prompted.labels),
                        judge.report(in_domain["reconstructed"], prompted.labels), populated)


@dataclass(frozen=True)
class GeneratorEvaluation:
    studies: tuple[int, int]  # the sizes of half A (reference) and half B (prompted)
    generated: dict[str, dict[str, float]]  # extractor -> distances of the generated images to half A
    real_reference: dict[str, dict[str, float]]  # extractor -> distances of half B's real images to half A
    tokenizer: dict[str, dict[str, float]]  # extractor -> distances of half B's reconstructions ({}: no tokenizer)
    skipped: dict[str, str]  # extractor or measure -> why it was not computed
    kid_by_class: dict[str, tuple[float, float, int]]  # pathology -> (KID, its std, positives on the smaller side)
    # pathology -> (FID of the generated positives, FID of half B's real positives): at 10-50 images a class FID is
    # biased upwards, so only the real reference at the same counts makes it readable.
    fid_by_class: dict[str, tuple[float, float]]
    ms_ssim: float  # within a prompt (lower: more diverse)
    ms_ssim_across_prompts: float  # between images of different prompts
    ms_ssim_real_reference: float  # between real images of different studies
    faithfulness: Faithfulness  # per-class AUROC on generated images vs their prompts' labels, two judges
    retrieval: dict[str, float]  # own_study_retrieval: top1, top5 and their chance levels
    memorisation: dict[str, float]  # share_closer (than the held-out 1st percentile), median distances
    closest_pairs: list[tuple[np.ndarray, np.ndarray, float]]  # (generated, nearest training image, distance)
    samples: dict[str, np.ndarray]  # pathology -> a few generated images whose prompt's study is positive for it
    in_domain_features: dict[str, np.ndarray]  # "reference", "generated": [n, D], for the PCA plot


def evaluate_generator(generator: ImageGenerator, studies: EvaluationSet, train: Studies, classifier_dir: Path,
                       section: GeneratorEvalSection, seed: int) -> GeneratorEvaluation:
    """Every measure of the module doc on a fresh image per half-B study, plus several seeds per prompt."""
    reference, prompted = studies.reference, studies.prompted
    seeds = [seed * 1_000_003 + index for index in range(len(prompted.prompts))]
    generated = _generate(generator, prompted.prompts, seeds, section.batch_size, prompted.conditions)
    reconstruct = getattr(generator, "reconstruct", None)
    reconstructed = reconstruct(prompted.images) if reconstruct is not None else None
    extractors, skipped = fid_extractors(classifier_dir, section.inception_weights, section.rad_dino)
    if reconstructed is None:
        skipped["tokenizer"] = f"{generator.generator_id} has no tokenizer or autoencoder to reconstruct with"
    by_space, floor, ceiling, in_domain = {}, {}, {}, {}
    for extractor in extractors:
        feats = {name: fidelity.features(images, extractor) for name, images in (
            ("reference", reference.images), ("prompted", prompted.images), ("generated", generated),
            *((("reconstructed", reconstructed),) if reconstructed is not None else ()))}
        k = section.nearest_k
        by_space[extractor.name] = fidelity.distances(feats["reference"], feats["generated"], k, seed)
        floor[extractor.name] = fidelity.distances(feats["reference"], feats["prompted"], k, seed)
        if reconstructed is not None:
            ceiling[extractor.name] = fidelity.distances(feats["reference"], feats["reconstructed"], k, seed)
        if extractor.name == DENSENET:
            in_domain = feats
    kid_by_class, fid_by_class = {}, {}
    for c, name in enumerate(PATHOLOGIES):
        positives = (reference.labels[:, c] == 1), (prompted.labels[:, c] == 1)
        smaller = int(min(side.sum() for side in positives))
        if smaller < section.min_per_class:
            skipped[f"kid_by_class/{name}"] = (f"{smaller} positive studies on the smaller side, fewer than "
                                               f"generator_eval.min_per_class={section.min_per_class}")
            continue
        real_positives, generated_positives = in_domain["reference"][positives[0]], in_domain["generated"][positives[1]]
        kid_by_class[name] = (*fidelity.kid(real_positives, generated_positives, seed), smaller)
        fid_by_class[name] = (fidelity.fid(real_positives, generated_positives),
                              fidelity.fid(real_positives, in_domain["prompted"][positives[1]]))

    groups = _seed_groups(generator, prompted, section.diversity_prompts, section, seed)
    across = [np.stack([generated[i], generated[i + 1]]) for i in range(0, len(generated) - 1, 2)]
    real_pairs = [np.stack([reference.images[i], reference.images[i + 1]])
                  for i in range(0, len(reference.images) - 1, 2)]
    faithfulness = faithfulness_by_both_judges(classifier_dir, generated, prompted, reconstructed, train, reconstruct,
                                               in_domain, section.min_per_class)
    retrieval = own_study_retrieval(in_domain["generated"], in_domain["prompted"])
    memorisation, closest = _memorisation(in_domain, fidelity.features(train.images,
                                                                       in_domain_extractor(classifier_dir)),
                                          generated, train.images, section.memorisation_pairs)
    samples = {name: generated[prompted.labels[:, c] == 1][:4] for c, name in enumerate(PATHOLOGIES)}
    return GeneratorEvaluation(
        (len(reference.prompts), len(prompted.prompts)), by_space, floor, ceiling, skipped, kid_by_class, fid_by_class,
        ms_ssim_diversity(groups), ms_ssim_diversity(across), ms_ssim_diversity(real_pairs), faithfulness, retrieval,
        memorisation, closest, samples, {name: in_domain[name] for name in ("reference", "generated")})


@dataclass(frozen=True)
class SweepPoint:
    label: str  # the sampler settings that differ from the configured ones; "real (floor)" for half B's real images
    fid: float  # in-domain, against half A
    precision: float
    recall: float
    ms_ssim: float | None  # within a prompt; for the real point, between real images of different studies
    faithfulness: float | None  # macro AUROC of the real-trained classifier against the prompts' labels
    faithfulness_populated: float | None  # the same over the classes with at least min_per_class positive prompts


SWEEP_DIVERSITY_PROMPTS = 8  # prompts a sweep point generates images_per_prompt times: enough to rank the points


def sampler_sweep(generators: dict[str, ImageGenerator], studies: EvaluationSet, classifier_dir: Path,
                  section: GeneratorEvalSection, seed: int) -> list[SweepPoint]:
    """The fidelity-diversity curve: each generator (the same weights under other sampler settings, by label) on the
    first sweep_prompts half-B prompts with the seeds of the main evaluation, beside half B's real images of those
    studies; every point has the same sizes, so the points compare with each other (not with the full-size FID)."""
    reference, prompted = studies.reference, studies.prompted
    n = min(section.sweep_prompts, len(prompted.prompts))
    extractor = in_domain_extractor(classifier_dir)
    reference_features = fidelity.features(reference.images, extractor)
    trained = load_classifier(classifier_dir)
    real = fidelity.distances(reference_features, fidelity.features(prompted.images[:n], extractor),
                              section.nearest_k, seed)
    real_pairs = [np.stack([reference.images[i], reference.images[i + 1]])
                  for i in range(0, min(len(reference.images), 2 * SWEEP_DIVERSITY_PROMPTS) - 1, 2)]
    points = [SweepPoint("real (floor)", real["fid"], real["precision"], real["recall"],
                         ms_ssim_diversity(real_pairs), None, None)]
    populated = populated_classes(prompted.labels[:n], section.min_per_class)
    seeds = [seed * 1_000_003 + index for index in range(n)]
    for label, generator in generators.items():
        generated = _generate(generator, prompted.prompts[:n], seeds, section.batch_size,
                              prompted.conditions.take(slice(n)))
        found = fidelity.distances(reference_features, fidelity.features(generated, extractor), section.nearest_k,
                                   seed)
        groups = _seed_groups(generator, prompted, SWEEP_DIVERSITY_PROMPTS, section, seed)
        faithfulness = label_faithfulness(trained.model, generated, prompted.labels[:n], trained.config.image_size)
        points.append(SweepPoint(label, found["fid"], found["precision"], found["recall"],
                                 ms_ssim_diversity(groups), faithfulness.macro, macro_over(faithfulness, populated)))
    return points


def sweep_markdown(points: list[SweepPoint]) -> str:
    lines = ["| sampler | FID (in-domain) | precision | recall | MS-SSIM within a prompt | faithfulness (macro) | "
             "faithfulness (populated classes) |", "|---|---|---|---|---|---|---|"]
    for point in points:
        lines.append(f"| {point.label} | {point.fid:.4g} | {point.precision:.3f} | {point.recall:.3f} | "
                     f"{_or_dash(point.ms_ssim)} | {_or_dash(point.faithfulness)} | "
                     f"{_or_dash(point.faithfulness_populated)} |")
    return "\n".join(lines)


def _seed_groups(generator: ImageGenerator, studies: Studies, prompts: int, section: GeneratorEvalSection, seed: int
                 ) -> list[np.ndarray]:
    """images_per_prompt images of each of the first `prompts` studies' prompts (and conditions), with seeds no other
    measure uses: the within-prompt groups."""
    per_prompt = section.images_per_prompt
    return [_generate(generator, [prompt] * per_prompt,
                      [seed * 1_000_003 + 7_919 * (p + 1) + k for k in range(per_prompt)], section.batch_size,
                      studies.conditions.take(np.full(per_prompt, p)))
            for p, prompt in enumerate(studies.prompts[:prompts])]


def _generate(generator: ImageGenerator, prompts: list[str], seeds: list[int], batch_size: int,
              conditions: Conditions) -> np.ndarray:
    return np.concatenate([generator.generate(prompts[start:start + batch_size], seeds[start:start + batch_size],
                                              conditions.take(slice(start, start + batch_size))).images
                           for start in range(0, len(prompts), batch_size)])


def _memorisation(feats: dict[str, np.ndarray], train: np.ndarray, generated: np.ndarray, train_images: np.ndarray,
                  pairs: int) -> tuple[dict[str, float], list[tuple[np.ndarray, np.ndarray, float]]]:
    """How close generated images come to training images, against how close real held-out images come."""
    generated_distance, nearest = fidelity.nearest_distances(feats["generated"], train)
    held_out_distance, _ = fidelity.nearest_distances(np.concatenate([feats["reference"], feats["prompted"]]), train)
    threshold = float(np.percentile(held_out_distance, 1))
    order = np.argsort(generated_distance)[:pairs]
    closest = [(generated[i], train_images[nearest[i]], float(generated_distance[i])) for i in order]
    return {"share_closer_than_held_out_p1": float((generated_distance < threshold).mean()),
            "held_out_p1_distance": threshold, "median_distance": float(np.median(generated_distance)),
            "held_out_median_distance": float(np.median(held_out_distance))}, closest


def metrics(result: GeneratorEvaluation) -> dict[str, float]:
    """The MLflow metrics: generator/<measure>/<feature space> beside generator/<measure>_real_reference/<space>
    (the floor) and generator/<measure>_tokenizer/<space> (the ceiling); then per class, diversity, faithfulness
    and memorisation."""
    out: dict[str, float] = {}
    for suffix, by_space in (("", result.generated), ("_real_reference", result.real_reference),
                             ("_tokenizer", result.tokenizer)):
        for space, values in by_space.items():
            out |= {f"generator/{measure}{suffix}/{space}": value for measure, value in values.items()}
    for name, (kid_mean, kid_std, _) in result.kid_by_class.items():
        out[f"generator/kid_by_class/{name}"] = kid_mean
        out[f"generator/kid_by_class/{name}/std"] = kid_std
    for name, (fid, fid_real) in result.fid_by_class.items():
        out[f"generator/fid_by_class/{name}"] = fid
        out[f"generator/fid_by_class/{name}/real"] = fid_real
    out |= {"generator/ms_ssim": result.ms_ssim, "generator/ms_ssim_across_prompts": result.ms_ssim_across_prompts,
            "generator/ms_ssim_real_reference": result.ms_ssim_real_reference}
    populated = result.faithfulness.populated
    for prefix, report in result.faithfulness.columns().items():
        out |= {f"generator/{prefix}/auroc/{name}": value for name, value in (
            report.per_class | {"macro": report.macro, "macro_populated": macro_over(report, populated)}).items()
                if value is not None}
    out |= {f"generator/retrieval/{name}": value for name, value in result.retrieval.items()}
    out |= {f"generator/memorisation/{name}": value for name, value in result.memorisation.items()}
    return out


def faithfulness_markdown(faithfulness: Faithfulness) -> list[str]:
    """The faithfulness table: AUROC per class (rows) by judge and image set (columns), with the macros last."""
    columns = {"real-trained judge: real (half B)": faithfulness.real,
               "real-trained: reconstructed": faithfulness.reconstructed,
               "real-trained: generated": faithfulness.generated,
               "decoded-domain judge: reconstructed (ceiling)": faithfulness.decoded_ceiling,
               "decoded-domain: generated": faithfulness.decoded_generated}
    columns = {name: report for name, report in columns.items() if report is not None}
    lines = ["| label faithfulness (AUROC) | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in PATHOLOGIES:
        lines.append(f"| {name} | " + " | ".join(_or_dash(report.per_class.get(name)) for report in columns.values())
                     + " |")
    lines.append("| macro | " + " | ".join(_or_dash(report.macro) for report in columns.values()) + " |")
    populated = faithfulness.populated
    lines.append(f"| macro of the {len(populated)} classes with enough positives ({', '.join(populated) or 'none'}) | "
                 + " | ".join(_or_dash(macro_over(report, populated)) for report in columns.values()) + " |")
    return lines


def _or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def to_markdown(result: GeneratorEvaluation) -> str:
    """The generator panel as a person reads it: each measure beside its real reference and the tokenizer's."""
    n_reference, n_prompted = result.studies
    lines = [f"Held-out studies: {n_reference} reference (half A) and {n_prompted} prompts (half B), "
             "patient-disjoint.", "",
             "| feature space | measure | generated | real vs real (floor) | tokenizer (ceiling) |",
             "|---|---|---|---|---|"]
    for space, values in result.generated.items():
        for measure, value in values.items():
            ceiling = result.tokenizer.get(space, {}).get(measure)
            lines.append(f"| {space} | {measure} | {value:.4g} | {result.real_reference[space][measure]:.4g} | "
                         f"{'-' if ceiling is None else f'{ceiling:.4g}'} |")
    lines += ["", "| diversity (MS-SSIM, lower is more diverse) | value |", "|---|---|",
              f"| within a prompt | {result.ms_ssim:.3f} |",
              f"| across prompts | {result.ms_ssim_across_prompts:.3f} |",
              f"| real images of different studies | {result.ms_ssim_real_reference:.3f} |", "",
              *faithfulness_markdown(result.faithfulness), "",
              "| pathology | KID (in-domain) | FID (in-domain) | real FID | positives (smaller half) |",
              "|---|---|---|---|---|"]
    for name in PATHOLOGIES:
        kid, fid = result.kid_by_class.get(name), result.fid_by_class.get(name)
        lines.append(f"| {name} | {'-' if kid is None else f'{kid[0]:.4g} ± {kid[1]:.2g}'} | "
                     f"{'-' if fid is None else f'{fid[0]:.4g}'} | {'-' if fid is None else f'{fid[1]:.4g}'} | "
                     f"{'-' if kid is None else kid[2]} |")
    hits = result.retrieval
    lines += ["", f"Retrieval (in-domain): {100 * hits['top1']:.1f}% of generated images have their own study's real "
              f"image nearest among the {n_prompted} of half B (chance {100 * hits['top1_chance']:.1f}%), "
              f"{100 * hits['top5']:.1f}% among the 5 nearest (chance {100 * hits['top5_chance']:.1f}%)."]
    memo = result.memorisation
    lines += ["", f"Memorisation: {100 * memo['share_closer_than_held_out_p1']:.1f}% of generated images are closer "
              f"to a training image than the 1st percentile of real held-out images ({memo['held_out_p1_distance']:.3g}"
              f"); median nearest-training distance {memo['median_distance']:.3g} generated vs "
              f"{memo['held_out_median_distance']:.3g} held-out."]
    if result.skipped:
        lines += ["", "Skipped: " + "; ".join(f"{name}: {reason}" for name, reason in result.skipped.items())]
    return "\n".join(lines)
