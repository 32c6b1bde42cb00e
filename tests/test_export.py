"""A synthetic set exported as DICOM and in the MIMIC-CXR-JPG layout: marked synthetic, with its provenance and no
patient identifiers, read back by pydicom, by this project's own ingest (as a local mirror) and by
torchxrayvision's MIMIC_Dataset, with the right pixels and labels."""

import math

import numpy as np
import pydicom
import pandas as pd
import pytest
import torchxrayvision as xrv

from commands.cli import main
from tasks.data import catalog
from tasks.data.ingest import load_source_csvs, plan_image_units, plan_report_units
from tasks.data.ingest_images import ingest_shard
from tasks.data.mirror import check_mirror
from tasks.data.pixels import PixelStore
from tasks.data.reports import parse_reports
from tasks.export import export_set
from tasks.export.dicom import provenance, SYNTHETIC_MARKER
from tasks.export.tree import CSV_NAMES, PROVENANCE_CSV, synthetic_images
from tasks.generators.interface import GeneratedBatch
from tasks.generators.synthesis import synthesize
from tasks.generators.text import load_tokenizer
from tasks.layout import REPO_ROOT
from tasks.pathologies import column_name, PATHOLOGIES

RESOLUTION = 32
SAMPLING = {"steps": 4, "temperature": 1.0, "guidance_scale": 2.0}


class NoiseGenerator:
    generator_id, output_id, resolution, needs = "noise-v1", "noise-v1-abc", RESOLUTION, None

    def generate(self, prompts, seeds, conditions=None):
        images = np.stack([np.random.default_rng(seed).integers(0, 256, (RESOLUTION, RESOLUTION), dtype=np.uint8)
                           for seed in seeds])
        return GeneratedBatch(images, [{"generator_id": self.generator_id, "seed": seed, "sampling": SAMPLING}
                                       for seed in seeds])


def plan_row(position: int, positives: set[str], masked: set[str] = frozenset()) -> dict:
    labels = {column_name(name): (math.nan if name in masked else float(name in positives)) for name in PATHOLOGIES}
    return {"plan_position": position, "target": sorted(positives)[0], "source_study_id": 50_000_000 + position,
            "prompt": f"Impression {position}: {', '.join(sorted(positives))}.", **labels}


@pytest.fixture
def stored(tmp_path):
    """A data root holding five synthetic images of NoiseGenerator, with known labels."""
    root = tmp_path / "root"
    catalog.ensure_tables(root)
    rows = [plan_row(0, {"Edema"}), plan_row(1, {"Pneumothorax", "Fracture"}), plan_row(2, {"Cardiomegaly"}),
            plan_row(3, {"Pleural Effusion"}, masked={"Edema"}), plan_row(4, {"Atelectasis", "Pleural Effusion"})]
    synthesize(root, NoiseGenerator(), rows, batch_size=2, seed=0, progress=False)
    return root, rows


def test_dicom_files_are_marked_synthetic_carry_provenance_and_no_patient(stored, tmp_path):
    root, rows = stored
    items = synthetic_images(root, NoiseGenerator.output_id)
    dest = export_set(root, NoiseGenerator.output_id, "dicom", tmp_path / "dicom")
    files = sorted(dest.rglob("*.dcm"))
    assert len(files) == len(rows)
    by_synth = {item.synth_id: item for item in items}
    uids = set()
    for path in files:
        ds = pydicom.dcmread(path)
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert SYNTHETIC_MARKER in ds.ImageComments and ds.ConversionType == "SYN"
        assert ds.PatientName == "" and ds.PatientID == "" and ds.PatientIdentityRemoved == "YES"
        found = provenance(ds)
        item = by_synth[found["synth_id"]]
        assert found["generator_id"] == "noise-v1" and found["prompt"] == item.prompt
        assert found["seed"] == item.seed and '"guidance_scale": 2.0' in found["sampling"]
        np.testing.assert_array_equal(ds.pixel_array, item.image)
        uids |= {ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID}
    assert len(uids) == 3 * len(files)  # fresh for every file
    again = pydicom.dcmread(sorted(export_set(root, NoiseGenerator.output_id, "dicom", tmp_path / "again")
                                   .rglob("*.dcm"))[0])
    assert again.SOPInstanceUID not in uids  # and for every export


def test_a_file_without_the_private_block_is_refused_by_name():
    with pytest.raises(ValueError, match="CXR-AUGMENT SYNTHETIC"):
        provenance(pydicom.Dataset())


def test_the_dicom_export_reads_back_through_the_projects_ingest(stored, tmp_path):
    root, rows = stored
    dest = export_set(root, NoiseGenerator.output_id, "dicom", tmp_path / "dicom")
    items = {item.dicom_id: item for item in synthetic_images(root, NoiseGenerator.output_id)}
    mirror = check_mirror(dest, "mimic-cxr")
    other = tmp_path / "ingested"
    catalog.ensure_tables(other)
    counts = load_source_csvs(other, mirror)
    assert counts.rejected_rows == 0 and counts.metadata_rows == len(rows)
    for name, units in plan_image_units(other, mirror, 8):
        assert ingest_shard(other, name, units, RESOLUTION, "dcm").rejected == 0
    tokenizer = load_tokenizer("builtin:minilm")
    for name, units in plan_report_units(other, mirror, 8):
        parse_reports(other, units, 64, tokenizer, name)
    ids = sorted(items)
    np.testing.assert_array_equal(PixelStore(other, RESOLUTION).get_many(ids), np.stack([items[i].image for i in ids]))
    with catalog.connect(other) as con:
        impressions = dict(con.sql("SELECT study_id, impression FROM reports").fetchall())
        labels = con.sql("SELECT * FROM labels WHERE labeler = 'chexpert'").to_arrow_table().to_pylist()
    assert {impressions[item.study_id] for item in items.values()} == {row["prompt"] for row in rows}
    by_study = {item.study_id: item for item in items.values()}
    for row in labels:
        for name in PATHOLOGIES:
            expected = by_study[row["study_id"]].labels[name]
            got = row[column_name(name)]
            assert (got is None) if math.isnan(expected) else got == expected, (row["study_id"], name)


def test_the_mimic_jpg_export_loads_in_torchxrayvision_with_the_right_labels(stored, tmp_path):
    root, rows = stored
    dest = export_set(root, NoiseGenerator.output_id, "mimic-cxr-jpg", tmp_path / "jpg")
    items = {item.dicom_id: item for item in synthetic_images(root, NoiseGenerator.output_id)}
    dataset = xrv.datasets.MIMIC_Dataset(imgpath=str(dest / "files"), csvpath=str(dest / CSV_NAMES["chexpert"]),
                                         metacsvpath=str(dest / CSV_NAMES["metadata"]), views=["AP"],
                                         unique_patients=False)
    assert len(dataset) == len(rows)
    xrv_name = {name: "Effusion" if name == "Pleural Effusion" else name for name in PATHOLOGIES}
    for index in range(len(dataset)):
        item = items[dataset.csv.iloc[index]["dicom_id"]]
        for name in PATHOLOGIES:
            got = dataset.labels[index, dataset.pathologies.index(xrv_name[name])]
            expected = item.labels[name]
            assert (np.isnan(got) if math.isnan(expected) else got == expected), (item.synth_id, name)
        image = dataset[index]["img"][0]  # xrv's [-1024, 1024]
        back = (image + 1024) / 2048 * 255
        assert np.abs(back - item.image).mean() < 8  # JPEG at quality 95 on noise
    provenance_rows = pd.read_csv(dest / PROVENANCE_CSV)
    assert set(provenance_rows["dicom_id"]) == set(items)
    assert set(provenance_rows["prompt"]) == {row["prompt"] for row in rows}


def test_exporting_an_output_with_no_images_names_it(stored, tmp_path):
    root, _ = stored
    with pytest.raises(ValueError, match="no synthetic images of 'missing-output'"):
        export_set(root, "missing-output", "dicom", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown export format 'png'"):
        export_set(root, NoiseGenerator.output_id, "png", tmp_path / "x")


def test_the_command_line_exports_a_set_and_names_a_missing_one(stored, tmp_path, capsys):
    root, rows = stored
    smoke = str(REPO_ROOT / "configs" / "smoke.yaml")
    common = ["export", "--config", smoke, "--set", f"run.data_root={root}", "--format", "dicom"]
    assert main([*common, "--output-id", NoiseGenerator.output_id, "--dest", str(tmp_path / "cli")]) == 0
    assert len(list((tmp_path / "cli").rglob("*.dcm"))) == len(rows)
    assert main([*common, "--output-id", "nothing-here"]) == 2
    assert "no synthetic images of 'nothing-here'" in capsys.readouterr().err
