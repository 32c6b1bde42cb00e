"""A tiny data root for the generator families' tests: generator and classifier cohorts, pixels and cached text
states, as the ingest, curate and tokenize stages leave them, with findings drawn into the images."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tasks import layout
from tasks.data import catalog
from tasks.data.curate import CLASSIFIER_COLUMNS, GENERATOR_COLUMNS, LABEL_COLUMNS
from tasks.data.pixels import write_shard
from models.vqgan import VQGAN, VQGANConfig
from tasks.generators.embeddings import embed_cohort
from tasks.generators.training import FitInputs
from tasks.pathologies import column_name, PATHOLOGIES

RESOLUTION = 16
TEXT_DIM = 8
MAX_TOKENS = 8
# Findings the images show: a bright heart for cardiomegaly, a bright base for an effusion.
DRAWN = ("Cardiomegaly", "Pleural Effusion")


class WordEncoder:
    """Stands in for TextEncoder: a token state per word, seeded by the word, so texts naming a finding differ."""

    encoder_id = "words@test"
    dim = TEXT_DIM
    device = torch.device("cpu")

    def embed(self, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        words = [text.split()[:max_tokens] for text in texts]
        hidden = torch.zeros(len(texts), max(map(len, words)), TEXT_DIM)
        for row, text_words in enumerate(words):
            for index, word in enumerate(text_words):
                seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
                hidden[row, index] = torch.randn(TEXT_DIM, generator=torch.Generator().manual_seed(seed))
        return hidden, torch.arange(hidden.shape[1]) < torch.tensor([[len(w)] for w in words])


def draw(positives: set[str], rng: np.random.Generator) -> np.ndarray:
    image = rng.normal(60, 8, (RESOLUTION, RESOLUTION))
    if "Cardiomegaly" in positives:
        image[5:11, 5:11] += 140
    if "Pleural Effusion" in positives:
        image[12:, :] += 120
    return image.clip(0, 255).astype(np.uint8)


def write_family_cohort(root: Path, train: int = 32, validate: int = 8, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    generator, classifier, images = [], [], []
    for index in range(train + validate):
        study_id, dicom_id = 1000 + index, f"d{index:03d}"
        positives = {name for name in DRAWN if rng.random() < 0.5}
        split = "train" if index < train else "validate"
        impression = " ".join(sorted(name.lower() for name in positives)) or "no acute findings"
        view = ("AP", "PA")[index % 2]  # both views, so that a view token has something to learn
        generator.append({"dicom_id": dicom_id, "subject_id": study_id, "study_id": study_id, "split": split,
                          "view_position": view, "impression": impression})
        # Pneumonia masked in every study, as the 'ignore' policy leaves a finding nobody mentions.
        classifier.append({"dicom_id": dicom_id, "subject_id": study_id, "study_id": study_id, "split": split,
                           "view_position": view, **{column_name(p): None if p == "Pneumonia" else
                                                     float(p in positives) for p in PATHOLOGIES}})
        images.append(draw(positives, rng))
    write_shard(root, RESOLUTION, "all", np.stack(images))
    catalog.write_part(root, "pixels", "all", [
        {"dicom_id": row["dicom_id"], "resolution": RESOLUTION, "shard": "all", "shard_row": i}
        for i, row in enumerate(generator)])
    layout.cohorts_dir(root).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(generator).select(GENERATOR_COLUMNS), layout.cohort_file(root, "generator"))
    label_fields = [pa.field(column, pa.float32()) for column in LABEL_COLUMNS]
    schema = pa.schema([("dicom_id", pa.string()), ("subject_id", pa.int64()), ("study_id", pa.int64()),
                        ("split", pa.string()), ("view_position", pa.string()), *label_fields])
    pq.write_table(pa.Table.from_pylist(classifier, schema).select(CLASSIFIER_COLUMNS),
                   layout.cohort_file(root, "classifier"))
    embed_cohort(root, WordEncoder(), pa.Table.from_pylist(generator).select(["study_id", "impression"]),
                 MAX_TOKENS, batch_size=16, unit_size=64, progress=False)


def cohort_labels(root: Path, split: str) -> tuple[list[int], np.ndarray]:
    """(study ids, labels [n, 10]) of a split, in cohort order."""
    rows = pq.read_table(layout.cohort_file(root, "classifier")).to_pylist()
    rows = [row for row in rows if row["split"] == split]
    return [row["study_id"] for row in rows], np.array([[row[c] or 0.0 for c in LABEL_COLUMNS] for row in rows],
                                                       np.float32)


def tiny_vqgan() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(VQGANConfig(resolution=RESOLUTION, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 1),
                             num_res_blocks=1, attn_resolutions=(), z_channels=4, n_embed=16, embed_dim=4,
                             dead_code_restart_after=None)).eval()


def fit_inputs(root: Path, vqgan: VQGAN | None = None) -> FitInputs:
    """What families.fit reads, with a tiny untrained VQ-GAN (id "vq-test") and the word encoder."""
    return FitInputs(data_root=root, resolution=RESOLUTION, vqgan=vqgan or tiny_vqgan(), vqgan_id="vq-test",
                     encoder_id=WordEncoder.encoder_id, text_dim=TEXT_DIM, max_text_tokens=MAX_TOKENS)
