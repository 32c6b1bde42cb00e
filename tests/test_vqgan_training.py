"""tasks.generators.vqgan.training: the tokenizer trained on the cohort (learns, keeps its codebook alive, skips,
resumes exactly) or loaded from a configured UniXGen-layout checkpoint. Tiny: 32 px, 16x16 tokens, 32 codes,
40 images."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from models.patch_discriminator import PatchDiscriminator
from models.vqgan import VQGAN
from tasks import layout
from tasks.config import Config, ConfigError
from tasks.data import catalog
from tasks.data.pixels import PixelStore, write_shard
from tasks.generators.vqgan import training as vqgan_training
from tasks.generators.vqgan.training import (
    cohort_split_ids, evaluate_vqgan, prepare_vqgan, train_vqgan, trained_vqgan_id, vqgan_config,
)
from test_vqgan import blobs, tiny_model, write_unixgen_checkpoint

TRAIN, VALIDATE = 30, 10
TINY_VQGAN = dict(
    ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=16, embed_dim=16, n_embed=32,
    dead_code_restart_after=4, steps=24, batch_size=4, lr=1e-3, disc_start=16, disc_layers=2, checkpoint_every=8,
    eval_images=VALIDATE, encode_batch_size=8,
)


def prepare(config: Config) -> vqgan_training.PreparedVQGAN:
    return prepare_vqgan(config.run.data_root, config.vqgan, config.ingest.resolution, "cpu")


def vqgan_id(config: Config, train_ids: list[str]) -> str:
    return trained_vqgan_id(config.vqgan, config.ingest.resolution, train_ids)


def make_data_root(root: Path, resolution: int) -> Path:
    """40 blob images at `resolution` px in one pixel shard, and a generator cohort: 30 train, 10 validate."""
    ids = [f"dicom-{index:02d}" for index in range(TRAIN + VALIDATE)]
    images = ((blobs(len(ids), size=resolution, seed=1)[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    write_shard(root, resolution, "images-a", images)
    catalog.write_part(root, "pixels", "images-a", [
        {"dicom_id": dicom_id, "resolution": resolution, "shard": "images-a", "shard_row": row}
        for row, dicom_id in enumerate(ids)
    ])
    layout.cohorts_dir(root).mkdir(parents=True)
    splits = ["train"] * TRAIN + ["validate"] * VALIDATE
    pq.write_table(pa.table({
        "dicom_id": ids, "subject_id": list(range(len(ids))), "study_id": list(range(len(ids))),
        "split": splits, "impression": ["No acute process."] * len(ids),
    }), layout.cohorts_dir(root) / "generator.parquet")
    # The VQ-GAN learns from the classifier cohort's training images: here the same films (the ids are what counts).
    pq.write_table(pa.table({"dicom_id": ids, "split": splits}), layout.cohorts_dir(root) / "classifier.parquet")
    return root


def make_config(root: Path, resolution: int = 32, **vqgan) -> Config:
    return Config.model_validate({
        "run": {"name": "test", "data_root": str(root)},
        "source": {"kind": "demo", "studies": 1},
        "ingest": {"resolution": resolution},
        "vqgan": {**TINY_VQGAN, **vqgan},
    })


def weights(model: VQGAN) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted training run, with the untrained model's scores on the same held-out images."""
    config = make_config(make_data_root(tmp_path_factory.mktemp("trained"), 32))
    torch.manual_seed(0)
    untrained = VQGAN(vqgan_config(config.vqgan, 32))
    held_out = PixelStore(config.run.data_root, 32).get_many(cohort_split_ids(config.run.data_root, "generator", "validate"))
    before = evaluate_vqgan(untrained, held_out, 8, torch.device("cpu"))
    return config, prepare(config), before


def test_training_lowers_held_out_error_and_keeps_the_codebook_in_use(trained):
    config, prepared, before = trained
    metrics = prepared.metrics
    assert metrics["val/mse"] < 0.5 * before["mse"]
    assert metrics["val/ssim"] > before["ssim"] + 0.2
    # 2560 held-out tokens over 32 codes. Without dead-code restarts this run ends with 7 codes in use (perplexity
    # 2.8); with them, 31 (perplexity 20).
    assert metrics["val/codebook_used"] >= 0.75 and metrics["val/perplexity"] >= 12
    folder = layout.model_dir(config.run.data_root, "vqgan", prepared.vqgan_id)
    assert (folder / "final" / "model.safetensors").is_file() and (folder / "final" / "config.json").is_file()
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["step-00000024.pt"]
    assert not prepared.model.training and prepared.model.config.latent_resolution == 16


def test_a_second_call_skips_training_and_returns_the_same_model(trained, monkeypatch):
    config, first, _ = trained

    def not_again(*args, **kwargs):
        raise AssertionError("trained or measured again although the model and its held-out metrics exist")

    monkeypatch.setattr(vqgan_training, "train_vqgan", not_again)
    monkeypatch.setattr(vqgan_training, "evaluate_vqgan", not_again)
    second = prepare(config)
    assert second.vqgan_id == first.vqgan_id
    assert second.metrics == first.metrics
    for key, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], value), key


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_weights(trained, tmp_path):
    reference_config, reference, _ = trained
    config = make_config(make_data_root(tmp_path, 32))
    root = config.run.data_root
    train_ids = cohort_split_ids(root, "classifier", "train")
    assert vqgan_id(config, train_ids) == reference.vqgan_id  # the data root is not part of the id
    out_dir = layout.model_dir(root, "vqgan", reference.vqgan_id)
    pixels = PixelStore(root, 32)
    # Stopped at 20: after a checkpoint at 16, past the discriminator's start at 16 and several code restarts.
    first = train_vqgan(config.vqgan, 32, pixels, train_ids, out_dir, torch.device("cpu"), max_steps=20)
    assert (first.resumed_from, first.step) == (0, 20)
    assert not (out_dir / "final").exists()
    assert [p.name for p in (out_dir / "checkpoints").iterdir()] == ["step-00000020.pt"]
    second = train_vqgan(config.vqgan, 32, pixels, train_ids, out_dir, torch.device("cpu"))
    assert (second.resumed_from, second.step) == (20, 24)
    resumed = VQGAN.from_pretrained(out_dir / "final")
    for key, value in reference.model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_the_discriminator_features_end_in_the_logits_it_judges_by():
    disc = PatchDiscriminator(1, 8, 2).eval()
    images = torch.randn(2, 1, 32, 32)
    features, logits = disc.features(images)
    assert len(features) == 3  # the stem and each of the 2 layers
    assert [f.shape[1] for f in features] == [8, 16, 32]
    assert torch.equal(logits, disc(images))


def _discriminator_steps_3_and_6(tmp_path: Path, **vqgan) -> tuple[dict, dict]:
    """The discriminator's weights after steps 3 and 6 of a run whose adversarial term starts after step 6."""
    config = make_config(make_data_root(tmp_path, 32), steps=6, checkpoint_every=3, disc_start=100, **vqgan)
    root, out_dir = config.run.data_root, tmp_path / "vqgan"
    args = (config.vqgan, 32, PixelStore(root, 32), cohort_split_ids(root, "classifier", "train"), out_dir,
            torch.device("cpu"))
    states = []
    for stop in (3, 6):
        train_vqgan(*args, max_steps=stop)
        states.append(torch.load(out_dir / "checkpoints" / f"step-{stop:08d}.pt", weights_only=True)["disc"])
    return states[0], states[1]


def test_feature_matching_trains_the_discriminator_from_the_first_step(tmp_path):
    # Before disc_start the adversarial term is off; the feature-matching term needs a discriminator that has
    # learned what real images look like, so with it the discriminator trains from step 0, and only then.
    weight = "main.0.weight"
    at_3, at_6 = _discriminator_steps_3_and_6(tmp_path / "without")
    assert torch.equal(at_3[weight], at_6[weight])
    at_3, at_6 = _discriminator_steps_3_and_6(tmp_path / "with", feature_weight=1.0)
    assert not torch.allclose(at_3[weight], at_6[weight])


def test_feature_matching_changes_the_weights_and_is_part_of_the_vqgan_id(tmp_path):
    ids = [f"dicom-{index}" for index in range(5)]
    assert vqgan_id(make_config(tmp_path, feature_weight=1.0), ids) != vqgan_id(make_config(tmp_path), ids)


def test_vqgan_id_follows_the_training_inputs_only(tmp_path):
    config = make_config(tmp_path)
    ids = [f"dicom-{index}" for index in range(5)]
    base = vqgan_id(config, ids)
    assert vqgan_id(config, list(reversed(ids))) == base
    assert vqgan_id(make_config(tmp_path, encode_batch_size=3, eval_images=2, checkpoint_every=7), ids) == base
    assert vqgan_id(config, ids[:4]) != base
    assert vqgan_id(make_config(tmp_path, n_embed=64), ids) != base
    assert vqgan_id(make_config(tmp_path, resolution=64), ids) != base


def test_a_configured_unixgen_checkpoint_is_loaded_and_keyed_by_its_file(tmp_path):
    source = tiny_model(channels=3)  # 16 px, 8x8 tokens, 64 codes, RGB like UniXGen's
    (tmp_path / "ckpt").mkdir()
    ckpt, yaml_path = write_unixgen_checkpoint(tmp_path / "ckpt", source)
    config = make_config(make_data_root(tmp_path / "data", 16), resolution=16, checkpoint=str(ckpt),
                         checkpoint_yaml=str(yaml_path))
    prepared = prepare(config)
    assert prepared.vqgan_id == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:12]
    for key, value in source.state_dict().items():
        assert torch.equal(prepared.model.state_dict()[key], value), key
    # Nothing trained: only the metrics kept.
    trained_here = layout.model_dir(config.run.data_root, "vqgan", prepared.vqgan_id)
    assert [path.name for path in trained_here.iterdir()] == ["held_out_metrics.json"]
    assert 0 < prepared.metrics["val/mse"] < 1 and -1 <= prepared.metrics["val/ssim"] <= 1
    assert 1 <= prepared.metrics["val/perplexity"] <= 64


def test_a_vqgan_trained_here_can_be_pinned_in_the_config(trained, tmp_path, monkeypatch):
    # What a nightly deployment does so that new studies no longer retrain the tokenizer (docs/OPERATIONS.md).
    reference_config, reference, _ = trained
    folder = layout.model_dir(reference_config.run.data_root, "vqgan", reference.vqgan_id) / "final"
    grown = make_config(make_data_root(tmp_path / "next-night", 32), checkpoint=str(folder))
    monkeypatch.setattr(vqgan_training, "train_vqgan", lambda *args, **kwargs: pytest.fail("trained again"))
    pinned = prepare(grown)
    assert pinned.vqgan_id == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:12]
    for key, value in reference.model.state_dict().items():
        assert torch.equal(pinned.model.state_dict()[key], value), key
    with pytest.raises(ConfigError, match=r"vqgan\.checkpoint .*32 px but ingest\.resolution is 64"):
        prepare(make_config(tmp_path / "other", resolution=64, checkpoint=str(folder)))


def test_a_pinned_folder_must_hold_a_trained_vqgan(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"folder .*empty has no config\.json or model\.safetensors"):
        make_config(tmp_path, checkpoint=str(tmp_path / "empty"))
    yaml_path = tmp_path / "project.yaml"
    yaml_path.write_text("model: {}\n")
    (tmp_path / "trained").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "trained" / name).write_text("{}")
    with pytest.raises(ValueError, match=r"vqgan\.checkpoint_yaml: a VQ-GAN folder carries its config"):
        make_config(tmp_path, checkpoint=str(tmp_path / "trained"), checkpoint_yaml=str(yaml_path))


def test_a_checkpoint_at_another_resolution_is_a_clear_error(tmp_path):
    ckpt, yaml_path = write_unixgen_checkpoint(tmp_path, tiny_model(channels=3))
    config = make_config(make_data_root(tmp_path / "data", 32), checkpoint=str(ckpt), checkpoint_yaml=str(yaml_path))
    with pytest.raises(ConfigError, match=r"vqgan\.checkpoint_yaml .*16 px but ingest\.resolution is 32"):
        prepare(config)


def test_a_missing_cohort_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cohorts/classifier\.parquet: no classifier cohort"):
        prepare(make_config(tmp_path))
