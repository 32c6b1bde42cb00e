"""Real vs generated: a held-out study's real image beside one generated from its impression, the generated image's
nearest real training images (the memorisation view, in the in-domain DenseNet feature space of
tasks/evaluation/fidelity.py) and the real-trained classifier's scores for both."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tasks import layout
from tasks.browse import BadInput
from tasks.browse.explore import require_cohorts
from tasks.config import Config
from tasks.data import catalog
from tasks.data.pixels import PixelStore
from tasks.evaluation import fidelity
from tasks.evaluation.classifier import LabelledImages, load_classifier, predict
from tasks.evaluation.generator_eval import DENSENET, register_extractors
from tasks.pathologies import PATHOLOGIES


def held_out_studies(data_root: Path) -> pd.DataFrame:
    require_cohorts(data_root)
    with duckdb.connect() as con:
        con.register("generator_cohort", pq.read_table(layout.cohort_file(data_root, "generator")))
        return con.sql(catalog.read_sql("browse_held_out")).df()


def real_classifier_dir(config: Config, data_root: Path) -> Path:
    """The classifier retrain trained on real images only (the reference arm, ratio 0, the first seed); BadInput
    until it exists."""
    directory = config.retrain.judge_dir(data_root)
    if not directory.is_dir():
        raise BadInput(f"{directory} does not exist: the real-trained classifier is made by the retrain stage; "
                       "run the pipeline through retrain first")
    return directory


def training_images(data_root: Path, resolution: int) -> tuple[list[str], np.ndarray]:
    """The generator cohort's training images (what a generated image could have copied): ids and uint8 pixels."""
    cohort = pq.read_table(layout.cohort_file(data_root, "generator")).to_pandas()
    ids = cohort.loc[cohort["split"] == "train", "dicom_id"].tolist()
    return ids, PixelStore(data_root, resolution).get_many(ids)


def nearest_training(image: np.ndarray, train_images: np.ndarray, classifier_dir: Path, k: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(indices [k] into train_images, distances [k]) of the k training images nearest to `image` in the in-domain
    feature space, nearest first; the features of the image and the training set are extracted in one pass."""
    register_extractors()
    feats = fidelity.features(np.concatenate([image[None], train_images]), fidelity.Extractor(DENSENET, classifier_dir))
    distances, index = fidelity.nearest_neighbours(feats[:1], feats[1:], k)
    return index[0], distances[0]


def classifier_scores(classifier_dir: Path, images: dict[str, np.ndarray]) -> pd.DataFrame:
    """The classifier's probability per pathology (rows) for each named uint8 [R, R] image (columns)."""
    trained = load_classifier(classifier_dir)
    stack = np.stack(list(images.values()))
    unlabelled = np.full((len(stack), len(PATHOLOGIES)), np.nan, dtype=np.float32)
    scores = predict(trained.model, LabelledImages(stack, unlabelled), trained.config.image_size)
    return pd.DataFrame(scores.T, index=pd.Index(PATHOLOGIES, name="pathology"), columns=list(images))
