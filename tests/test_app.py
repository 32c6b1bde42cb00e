"""The app as a person uses it, through Streamlit's AppTest on the smoke run's data root: each page renders, the
controls change what is shown, and bad input shows its message in the page instead of a traceback. The data access
the pages call is checked against the stores it reads."""

import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from streamlit.testing.v1 import AppTest

from tasks import layout
from tasks.browse.explore import class_counts, cohort_rows, rejects
from tasks.browse.results import generator_measures
from tasks.pathologies import PATHOLOGIES

# The first test to ask for smoke_root runs the whole smoke flow (tests/conftest.py), as test_flow_full.py allows.
pytestmark = pytest.mark.timeout(2400)
APP = str(layout.APP_SCRIPT)
SMOKE = str(layout.REPO_ROOT / "configs" / "smoke.yaml")
PAGES = ("Generate", "Real vs generated", "Dataset explorer", "Results")


def start(monkeypatch, root) -> AppTest:
    monkeypatch.setattr(sys, "argv", ["app/main.py", "--config", SMOKE, "--set", f"run.data_root={root}"])
    app = AppTest.from_file(APP, default_timeout=300)
    return app.run()


def on_page(app: AppTest, name: str) -> AppTest:
    return app.sidebar.radio(key="page").set_value(name).run()


def image_urls(app: AppTest) -> list[str]:
    return [image.url for element in app.image for image in element.proto.imgs]


def errors(app: AppTest) -> list[str]:
    return [element.value for element in app.error]


@pytest.mark.parametrize("name", PAGES)
def test_every_page_renders_on_the_smoke_run(monkeypatch, smoke_root, name):
    app = on_page(start(monkeypatch, smoke_root), name)
    assert not app.exception and not errors(app), errors(app)
    assert app.title[0].value == name


def test_generate_makes_a_grid_with_provenance_and_the_controls_change_it(monkeypatch, smoke_root):
    app = start(monkeypatch, smoke_root)
    app.text_area(key="prompt").input("Moderate right pleural effusion.")
    app.number_input(key="count").set_value(3)
    app.button(key="generate").click().run()
    assert not app.exception and not errors(app), errors(app)
    images, provenance = app.session_state["grid"]
    assert images.shape[0] == 3 and [record["seed"] for record in provenance] == [0, 1, 2]
    assert {record["prompt"] for record in provenance} == {"Moderate right pleural effusion."}
    plain = image_urls(app)
    assert len(plain) == 3
    app.sidebar.selectbox(key="window").set_value("lung").run()  # a preset changes every image shown
    windowed = image_urls(app)
    assert len(windowed) == 3 and not set(windowed) & set(plain)
    app.number_input(key="seed").set_value(10)
    app.slider(key="generate_steps").set_value(2)
    app.button(key="generate").click().run()
    again, provenance = app.session_state["grid"]
    assert [record["seed"] for record in provenance] == [10, 11, 12] and provenance[0]["sampling"]["steps"] == 2
    assert not np.array_equal(again, images)
    app.radio(key="prompt_mode").set_value("Findings").run()
    app.multiselect(key="findings").set_value(["Edema", "Cardiomegaly"]).run()
    assert "Impression: Edema. Cardiomegaly." in [caption.value for caption in app.caption]


def test_an_empty_prompt_is_a_message_not_a_traceback(monkeypatch, smoke_root):
    app = start(monkeypatch, smoke_root)
    app.text_area(key="prompt").input("   ")
    app.button(key="generate").click().run()
    assert not app.exception
    assert any("the prompt is empty" in message for message in errors(app))
    assert "grid" not in app.session_state


def test_a_generator_not_trained_yet_is_a_message_naming_its_checkpoint(monkeypatch, tmp_path):
    folder = layout.model_dir(tmp_path, "raygen", "raygen-unfinished") / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step-00000010.pt").write_bytes(b"")
    app = start(monkeypatch, tmp_path)
    assert "raygen: raygen-unfinished (not trained yet)" in app.selectbox(key="generate_generator").options
    app.text_area(key="prompt").input("Cardiomegaly.")
    app.button(key="generate").click().run()
    assert not app.exception
    assert any("raygen-unfinished is not trained yet" in message and "step-00000010.pt" in message
               for message in errors(app)), errors(app)


@pytest.mark.parametrize("name", PAGES)
def test_a_data_root_without_a_run_is_a_message_on_every_page(monkeypatch, tmp_path, name):
    app = on_page(start(monkeypatch, tmp_path), name)
    assert not app.exception
    expected = {"Generate": "no generator under", "Real vs generated": "no cohorts yet",
                "Dataset explorer": "no cohorts yet", "Results": "no MLflow store under this data root"}[name]
    assert any(expected in message for message in errors(app)), errors(app)
    assert list(tmp_path.iterdir()) == []  # looking wrote nothing there


def test_the_data_root_typed_in_the_sidebar_is_the_one_every_page_reads(monkeypatch, smoke_root, tmp_path):
    app = on_page(start(monkeypatch, smoke_root), "Results")
    assert not errors(app)
    app.sidebar.text_input(key="data_root").input(str(tmp_path)).run()
    assert any("no MLflow store under this data root" in message for message in errors(app)), errors(app)


def test_a_config_that_cannot_be_used_is_a_message(monkeypatch, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: x\n  colour: blue\n")
    monkeypatch.setattr(sys, "argv", ["app/main.py", "--config", str(bad)])
    app = AppTest.from_file(APP, default_timeout=60).run()
    assert not app.exception
    assert any("colour" in message for message in errors(app)), errors(app)


def test_real_vs_generated_shows_the_nearest_training_images_and_both_scores(monkeypatch, smoke_root):
    app = on_page(start(monkeypatch, smoke_root), "Real vs generated")
    app.button(key="compare").click().run()
    assert not app.exception and not errors(app), errors(app)
    dicom_id, real, generated, _, near, near_ids, distances, scores = app.session_state["comparison"]
    cohort = pq.read_table(layout.cohort_file(smoke_root, "generator")).to_pandas()
    assert cohort.set_index("dicom_id").loc[dicom_id, "split"] in ("validate", "test")
    assert set(near_ids) <= set(cohort.loc[cohort["split"] == "train", "dicom_id"])
    assert len(near) == 4 and list(distances) == sorted(distances)
    assert list(scores.columns) == ["real", "generated"] and list(scores.index) == list(PATHOLOGIES)
    assert ((scores >= 0) & (scores <= 1)).all().all()
    assert len(image_urls(app)) == 2 + 4


def test_the_explorer_filters_by_finding_and_split_and_exports_a_synthetic_set(monkeypatch, smoke_root, tmp_path):
    app = on_page(start(monkeypatch, smoke_root), "Dataset explorer")
    everything = int(app.metric[0].value)
    app.selectbox(key="cohort").set_value("classifier")
    app.selectbox(key="finding").set_value("Pleural Effusion")
    app.selectbox(key="split").set_value("train").run()
    assert not app.exception and not errors(app), errors(app)
    shown = app.dataframe[1].value
    assert 0 < len(shown) == int(app.metric[0].value)
    assert all("Pleural Effusion" in found for found in shown["findings"]) and set(shown["split"]) == {"train"}
    assert int(app.metric[0].value) != everything
    app.selectbox(key="export_format").set_value("mimic-cxr-jpg").run()
    dest = next(widget for widget in app.text_input if widget.label == "Export to")
    assert dest.value == str(layout.export_dir(smoke_root, app.selectbox(key="export_output").value, "mimic-cxr-jpg"))
    dest.input(str(tmp_path / "jpg"))
    app.button(key="export").click().run()
    assert [element.value for element in app.success] == [f"Wrote {tmp_path / 'jpg'}"]
    assert len(list((tmp_path / "jpg" / "files").rglob("*.jpg"))) == int(app.dataframe[3].value["images"].iloc[0])


def test_cohort_rows_match_the_cohort_files(smoke_root):
    classifier = pq.read_table(layout.cohort_file(smoke_root, "classifier")).to_pandas()
    rows = cohort_rows(smoke_root, "classifier", split="test", finding="Cardiomegaly")
    expected = classifier[(classifier["split"] == "test") & (classifier["cardiomegaly"] == 1)]
    assert set(rows["dicom_id"]) == set(expected["dicom_id"])
    counts = class_counts(cohort_rows(smoke_root, "classifier"))
    for name in PATHOLOGIES:
        column = name.lower().replace(" ", "_")
        assert counts.loc[name].sum() == (classifier[column] == 1).sum(), name
    generator = cohort_rows(smoke_root, "generator", view="AP")
    assert len(generator) == len(pq.read_table(layout.cohort_file(smoke_root, "generator")))
    assert generator["impression"].notna().all()
    every = rejects(smoke_root)
    reason = every["reason"].iloc[0]
    assert set(rejects(smoke_root, reason)["reason"]) == {reason} and len(every) > 0


def test_the_results_page_shows_auroc_by_ratio_and_the_generator_beside_its_reference(monkeypatch, smoke_root):
    app = on_page(start(monkeypatch, smoke_root), "Results")
    auroc, low_data = app.dataframe[0].value, app.dataframe[1].value  # one table per arm, the reference arm first
    assert list(auroc.columns) == ["0% synthetic", "50% synthetic", "100% synthetic"]
    assert list(low_data.columns) == ["0% synthetic", "100% synthetic"]
    assert list(auroc.index) == list(low_data.index) == [*PATHOLOGIES, "macro"]
    assert any("low-data-50" in element.value for element in app.markdown)
    measures = app.dataframe[2].value
    assert {"fid", "kid", "precision", "ms_ssim"} <= set(measures["measure"])
    assert any("#/experiments/" in element.value and "/runs/" in element.value for element in app.markdown)


def test_generator_measures_pair_each_measure_with_its_references():
    table = generator_measures({"generator/fid/space": 9.0, "generator/fid_real_reference/space": 1.0,
                                "generator/fid_tokenizer/space": 3.0, "generator/kid_by_class/Edema": 0.1,
                                "generator/ms_ssim": 0.4, "generator/ms_ssim_real_reference": 0.3})
    assert table[["measure", "space", "generated", "real reference"]].to_dict("records") == [
        {"measure": "fid", "space": "space", "generated": 9.0, "real reference": 1.0},
        {"measure": "ms_ssim", "space": "-", "generated": 0.4, "real reference": 0.3}]
    assert table["tokenizer"].iloc[0] == 3.0 and pd.isna(table["tokenizer"].iloc[1])


def test_augment_app_refuses_a_config_it_cannot_use_before_starting_anything(tmp_path, capsys):
    from commands.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: x\n  colour: blue\n")
    assert main(["app", "--config", str(bad)]) == 2
    assert "colour" in capsys.readouterr().err


def test_a_family_the_config_has_no_section_for_is_a_message_naming_it():
    from tasks.browse import BadInput
    from tasks.browse.generators import family_section
    from tasks.config import load_config

    config = load_config(SMOKE, [])
    assert config.diffusion is None and family_section(config, "raygen") is config.raygen
    with pytest.raises(BadInput, match="the config has no diffusion section"):
        family_section(config, "diffusion")
    with pytest.raises(BadInput, match="unknown generator family 'vae'"):
        family_section(config, "vae")
