"""The augment flow with two generator families listed (RayGen and the label GAN) at the smoke config's size, cut
down to one arm, one seed and two ratios: every family trains, synthesizes, is retrained on and evaluated; each has
its own child run with its evaluation panel, downstream table and classifier runs; the parent run compares the
families (Δ AUROC per pathology per family, the feature PCA per family); the app finds each family's results; a
second run skips every stage of every family."""

import asyncio
import io
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.artifacts import load_text

from flows.full import PER_GENERATOR, STAGES
from tasks.config import load_config
from tasks.generators.synthesis import load_plan, load_synthetic, synth_ids
from tasks.pathologies import PATHOLOGIES
from tasks.tracking import GENERATOR_RUN_TAG, RESULTS_TAG

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")
FAMILIES = ("raygen", "gan")
CLASSIFIER_RUNS = {"full-data-ratio-0-seed-0", "full-data-ratio-1-seed-0"}
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def overrides(root: Path) -> list[str]:
    return [f"run.data_root={root}", f"generators=[{', '.join(FAMILIES)}]",
            "gan={channels: 32, steps: 6, batch_size: 8, checkpoint_every: 3}",
            "synthesis.ratios=[0.0, 1.0]", "retrain.arms=[{name: full-data}]", "retrain.seeds=[0]",
            "retrain.classifier={steps: 6, eval_every: 3, batch_size: 16, image_size: 64, patience: 2}",
            "generator_eval.sweep=[{guidance_scale: 1.0}]"]


@pytest.fixture(scope="module")
def two_families(tmp_path_factory, prefect_harness):
    from flows.full import augment

    root = tmp_path_factory.mktemp("families")
    return root, augment(config_path=SMOKE, overrides=overrides(root))


def test_every_family_trains_synthesizes_and_is_retrained_and_evaluated(two_families):
    root, result = two_families
    assert list(result) == list(STAGES)
    for name in PER_GENERATOR:
        assert set(result[name]) == set(FAMILIES), name
    # Each family's stage has its own record, so that each is skipped on its own.
    assert {path.stem for path in (root / "stages").glob("*.json")} == {
        "ingest", "curate", "tokenize", *(f"{name}-{family}" for name in PER_GENERATOR for family in FAMILIES)}
    ids = synth_ids(load_plan(root).rows, seed=0)
    outputs = set()
    for family in FAMILIES:
        trained, synthesized = result["train_generator"][family], result["synthesize"][family]
        assert trained["generator_id"].startswith(f"{family}-") and trained["steps"] > 0
        assert synthesized["generated"] == synthesized["images"] == len(ids) > 0
        images, _ = load_synthetic(root, synthesized["output_id"], ids)
        assert images.shape[0] == len(ids) and images.std() > 0
        outputs.add(synthesized["output_id"])
        assert result["evaluate_generator"][family]["output_id"] == synthesized["output_id"]
    assert len(outputs) == len(FAMILIES)


def test_each_family_has_its_child_run_and_the_parent_compares_them(two_families):
    root, result = two_families
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("augment-smoke")
    found = client.search_runs([experiment.experiment_id])
    parent = next(run for run in found if "mlflow.parentRunId" not in run.data.tags)
    assert GENERATOR_RUN_TAG not in parent.data.tags  # which generator is each child's to say
    children = {run.info.run_name: run for run in found
                if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {f"generator-{family}" for family in FAMILIES}
    for family in FAMILIES:
        child = children[f"generator-{family}"]
        assert child.data.tags[GENERATOR_RUN_TAG] == result["train_generator"][family]["generator_id"]
        assert child.data.tags[RESULTS_TAG] == "true"
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"comparison.csv", "comparison.md", "verdict.md", "auroc_by_ratio.png", "generator_evaluation.md",
                "feature_pca.png", "samples_by_class.png"} <= artifacts, family
        assert "generator/fid/densenet121-xrv" in child.data.metrics
        classifiers = {run.info.run_name for run in found
                       if run.data.tags.get("mlflow.parentRunId") == child.info.run_id}
        assert classifiers == CLASSIFIER_RUNS, family
        version = client.get_model_version_by_alias(f"cxr-densenet-smoke-{family}", "best")
        assert version.run_id == result["retrain"][family]["best_run_id"]
    # The sweep is RayGen's sampler's; the GAN has none to sweep.
    assert "generator/sweep/guidance_scale:1/fid" in children["generator-raygen"].data.metrics
    assert not any(key.startswith("generator/sweep/") for key in children["generator-gan"].data.metrics)
    assert client.list_artifacts(children["generator-raygen"].info.run_id, "samples")

    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "families")}
    assert {f"families/{name}" for name in ("auroc_delta.csv", "auroc_delta.md", "auroc_delta.png",
                                            "feature_pca.png")} <= parent_artifacts
    deltas = pd.read_csv(io.StringIO(load_text(f"{parent.info.artifact_uri}/families/auroc_delta.csv")))
    assert set(deltas["family"]) == set(FAMILIES) and set(deltas["ratio"]) == {1.0}
    assert set(deltas["pathology"]) == {*PATHOLOGIES, "macro"}
    for family in FAMILIES:  # the family's own table's differences, side by side
        own = pd.DataFrame(result["retrain"][family]["comparison"]["full-data"])
        own = own[own["ratio"] == 1.0].set_index("pathology")["diff_vs_0"]
        mine = deltas[deltas["family"] == family].set_index("pathology")["diff_vs_0"]
        pd.testing.assert_series_equal(mine.sort_index(), own.sort_index(), check_names=False)
    markdown = load_text(f"{parent.info.artifact_uri}/families/auroc_delta.md")
    assert all(f"{family} Δ 100% vs 0%" in markdown for family in FAMILIES)


def test_the_app_finds_each_familys_results(two_families):
    from tasks.browse.results import latest_results

    root, result = two_families
    found = {run.family: run for run in latest_results(load_config(SMOKE, overrides(root)))}
    assert set(found) == set(FAMILIES)
    for family, run in found.items():
        assert run.generator_id == result["train_generator"][family]["generator_id"]
        assert not run.comparison.empty and not run.generator.empty


def test_a_second_run_skips_every_stage_of_every_family(two_families):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.full import augment

    root, first = two_families
    state = augment(config_path=SMOKE, overrides=overrides(root), return_state=True)
    second = state.result()
    for family in FAMILIES:
        assert second["retrain"][family]["comparison_markdown"] == first["retrain"][family]["comparison_markdown"]

    async def stage_runs():
        async with get_client() as client:
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))

    shown = {run.name for run in asyncio.run(stage_runs())}
    assert shown == {f"{name} (unchanged)" for name in ("ingest", "curate", "tokenize")} | {
        f"{name}-{family} (unchanged)" for name in PER_GENERATOR for family in FAMILIES}


def test_the_apps_generate_page_draws_each_familys_images_from_what_it_reads(two_families, monkeypatch):
    import sys

    import numpy as np
    from streamlit.testing.v1 import AppTest

    from tasks import layout

    root, result = two_families
    argv = [item for override in overrides(root) for item in ("--set", override)]
    monkeypatch.setattr(sys, "argv", ["app/main.py", "--config", SMOKE, *argv])
    app = AppTest.from_file(str(layout.APP_SCRIPT), default_timeout=300).run()
    picker = app.selectbox(key="generate_generator")
    labels = {family: next(i for i, option in enumerate(picker.options) if option.startswith(f"{family}:"))
              for family in FAMILIES}
    picker.select_index(labels["raygen"]).run()
    assert app.radio(key="prompt_mode").options == ["Free text", "Findings"]  # RayGen reads the text
    app.selectbox(key="generate_generator").select_index(labels["gan"]).run()

    # The label GAN reads labels alone: the page offers findings, and they are what its images are drawn from.
    assert app.radio(key="prompt_mode").options == ["Findings"]
    assert any("no sampler settings" in caption.value for caption in app.caption)
    app.multiselect(key="findings").set_value(["Cardiomegaly", "Edema"]).run()
    app.number_input(key="count").set_value(2)
    app.button(key="generate").click().run()
    assert not app.exception and not app.error, [element.value for element in app.error]
    images, provenance = app.session_state["grid"]
    gan_id = result["train_generator"]["gan"]["generator_id"]
    expected = [float(name in ("Cardiomegaly", "Edema")) for name in PATHOLOGIES]
    assert images.shape[0] == 2 and not np.array_equal(images[0], images[1])  # two seeds
    assert all(record["generator_id"] == gan_id and record["labels"] == expected for record in provenance)


def test_the_apps_generate_page_draws_variations_of_the_held_out_study_picked(two_families, monkeypatch,
                                                                              tiny_rad_dino):
    """Image-conditioned diffusion on the Generate page: the person picks a held-out study, sees its radiograph, and
    the images are drawn from that study's image (the same as generating from it directly), not from the text."""
    import sys

    import numpy as np
    from streamlit.testing.v1 import AppTest

    from tasks import layout
    from tasks.browse.compare import held_out_studies
    from tasks.browse.generators import generate_grid, open_generator
    from tasks.generators import families
    from tasks.generators.conditions import study_conditions
    from tasks.generators.training import FitInputs
    from tasks.generators.vqgan.training import prepare_vqgan

    root, _ = two_families
    diffusion = (f"diffusion={{conditioning: image, latent: pixels, image_encoder: {tiny_rad_dino}, "
                 "block_channels: [16, 32], cross_dim: 16, head_dim: 8, train_timesteps: 50, steps: 2, batch_size: 8, "
                 "checkpoint_every: 2, sampling: {scheduler: ddim, steps: 3, guidance_scale: 2.0}}")
    config = load_config(SMOKE, [*overrides(root), diffusion])
    resolution = config.ingest.resolution
    vqgan = prepare_vqgan(root, config.vqgan, resolution, "cpu")  # latent: pixels, so it is not read
    generator_id, _ = families.fit("diffusion", config.diffusion, FitInputs(
        root, resolution, vqgan.model, vqgan.vqgan_id, "unused", 1, config.text.max_tokens))

    argv = [item for override in [*overrides(root), diffusion] for item in ("--set", override)]
    monkeypatch.setattr(sys, "argv", ["app/main.py", "--config", SMOKE, *argv])
    app = AppTest.from_file(str(layout.APP_SCRIPT), default_timeout=300).run()
    picker = app.selectbox(key="generate_generator")
    picker.select_index(next(i for i, option in enumerate(picker.options) if option.startswith("diffusion:"))).run()
    assert any("Variations of this radiograph" in caption.value for caption in app.caption)
    assert not [radio for radio in app.radio if radio.key == "prompt_mode"]  # no prompt: the image is the condition
    studies = held_out_studies(root)
    app.selectbox(key="reference").select_index(1).run()
    app.number_input(key="count").set_value(2)
    app.button(key="generate").click().run()
    assert not app.exception and not app.error, [element.value for element in app.error]
    images, provenance = app.session_state["grid"]
    assert all(record["generator_id"] == generator_id and record["conditioning"] == "image" for record in provenance)

    direct = open_generator(config, root, "diffusion", generator_id, config.diffusion)
    picked = study_conditions(root, [studies.study_id[1]], resolution)
    expected, _ = generate_grid(direct, studies.impression[1], [0, 1], picked)
    np.testing.assert_array_equal(images, expected)
    other, _ = generate_grid(direct, studies.impression[0], [0, 1],
                             study_conditions(root, [studies.study_id[0]], resolution))
    assert not np.array_equal(images, other)  # another reference, other images
