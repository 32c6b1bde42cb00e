"""Class-balanced synthesis on a small hand-built pair of cohorts, with a deterministic test generator."""

from __future__ import annotations

import hashlib
from collections import Counter
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from tasks import layout
from tasks.config import SynthesisSection
from tasks.data import catalog
from tasks.data.curate import CLASSIFIER_COLUMNS, GENERATOR_COLUMNS, LABEL_COLUMNS
from tasks.generators.interface import GeneratedBatch
from tasks.generators.synthesis import load_plan, load_synthetic, plan_synthesis, save_plan, synth_ids, synthesize
from tasks.pathologies import column_name, PATHOLOGIES

RATIOS = [0.0, 0.5, 1.0]
RESOLUTION = 8

# Training studies: (how many, positives, images per study). Effusion and opacity are common, edema and
# pneumothorax rare; atelectasis only comes with opacity.
TRAIN = [(20, [], 1), (8, ["Lung Opacity", "Pleural Effusion"], 1), (6, ["Pleural Effusion"], 1),
         (3, ["Cardiomegaly"], 1), (2, ["Atelectasis", "Lung Opacity"], 1), (1, ["Pneumothorax"], 2),
         (1, ["Edema"], 1)]
MASKED = "Pneumonia"  # masked (NULL) in the edema study, as the 'ignore' uncertainty policy leaves it
WITHOUT_PROMPTS = ["Consolidation", "Fracture", "Lung Lesion", "Pneumonia"]


def labels(positives: list[str], masked: list[str] = ()) -> dict[str, float | None]:
    return {column_name(name): None if name in masked else float(name in positives) for name in PATHOLOGIES}


def write_cohorts(root: Path) -> None:
    """The curate stage's two files. Besides TRAIN: a PA-only (so impression-less) training study with the only
    fracture, and validation/test studies positive for consolidation and cardiomegaly that must never be drawn."""
    classifier, generator = [], []

    def study(study_id: int, split: str, positives: list[str], images: int = 1, view: str = "AP",
              masked: list[str] = ()) -> None:
        for index in range(images):
            classifier.append({"dicom_id": f"d{study_id}-{index}", "subject_id": study_id, "study_id": study_id,
                               "split": split, "view_position": view, **labels(positives, masked)})
        if view == "AP":
            generator.append({"dicom_id": f"d{study_id}-0", "subject_id": study_id, "study_id": study_id,
                              "split": split, "view_position": view,
                              "impression": f"{split} study {study_id}: {', '.join(positives)}"})

    study_id = 100
    for count, positives, images in TRAIN:
        for _ in range(count):
            study(study_id, "train", positives, images, masked=[MASKED] if positives == ["Edema"] else [])
            study_id += 1
    study(900, "train", ["Fracture"], view="PA")
    study(901, "validate", ["Consolidation", "Cardiomegaly"])
    study(902, "test", ["Consolidation", "Edema"])
    label_fields = [pa.field(column, pa.float32()) for column in LABEL_COLUMNS]
    classifier_schema = pa.schema([("dicom_id", pa.string()), ("subject_id", pa.int64()), ("study_id", pa.int64()),
                                   ("split", pa.string()), ("view_position", pa.string()), *label_fields])
    generator_schema = pa.schema([("dicom_id", pa.string()), ("subject_id", pa.int64()), ("study_id", pa.int64()),
                                  ("split", pa.string()), ("view_position", pa.string()),
                                  ("impression", pa.string())])
    layout.cohorts_dir(root).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(classifier, classifier_schema).select(CLASSIFIER_COLUMNS),
                   layout.cohorts_dir(root) / "classifier.parquet")
    pq.write_table(pa.Table.from_pylist(generator, generator_schema).select(GENERATOR_COLUMNS),
                   layout.cohorts_dir(root) / "generator.parquet")


def cohort(root: Path, name: str) -> list[dict]:
    return pq.read_table(layout.cohorts_dir(root) / f"{name}.parquet").to_pylist()


def pattern(prompt: str, seed: int) -> np.ndarray:
    prompt_key = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    return np.random.default_rng([prompt_key, seed]).integers(0, 256, (RESOLUTION, RESOLUTION), dtype=np.uint8)


class PatternGenerator:
    """Test double of ImageGenerator: noise seeded by (prompt, seed), so a mixed-up prompt, seed or row shows.
    `fail_on_call` makes that generate() call raise, as a crash midway through a ratio would."""

    resolution, needs = RESOLUTION, None

    def __init__(self, generator_id: str = "pattern-v1", fail_on_call: int | None = None):
        self.generator_id = self.output_id = generator_id  # no sampling settings to tell outputs apart
        self.fail_on_call = fail_on_call
        self.calls: list[int] = []  # batch sizes asked for

    def generate(self, prompts: list[str], seeds: list[int], conditions=None) -> GeneratedBatch:
        self.calls.append(len(prompts))
        if len(self.calls) == self.fail_on_call:
            raise RuntimeError("injected failure")
        return GeneratedBatch(images=np.stack([pattern(prompt, seed) for prompt, seed in zip(prompts, seeds)]),
                              provenance=[{"sampler": "pattern", "seed": seed} for seed in seeds])


def synthetic_rows(root: Path) -> list[dict]:
    with catalog.connect(root) as con:
        return sorted(con.table("synthetic").to_arrow_table().to_pylist(), key=lambda row: row["synth_id"])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_cohorts(tmp_path)
    return tmp_path


def test_plan_sizes_are_round_ratio_times_real_train_images_and_smaller_ratios_are_prefixes(root):
    n_train = sum(row["split"] == "train" for row in cohort(root, "classifier"))
    plan = plan_synthesis(root, RATIOS, seed=0)
    for ratio in RATIOS:
        assert plan.ratios[ratio].images == round(ratio * n_train)
        assert plan.rows_for(ratio) == plan.rows[:round(ratio * n_train)]
    assert len(plan.rows) == n_train
    # Planning the smaller ratios alone draws exactly the first rows of the larger plan.
    assert plan_synthesis(root, [0.5], seed=0).rows == plan.rows_for(0.5)
    assert plan_synthesis(root, RATIOS, seed=0) == plan


def test_prompts_are_training_impressions_and_labels_those_of_the_source_study(root):
    impressions = {row["study_id"]: row["impression"] for row in cohort(root, "generator") if row["split"] == "train"}
    study_labels = {row["study_id"]: {col: row[col] for col in LABEL_COLUMNS}
                    for row in cohort(root, "classifier") if row["split"] == "train"}
    plan = plan_synthesis(root, RATIOS, seed=0)
    assert [row["plan_position"] for row in plan.rows] == list(range(len(plan.rows)))
    for row in plan.rows:
        assert row["prompt"] == impressions[row["source_study_id"]]  # a train study's own impression
        assert {col: row[col] for col in LABEL_COLUMNS} == study_labels[row["source_study_id"]]
        assert row[column_name(row["target"])] == 1  # drawn for a class it is positive for
    edema = [row for row in plan.rows if row["target"] == "Edema"]
    assert edema and all(row[column_name(MASKED)] is None for row in edema)  # masked stays masked


def test_plan_raises_the_worst_class_and_narrows_the_spread(root):
    plan = plan_synthesis(root, RATIOS, seed=0)
    drawable = [name for name in PATHOLOGIES if name not in WITHOUT_PROMPTS]
    for ratio in RATIOS:
        counts = plan.ratios[ratio]
        added = {name: sum(row[column_name(name)] == 1 for row in plan.rows_for(ratio)) for name in PATHOLOGIES}
        assert counts.after == {name: counts.before[name] + added[name] for name in PATHOLOGIES}
    before, after = plan.ratios[1.0].before, plan.ratios[1.0].after
    assert min(after[name] for name in drawable) > min(before[name] for name in drawable) + 5
    assert max(after[name] for name in drawable) - min(after[name] for name in drawable) < \
        max(before[name] for name in drawable) - min(before[name] for name in drawable)
    assert plan.ratios[0.0].after == before


def test_class_without_prompts_is_reported_and_the_plan_still_made(root, caplog):
    with caplog.at_level(logging.WARNING, logger="tasks.generators.synthesis"):
        plan = plan_synthesis(root, RATIOS, seed=0)
    # Fracture's only study is PA (no impression), consolidation's are outside train, two classes have no positives.
    assert plan.without_prompts == WITHOUT_PROMPTS
    assert all(name in caplog.text for name in WITHOUT_PROMPTS)
    assert "Fracture (no prompts)" in plan.to_markdown()
    assert len(plan.rows) == plan.ratios[1.0].images > 0
    assert {row["source_study_id"] for row in plan.rows}.isdisjoint({900, 901, 902})
    for name in WITHOUT_PROMPTS:
        assert plan.ratios[1.0].after[name] == plan.ratios[1.0].before[name]


def test_no_prompt_at_all_gives_an_empty_plan(root):
    generator = pq.read_table(layout.cohorts_dir(root) / "generator.parquet")
    pq.write_table(generator.filter(pc.field("split") != "train"), layout.cohorts_dir(root) / "generator.parquet")
    plan = plan_synthesis(root, RATIOS, seed=0)
    assert plan.rows == [] and plan.without_prompts == list(PATHOLOGIES)
    assert plan.ratios[1.0].images == 0 and plan.ratios[1.0].after == plan.ratios[1.0].before


def test_plan_draws_depend_on_the_seed(root):
    first, second = plan_synthesis(root, RATIOS, seed=0), plan_synthesis(root, RATIOS, seed=1)
    assert first.rows != second.rows
    assert [row["target"] for row in first.rows] == [row["target"] for row in second.rows]  # same balancing


def test_no_finding_prompts_come_at_the_real_training_share(root):
    train = [row for row in cohort(root, "classifier") if row["split"] == "train"]
    share = sum(all(row[col] != 1 for col in LABEL_COLUMNS) for row in train) / len(train)
    plan = plan_synthesis(root, RATIOS, seed=0, no_finding=True)
    assert len(plan.rows) == len(train)  # the ratio's size is kept: No Finding rows take a share of it
    for ratio in (0.5, 1.0):
        rows = plan.rows_for(ratio)
        negatives = [row for row in rows if row["target"] == "No Finding"]
        assert abs(len(negatives) - share * len(rows)) <= 1
        assert all(all(row[col] != 1 for col in LABEL_COLUMNS) for row in negatives)
    # Every other row still balances: the rarest drawable class is raised.
    assert plan.ratios[1.0].after["Edema"] > plan.ratios[1.0].before["Edema"]
    assert not any(row["target"] == "No Finding" for row in plan_synthesis(root, RATIOS, seed=0).rows)


def test_a_study_prompts_at_most_max_uses_images_and_the_plan_ends_when_they_run_out(root, caplog):
    unlimited = plan_synthesis(root, RATIOS, seed=0)
    assert max(Counter(row["source_study_id"] for row in unlimited.rows).values()) > 2  # the rare classes repeat
    capped = plan_synthesis(root, RATIOS, seed=0, max_uses_per_prompt=2, no_finding=True)
    assert max(Counter(row["source_study_id"] for row in capped.rows).values()) == 2
    assert len([row for row in capped.rows if row["target"] == "Edema"]) == 2  # the one edema study, twice
    positive_studies = {row["study_id"] for row in cohort(root, "classifier")
                        if row["split"] == "train" and row["view_position"] == "AP"
                        and any(row[col] == 1 for col in LABEL_COLUMNS)}
    with caplog.at_level(logging.WARNING, logger="tasks.generators.synthesis"):
        once = plan_synthesis(root, RATIOS, seed=0, max_uses_per_prompt=1)
    # Each study with a finding once, then nothing is left to draw: the plan is shorter than asked, and says so.
    assert sorted(row["source_study_id"] for row in once.rows) == sorted(positive_studies)
    assert once.ratios[1.0].images == len(once.rows) < len(unlimited.rows)
    assert f"ran out after {len(once.rows)} of {len(unlimited.rows)}" in caplog.text


def test_synthesize_stores_images_labels_and_provenance(root):
    plan = plan_synthesis(root, RATIOS, seed=0)
    generator = PatternGenerator()
    counts = synthesize(root, generator, plan.rows, batch_size=8, seed=0, progress=False)
    assert (counts.generated, counts.skipped) == (len(plan.rows), 0)
    assert generator.calls == [8] * 5 + [len(plan.rows) - 40]

    stored = {row["synth_id"]: row for row in synthetic_rows(root)}
    ids = synth_ids(plan.rows, seed=0)
    assert sorted(stored) == sorted(ids) and len(set(ids)) == len(ids)
    images, label_matrix = load_synthetic(root, "pattern-v1", ids)
    for index, (synth_id, row) in enumerate(zip(ids, plan.rows)):
        record = stored[synth_id]
        assert (record["prompt"], record["source_study_id"], record["target"], record["generator_id"]) == \
            (row["prompt"], row["source_study_id"], row["target"], "pattern-v1")
        assert json.loads(record["sampling"]) == {"sampler": "pattern", "seed": record["seed"]}
        np.testing.assert_array_equal(images[index], pattern(row["prompt"], record["seed"]))
        expected = [np.nan if row[col] is None else row[col] for col in LABEL_COLUMNS]
        np.testing.assert_array_equal(label_matrix[index], np.array(expected, dtype=np.float32))
    assert np.isnan(label_matrix).any()  # the edema study's masked label came through

    half = synth_ids(plan.rows_for(0.5), seed=0)[::-1]  # any subset, in the order asked
    np.testing.assert_array_equal(load_synthetic(root, "pattern-v1", half)[0],
                                  images[[ids.index(synth_id) for synth_id in half]])
    with pytest.raises(KeyError, match="pattern-v2"):
        load_synthetic(root, "pattern-v2", ids[:1])


def test_generation_failed_midway_resumes_to_the_same_result(root, tmp_path_factory):
    plan = plan_synthesis(root, RATIOS, seed=0)
    with pytest.raises(RuntimeError, match="injected"):
        synthesize(root, PatternGenerator(fail_on_call=3), plan.rows, batch_size=8, seed=0, progress=False)
    assert len(synthetic_rows(root)) == 16  # two whole batches committed

    resumed = PatternGenerator()
    counts = synthesize(root, resumed, plan.rows, batch_size=8, seed=0, progress=False)
    assert (counts.generated, counts.skipped) == (len(plan.rows) - 16, 16)
    assert sum(resumed.calls) == len(plan.rows) - 16
    again = PatternGenerator()
    assert synthesize(root, again, plan.rows, batch_size=8, seed=0, progress=False).generated == 0
    assert again.calls == []

    uninterrupted = tmp_path_factory.mktemp("uninterrupted")
    write_cohorts(uninterrupted)
    synthesize(uninterrupted, PatternGenerator(), plan.rows, batch_size=8, seed=0, progress=False)
    assert synthetic_rows(root) == synthetic_rows(uninterrupted)  # no duplicates, same units and rows
    ids = synth_ids(plan.rows, seed=0)
    for left, right in zip(load_synthetic(root, "pattern-v1", ids), load_synthetic(uninterrupted, "pattern-v1", ids)):
        np.testing.assert_array_equal(left, right)


def test_generation_is_deterministic_per_seed(root, tmp_path_factory):
    rows = plan_synthesis(root, RATIOS, seed=0).rows_for(0.5)
    other = tmp_path_factory.mktemp("other")
    for seed in (0, 1):
        synthesize(root, PatternGenerator(), rows, batch_size=8, seed=seed, progress=False)
    synthesize(other, PatternGenerator(), rows, batch_size=5, seed=0, progress=False)
    same = load_synthetic(root, "pattern-v1", synth_ids(rows, seed=0))[0]
    np.testing.assert_array_equal(same, load_synthetic(other, "pattern-v1", synth_ids(rows, seed=0))[0])
    reseeded = load_synthetic(root, "pattern-v1", synth_ids(rows, seed=1))[0]
    assert set(synth_ids(rows, seed=0)).isdisjoint(synth_ids(rows, seed=1))
    assert not np.array_equal(same, reseeded)


def test_synthesis_config_rejects_bad_ratios():
    assert SynthesisSection().ratios == RATIOS
    for ratios in ([-0.5, 1.0], [0.5, 0.5], []):
        with pytest.raises(ValidationError, match="ratios"):
            SynthesisSection(ratios=ratios)


def test_the_kept_plan_reads_back_as_planned_and_a_missing_one_names_the_stage(root):
    with pytest.raises(FileNotFoundError, match="run the synthesize stage first"):
        load_plan(root)
    plan = plan_synthesis(root, RATIOS, seed=0)
    save_plan(root, plan)
    assert load_plan(root) == plan
    assert not [path for path in (root / "synthetic").iterdir() if path.name.endswith(".tmp")]


class LabelRecorder(PatternGenerator):
    """Keeps the label rows of the conditions each generate() call got, as a label-conditioned family reads them."""

    def __init__(self):
        super().__init__("labels-v1")
        self.labels: list[np.ndarray] = []

    def generate(self, prompts, seeds, conditions=None):
        self.labels.append(conditions.labels)
        return super().generate(prompts, seeds)


def test_each_batch_gets_its_source_studies_conditions(root):
    from tasks.generators.conditions import StudyConditions

    plan = plan_synthesis(root, RATIOS, seed=0)
    generator = LabelRecorder()
    synthesize(root, generator, plan.rows, batch_size=8, seed=0, progress=False, conditions=StudyConditions(root))
    got = np.concatenate(generator.labels)
    # The plan row's own labels, a masked one as absent: the condition the family trained on for that study.
    expected = np.array([[0.0 if row[col] is None else row[col] for col in LABEL_COLUMNS] for row in plan.rows],
                        dtype=np.float32)
    np.testing.assert_array_equal(got, expected)
    assert (got == 1).any() and len(generator.labels) == -(-len(plan.rows) // 8)
