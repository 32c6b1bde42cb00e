"""RayGen learns on the demo cohort: trained briefly, it draws the finding its prompt names.

The cohort is the demo source's without the DICOM round trip: the first frontal image of each of STUDIES studies
(plan_studies + render_image, reduced to RESOLUTION px by ingest's square_reduce and resize_square), paired with its
report's impression as the reports stage parses it. From there the test runs what the tokenize and train_generator
stages run: prepare_vqgan trains a small VQ-GAN on the train split, encode_cohort and embed_cohort cache its tokens
and the MiniLM states, fit_raygen trains RayGen, load_raygen_generator draws images.

The judge is the pipeline's own DenseNet-121 (tasks.evaluation.classifier), trained on the training images in which
the phantom draws FINDING and those in which it draws no finding at all, as the trained VQ-GAN reconstructs them:
on radiographs projected from a real CT, with patients that vary, a pixel-space judge cannot tell them apart at
this size. The reconstructions put the judge in the drawn images' domain (what RayGen draws is decoded by the same
VQ-GAN); a judge trained on the sharp originals scored every drawn image near 0, the finding's included, and its
AUROC on them swung from 0.25 to 0.8 with display settings that leave the finding's visibility unchanged. The
images drawn from held-out impressions that name FINDING must score higher than those drawn from normal
impressions (the judge's AUROC between the two at least MIN_AUROC). Both kinds are drawn with the same seeds: a
model that ignores its prompt draws the same images for both and scores 0.5. The last test shows that RayGen at
step 0 does fail.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from models.raygen import RayGen
from tasks import layout
from tasks.config import ClassifierSection, Config
from tasks.data import catalog
from tasks.data.dicom import resize_square, square_reduce
from tasks.data.pixels import write_shard
from tasks.data.reports import parse_report
from tasks.demo.source import plan_studies, render_image
from tasks.evaluation.classifier import LabelledImages, predict, train_classifier
from tasks.generators.embeddings import embed_cohort
from tasks.generators.raygen.generator import fit_raygen, load_raygen_generator, RayGenImageGenerator
from tasks.generators.text import BUILTIN_MINILM, load_text_encoder
from tasks.generators.tokens import encode_cohort
from tasks.generators.vqgan.training import prepare_vqgan
from tasks.pathologies import PATHOLOGIES

pytestmark = pytest.mark.slow

# An enlarged heart is the phantom's largest change at 32 px (the cardiac shadow grows 22-46% wider); a small
# pleural effusion blunts a couple of pixels.
FINDING = "Pleural Effusion"
NAMES_FINDING = re.compile(r"effusion", re.IGNORECASE)  # the demo reports' positive wordings
RESOLUTION = 32
STUDIES = 800  # 660 frontal images with an impression, 485 of them to train on; 33 held-out FINDING prompts
PROMPTS = 24  # per kind
MIN_AUROC_REAL = 0.8  # the judge on the reconstructions of real held-out images (measured 0.85)
MIN_AUROC = 0.7  # the judge on drawn images; a prompt-blind model scores 0.5


class DemoCohort(NamedTuple):
    rows: pa.Table  # the generator cohort as curate writes it: dicom_id, subject_id, study_id, split, impression
    images: np.ndarray  # uint8 [n, R, R] in the rows' order
    finding: np.ndarray  # bool [n]: the phantom draws FINDING
    normal: np.ndarray  # bool [n]: the phantom draws no finding
    prompt_names_finding: np.ndarray  # bool [n]: the impression reports FINDING as present


class Learned(NamedTuple):
    config: Config
    cohort: DemoCohort
    generator: RayGenImageGenerator
    reconstructed: np.ndarray  # uint8 [n, R, R]: the cohort's images through the trained VQ-GAN, the judge's domain


def demo_config(data_root: Path) -> Config:
    return Config.model_validate({
        "run": {"name": "raygen-learns", "data_root": str(data_root)},
        "source": {"kind": "demo", "studies": STUDIES, "seed": 0, "image_size": 64},
        "ingest": {"resolution": RESOLUTION},
        "curate": {"generator_views": ["AP", "PA"]},
        "text": {"encoder": BUILTIN_MINILM, "max_tokens": 64},
        # 8x8 tokens over 64 codes; no adversarial term. On the CT-projected demo 400 VQ-GAN and 600 RayGen steps:
        # the judge scores the drawn images 0.85, the reconstructions of real held-out images 0.85, RayGen at step
        # 0 0.36 (docs/BENCHMARKS.md). Sampling as the demo config's (K=8, guidance 2).
        "vqgan": {"ch": 32, "ch_mult": [1, 1, 2], "z_channels": 16, "embed_dim": 16, "n_embed": 64,
                  "dead_code_restart_after": 8, "steps": 400, "batch_size": 8, "lr": 2e-3, "disc_weight": 0.0,
                  "checkpoint_every": 400, "eval_images": 16},
        "raygen": {"d_model": 64, "n_layers": 2, "n_heads": 4, "ffn_dim": 256, "steps": 600, "batch_size": 32,
                   "lr": 2e-3, "warmup_steps": 20, "checkpoint_every": 600, "eval_every": 600, "sample_every": 600,
                   "device": "cpu",
                   "sampling": {"steps": 8, "temperature": 1.3, "top_k_frac": 0.5, "guidance_scale": 2.0}},
    })

def demo_cohort(config: Config) -> DemoCohort:
    """The first generator-view image of every planned study whose report has an impression."""
    source = config.source
    rows, images, finding, normal, names = [], [], [], [], []
    for plan in plan_studies(source.studies, source.seed, source.image_size, defects=False):
        impression = parse_report(plan.report.text).impression
        views = [j for j, image in enumerate(plan.images) if image.view in config.curate.generator_views]
        if impression is None or not views:
            continue
        rows.append({"dicom_id": plan.images[views[0]].dicom_id, "subject_id": plan.subject_id,
                     "study_id": plan.study_id, "split": plan.split, "view_position": plan.images[views[0]].view,
                     "impression": impression})
        grey = render_image(plan, views[0]).astype(np.float32) * (255 / 4095)  # 12-bit values to grey levels
        images.append(resize_square(square_reduce(grey, RESOLUTION), RESOLUTION))
        finding.append(plan.truth.findings[FINDING].present)
        normal.append(plan.truth.no_finding)
        names.append(plan.report.chexpert[FINDING] == 1.0 and bool(NAMES_FINDING.search(impression)))
    return DemoCohort(pa.Table.from_pylist(rows), np.stack(images), np.array(finding), np.array(normal),
                      np.array(names))

def write_cohort(data_root: Path, cohort: DemoCohort) -> None:
    """The cohort's pixels, generator.parquet and the classifier cohort's ids and splits (what the VQ-GAN learns
    from), as ingest and curate leave them."""
    ids = cohort.rows["dicom_id"].to_pylist()
    write_shard(data_root, RESOLUTION, "demo", cohort.images)
    catalog.write_part(data_root, "pixels", "demo", [
        {"dicom_id": dicom_id, "resolution": RESOLUTION, "shard": "demo", "shard_row": row}
        for row, dicom_id in enumerate(ids)])
    layout.cohorts_dir(data_root).mkdir(parents=True)
    pq.write_table(cohort.rows, layout.cohorts_dir(data_root) / "generator.parquet")
    pq.write_table(cohort.rows.select(["dicom_id", "subject_id", "study_id", "split"]),
                   layout.cohorts_dir(data_root) / "classifier.parquet")

def learn(config: Config) -> Learned:
    """Train the VQ-GAN and RayGen on the demo cohort of `config`, as the tokenize and train_generator stages do."""
    data_root = config.run.data_root
    cohort = demo_cohort(config)
    write_cohort(data_root, cohort)
    vqgan = prepare_vqgan(data_root, config.vqgan, RESOLUTION, "cpu")
    encode_cohort(data_root, vqgan.model, vqgan.vqgan_id, cohort.rows["dicom_id"].to_pylist(), RESOLUTION,
                  config.vqgan.encode_batch_size, config.ingest.shard_size, progress=False)
    encoder = load_text_encoder(config.text.encoder)
    embed_cohort(data_root, encoder, cohort.rows.select(["study_id", "impression"]), config.text.max_tokens,
                 config.text.batch_size, config.ingest.shard_size, progress=False)
    generator_id, _ = fit_raygen(data_root, config.raygen, config.text.max_tokens, vqgan.model, vqgan.vqgan_id,
                                 encoder.encoder_id, encoder.dim)
    generator = load_raygen_generator(data_root, generator_id, vqgan.model, encoder, config.raygen.sampling.params(),
                                      config.text.max_tokens)
    return Learned(config, cohort, generator, generator.reconstruct(cohort.images))

@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> Learned:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core box: one thread is the fastest
    yield learn(demo_config(tmp_path_factory.mktemp("demo")))
    torch.set_num_threads(threads)

_JUDGES: dict[int, torch.nn.Module] = {}  # by id(learned): trained once per trained generator
JUDGE = ClassifierSection(steps=300, eval_every=50, batch_size=32, lr=3e-4, image_size=RESOLUTION, patience=4)


def judge(learned: Learned, images: np.ndarray) -> np.ndarray:
    """The FINDING score of a DenseNet-121 trained (the pipeline's classifier, tasks.evaluation.classifier) on the
    VQ-GAN's reconstructions of the training images in which the phantom draws FINDING or no finding at all: a
    realistic demo needs a learned judge, as the generator evaluation's label faithfulness does."""
    cohort, c = learned.cohort, PATHOLOGIES.index(FINDING)
    if id(learned) not in _JUDGES:
        split = np.array(cohort.rows["split"].to_pylist())
        labels = np.full((len(cohort.images), len(PATHOLOGIES)), np.nan, np.float32)
        labels[cohort.finding, c], labels[cohort.normal, c] = 1.0, 0.0
        known = cohort.finding | cohort.normal
        train, val = known & (split == "train"), known & (split == "validate")
        seen = learned.reconstructed
        _JUDGES[id(learned)] = train_classifier(LabelledImages(seen[train], labels[train]),
                                                LabelledImages(seen[val], labels[val]), JUDGE, seed=0,
                                                progress=False).model
    blank = np.zeros((len(images), len(PATHOLOGIES)), np.float32)
    return predict(_JUDGES[id(learned)], LabelledImages(images, blank), RESOLUTION)[:, c]


def held_out(cohort: DemoCohort) -> np.ndarray:
    return np.array(cohort.rows["split"].to_pylist()) != "train"

def prompt_auroc(learned: Learned, generator: RayGenImageGenerator) -> float:
    """The judge's AUROC between images drawn from held-out FINDING impressions and from held-out normal ones; the
    i-th prompt of both kinds is drawn with seed i, so a prompt-blind model draws the same images for both: 0.5."""
    cohort = learned.cohort
    impressions = np.array(cohort.rows["impression"].to_pylist(), dtype=object)
    finding_prompts = impressions[held_out(cohort) & cohort.finding & cohort.prompt_names_finding][:PROMPTS]
    normal_prompts = impressions[held_out(cohort) & cohort.normal][:PROMPTS]
    assert len(finding_prompts) == len(normal_prompts) == PROMPTS, "too few held-out prompts: raise STUDIES"
    seeds = list(range(PROMPTS))
    drawn = np.concatenate([generator.generate(finding_prompts.tolist(), seeds).images,
                            generator.generate(normal_prompts.tolist(), seeds).images])
    return float(roc_auc_score([1] * PROMPTS + [0] * PROMPTS, judge(learned, drawn)))


def test_the_judge_tells_real_held_out_images_apart(learned):
    """On the reconstructions of real held-out images: what the judge sees is the tokenizer's domain."""
    cohort = learned.cohort
    known = held_out(cohort) & (cohort.finding | cohort.normal)
    assert roc_auc_score(cohort.finding[known], judge(learned, learned.reconstructed[known])) >= MIN_AUROC_REAL

def test_trained_raygen_draws_the_finding_its_prompt_names(learned):
    assert prompt_auroc(learned, learned.generator) >= MIN_AUROC

def test_raygen_at_step_0_fails_the_same_check(learned):
    trained = learned.generator
    torch.manual_seed(learned.config.raygen.seed)  # the initial weights train_raygen starts from
    untrained = RayGen(trained.raygen.config)
    step_0 = RayGenImageGenerator("step-0", untrained, trained.vqgan, trained.text_encoder, trained.sampling,
                                  trained.max_text_tokens)
    assert prompt_auroc(learned, step_0) < MIN_AUROC
