"""The downstream protocol end to end on a tiny data root: the reference arm, a pretrain-then-fine-tune arm and a
quality-gated arm, each at ratios 0 and 1, logged to a temporary MLflow store."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from family_cohort import draw, DRAWN, RESOLUTION
from tasks import layout, tracking
from tasks.config import load_config
from tasks.data import catalog
from tasks.data.curate import CLASSIFIER_COLUMNS, GENERATOR_COLUMNS, LABEL_COLUMNS
from tasks.data.pixels import write_shard
from tasks.evaluation import retrain as protocol
from tasks.generators.interface import GeneratedBatch
from tasks.generators.synthesis import plan_synthesis, synthesize
from tasks.pathologies import column_name, PATHOLOGIES

SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"
SPLITS = {"train": 48, "validate": 24, "test": 24}


def write_cohorts(root: Path) -> None:
    """One AP image per study and patient, the drawn findings at random; impressions name them."""
    rng = np.random.default_rng(0)
    rows, images = [], []
    for split, count in SPLITS.items():
        for _ in range(count):
            index = len(rows)
            positives = {name for name in DRAWN if rng.random() < 0.5}
            rows.append({"dicom_id": f"d{index:03d}", "subject_id": 1000 + index, "study_id": 1000 + index,
                         "split": split, "view_position": "AP",
                         "impression": " ".join(sorted(positives)) or "no acute findings",
                         **{column_name(p): float(p in positives) for p in PATHOLOGIES}})
            images.append(draw(positives, rng))
    write_shard(root, RESOLUTION, "all", np.stack(images))
    catalog.write_part(root, "pixels", "all", [{"dicom_id": row["dicom_id"], "resolution": RESOLUTION,
                                                "shard": "all", "shard_row": i} for i, row in enumerate(rows)])
    layout.cohorts_dir(root).mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.select(GENERATOR_COLUMNS), layout.cohort_file(root, "generator"))
    labels = [table[column].cast(pa.float32()) for column in LABEL_COLUMNS]
    pq.write_table(pa.Table.from_arrays([table[c] for c in CLASSIFIER_COLUMNS if c not in LABEL_COLUMNS] + labels,
                                        [c for c in CLASSIFIER_COLUMNS if c not in LABEL_COLUMNS] + LABEL_COLUMNS)
                   .select(CLASSIFIER_COLUMNS), layout.cohort_file(root, "classifier"))


class HalfFaithful:
    """Draws the findings its prompt names for even seeds and the opposite ones for odd seeds: a generator half of
    whose images a real-trained classifier can refute."""

    resolution = RESOLUTION
    generator_id = output_id = "half-faithful"

    def generate(self, prompts: list[str], seeds: list[int], conditions=None) -> GeneratedBatch:
        images = []
        for prompt, seed in zip(prompts, seeds):
            named = {name for name in DRAWN if name in prompt}
            images.append(draw(named if seed % 2 == 0 else set(DRAWN) - named, np.random.default_rng(seed)))
        return GeneratedBatch(np.stack(images), [{"seed": seed} for seed in seeds])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)  # the test machines' cores are shared
    root = tmp_path_factory.mktemp("retrain")
    write_cohorts(root)
    arms = ("[{name: full-data}, {name: pretrain, schedule: pretrain_finetune, pretrain_share: 0.5}, "
            "{name: gated, quality_gate: true}]")
    config = load_config(SMOKE, [f"run.data_root={root}", "synthesis.ratios=[0.0, 1.0]", "retrain.seeds=[0]",
                                 "retrain.bootstrap_resamples=20", f"retrain.arms={arms}",
                                 "retrain.classifier={steps: 8, eval_every: 2, batch_size: 16, lr: 0.001, "
                                 "image_size: 32, patience: 4}"])
    plan = plan_synthesis(root, config.synthesis.ratios, config.synthesis.seed)
    generator = HalfFaithful()
    synthesize(root, generator, plan.rows, batch_size=16, seed=config.synthesis.seed, progress=False)
    calls = []

    def train(*args, **kwargs):
        calls.append((args, kwargs))
        return protocol.train_one(*args, **kwargs)

    with tracking.start_parent_run(config, str(uuid.uuid4())) as parent:
        nest = tracking.ParentRun.of(config, parent)
        result = protocol.retrain(root, RESOLUTION, config.retrain, plan, config.synthesis.seed,
                                  generator.generator_id, generator.output_id, 0, nest, "cpu", train=train)
    return root, config, plan, result, calls


def test_each_arm_trains_its_schedule_and_pairs_with_a_real_only_run_it_shares(run):
    root, config, plan, result, calls = run
    assert set(result.tables) == {"full-data", "pretrain", "gated"}
    # The reference arm's ratio-0 run is every arm's: same patients and steps, nothing synthetic at ratio 0.
    assert set(result.child_runs) == {"full-data-ratio-0-seed-0", "full-data-ratio-1-seed-0",
                                      "pretrain-ratio-1-seed-0", "gated-ratio-1-seed-0"}
    real_only = result.tables["full-data"].query("ratio == 0")
    for table in result.tables.values():
        assert table.query("ratio == 0").equals(real_only)
        assert not np.isnan(table.query("ratio == 1 and pathology == 'macro'")["diff_vs_0"].item())
    reference, mixed, pretrain, gated = [args[2] for args, _ in calls]  # the synthetic set each run saw
    shares = [(args[3], kwargs["pretrain_steps"]) for args, kwargs in calls]
    assert shares == [(0.0, 0), (0.5, 0), (0.0, 4), (0.5, 0)]  # pretraining: half the 8 steps, then real only
    assert reference is None and len(mixed) == len(pretrain) == plan.ratios[1.0].images > len(gated) > 0
    client = MlflowClient()
    pretrain_run = client.get_run(result.child_runs["pretrain-ratio-1-seed-0"]).data
    assert (pretrain_run.params["schedule"], pretrain_run.params["pretrain_steps"]) == ("pretrain_finetune", "4")
    history = client.get_metric_history(result.child_runs["pretrain-ratio-1-seed-0"], "val/auroc/macro")
    assert sorted(metric.step for metric in history) == [6, 8]  # validated only while fine-tuning


def test_the_gate_is_the_judges_once_for_the_set_and_its_counts_are_logged(run):
    root, config, plan, result, calls = run
    train, split = (protocol.load_real_split(root, RESOLUTION, name) for name in ("train", "validate"))
    gate = protocol.quality_gate_of(root, plan, config.synthesis.seed, HalfFaithful.output_id, config.retrain, train,
                                    split, "cpu")
    gated = calls[-1][0][2]
    assert len(gated) == gate.keep.sum()  # ratio 1 is the whole plan
    again = protocol.quality_gate_of(root, plan, config.synthesis.seed, HalfFaithful.output_id, config.retrain,
                                     train, split, "cpu")
    assert np.array_equal(gate.keep, again.keep)  # deterministic
    metrics = MlflowClient().get_run(result.child_runs["gated-ratio-1-seed-0"]).data.metrics
    counts = gate.kept_per_class(len(gate.keep))
    for name, (kept, generated) in counts.items():
        assert (metrics[f"quality_gate/kept/{name}"], metrics[f"quality_gate/generated/{name}"]) == (kept, generated)
    assert sum(generated for _, generated in counts.values()) >= len(gate.keep)  # every image under some heading
    assert "quality_gate/kept/No Finding" not in MlflowClient().get_run(
        result.child_runs["full-data-ratio-1-seed-0"]).data.metrics


class InvertedHalfFaithful(HalfFaithful):
    """HalfFaithful behind a decoder that inverts every image it makes or reconstructs: a latent generator whose
    images lie off the real images' domain."""

    generator_id = output_id = "inverted-half-faithful"

    def generate(self, prompts: list[str], seeds: list[int], conditions=None) -> GeneratedBatch:
        batch = super().generate(prompts, seeds, conditions)
        return GeneratedBatch(self.reconstruct(batch.images), batch.provenance)

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        return 255 - images


def test_a_latent_generators_gate_judges_in_its_decoded_domain(run):
    root, config, plan, _, _ = run
    train, val = (protocol.load_real_split(root, RESOLUTION, name) for name in ("train", "validate"))
    inverted = InvertedHalfFaithful()
    synthesize(root, inverted, plan.rows, batch_size=16, seed=config.synthesis.seed, progress=False)
    seed = config.synthesis.seed
    plain = protocol.quality_gate_of(root, plan, seed, HalfFaithful.output_id, config.retrain, train, val, "cpu")
    decoded = protocol.quality_gate_of(root, plan, seed, inverted.output_id, config.retrain, train, val, "cpu",
                                       reconstruct=inverted.reconstruct)
    real_judge = protocol.quality_gate_of(root, plan, seed, inverted.output_id, config.retrain, train, val, "cpu")
    # The same drawings, inverted: refitted on inverted real images, the judge keeps what it keeps of the plain
    # ones; the real-trained judge alone does not.
    assert 0.2 < decoded.keep.mean() < 0.8
    agreement = (decoded.keep == plain.keep).mean()
    assert agreement > 0.8 and agreement > (real_judge.keep == plain.keep).mean() + 0.1
