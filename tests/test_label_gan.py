"""The label-conditioned GAN: the networks, the hinge losses, training with exact resume, and the family behind
ImageGenerator on a tiny cohort."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddp import run_two_ranks
from family_cohort import cohort_labels, RESOLUTION, write_family_cohort
from models.label_gan import (discriminator_hinge_loss, generator_hinge_loss, LabelGAN, LabelGANConfig,
                              latent_noise)
from tasks.config import GANSection, TextSection, VQGANSection
from tasks.generators import families
from tasks.generators.conditions import study_conditions
from tasks.generators.interface import Conditions
from tasks.generators.gan.training import train_gan
from tasks.generators.training import FitInputs, TensorRows
from tasks.pathologies import PATHOLOGIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def tiny_config(**overrides) -> LabelGANConfig:
    return LabelGANConfig(**(dict(resolution=RESOLUTION, n_labels=10, z_dim=8, channels=32, base=4) | overrides))


def section(**overrides) -> GANSection:
    values = dict(z_dim=8, channels=32, base=4, steps=8, batch_size=8, checkpoint_every=4, device="cpu")
    return GANSection(**(values | overrides))


def labels(batch: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand(batch, 10, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


def test_shapes_and_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LabelGAN(tiny_config()).eval()
    z = latent_noise(8, [torch.Generator().manual_seed(s) for s in range(3)], CPU)
    images = model.generator(z, labels(3))
    assert images.shape == (3, 1, RESOLUTION, RESOLUTION) and images.abs().max() <= 1
    assert model.discriminator(images, labels(3)).shape == (3,)
    model.save_pretrained(tmp_path)
    loaded = LabelGAN.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.generator(z, labels(3)), images, rtol=0, atol=0)
    torch.testing.assert_close(loaded.discriminator(images, labels(3)), model.discriminator(images, labels(3)),
                               rtol=0, atol=0)


def test_config_needs_a_power_of_two_above_base():
    with pytest.raises(ValueError, match="power of 2"):
        tiny_config(resolution=24)
    assert tiny_config(resolution=64, channels=64).level_channels() == [64, 32, 16, 16, 16]


def test_spectral_norm_bounds_every_discriminator_weight():
    torch.manual_seed(0)
    model = LabelGAN(tiny_config())
    for _ in range(3):  # power iterations run in training-mode forwards
        model.discriminator(torch.randn(4, 1, RESOLUTION, RESOLUTION), labels(4))
    parametrized = [m for m in model.discriminator.modules() if hasattr(m, "parametrizations")]
    assert len(parametrized) == 3 * len(model.discriminator.blocks) + 2
    linear = model.discriminator.psi
    assert torch.linalg.matrix_norm(linear.weight, ord=2) < 1.05


def test_hinge_losses():
    assert discriminator_hinge_loss(torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])).item() == pytest.approx(0.75)
    assert generator_hinge_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)


def test_labels_and_noise_each_change_the_image():
    torch.manual_seed(0)
    model = LabelGAN(tiny_config())
    with torch.no_grad():  # conditional BatchNorm starts as plain BatchNorm: give the label weights a value
        for module in model.generator.modules():
            if hasattr(module, "gain"):
                module.gain.weight.normal_(0, 0.5)
    model.eval()
    z = latent_noise(8, [torch.Generator().manual_seed(0)] * 2, CPU)
    one, other = labels(2, seed=3)[:1].repeat(2, 1), labels(2, seed=4)[:1].repeat(2, 1)
    assert not torch.allclose(model.generator(z, one), model.generator(z, other))
    z2 = latent_noise(8, [torch.Generator().manual_seed(s) for s in (0, 1)], CPU)
    images = model.generator(z2, one)
    assert not torch.allclose(images[0], images[1])


def synthetic_rows(rows: int, seed: int) -> TensorRows:
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(rows, 10, generator=g) > 0.5).float()
    images = (y[:, :1, None] * 150 + 50 + 10 * torch.randn(rows, RESOLUTION, RESOLUTION, generator=g)).clamp(0, 255)
    return TensorRows(images.to(torch.uint8), y)


def test_resume_is_bit_identical(tmp_path):
    config, train = tiny_config(), synthetic_rows(24, 0)  # 3 steps an epoch: the resume lands mid-epoch
    settings = section(d_steps=2)
    whole = train_gan(settings, config, train, tmp_path / "whole")
    first = train_gan(settings, config, train, tmp_path / "split", max_steps=5)
    assert (first.step, first.final_dir) == (5, None) and first.checkpoint.name == "step-00000005.pt"
    second = train_gan(settings, config, train, tmp_path / "split")
    assert second.step == whole.step == 8
    a = LabelGAN.from_pretrained(tmp_path / "whole/final").state_dict()
    b = LabelGAN.from_pretrained(tmp_path / "split/final").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    with pytest.raises(ValueError, match="data order"):
        train_gan(section(d_steps=1), config, train, tmp_path / "split")


def _ddp_worker(rank: int, out_dir: str) -> None:
    import tasks.generators.gan.training as gan_training

    models, calls = [], []

    class Recorded(LabelGAN):  # the rank's own model, not the file rank 0 writes
        def __init__(self, config):
            super().__init__(config)
            models.append(self)

    gan_training.LabelGAN = Recorded
    gan_training.train_gan(section(steps=4, d_steps=2), tiny_config(), synthetic_rows(32, rank), Path(out_dir),
                           on_eval=lambda step, metrics: calls.append(step))
    assert calls == ([4] if rank == 0 else [])  # only rank 0 calls back and writes
    torch.save(dict(models[0].named_parameters()), Path(out_dir) / f"rank-{rank}.pt")


def test_ddp_keeps_the_two_ranks_one_model(tmp_path):
    # Each rank has other rows; only the averaged gradients keep their parameters equal.
    run_two_ranks(_ddp_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank-{rank}.pt", weights_only=True) for rank in range(2)]
    torch.manual_seed(section().seed)  # the weights train_gan starts from
    initial = dict(LabelGAN(tiny_config()).named_parameters())
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
    assert any(not torch.equal(ranks[0][name], initial[name]) for name in initial)
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*.pt")] == ["step-00000004.pt"]
    assert (tmp_path / "final").is_dir()


def test_fit_lowers_the_discriminator_loss_and_the_family_generates(tmp_path):
    write_family_cohort(tmp_path)
    evals = {}
    inputs = FitInputs(data_root=tmp_path, resolution=RESOLUTION, vqgan=None, vqgan_id="unused",
                       encoder_id="unused", text_dim=8, max_text_tokens=8)
    settings = section(steps=60, batch_size=16, checkpoint_every=20, g_lr=1e-3, d_lr=1e-3)
    generator_id, result = families.fit("gan", settings, inputs,
                                        on_eval=lambda step, metrics: evals.update({step: metrics}))
    assert generator_id.startswith("gan-") and result.step == 60 and sorted(evals) == [20, 40, 60]
    # GAN losses do not fall steadily; the discriminator's is below that of one that knows nothing (2) ...
    assert evals[60]["train/d_loss"] < evals[20]["train/d_loss"] < 2.0

    generator = families.load("gan", tmp_path, generator_id, settings, RESOLUTION, VQGANSection(), TextSection())
    # ... and the generator has learned what a label means: the cohort draws cardiomegaly as a bright heart.
    heart = np.zeros((32, 10), np.float32)
    heart[:16, PATHOLOGIES.index("Cardiomegaly")] = 1
    drawn = generator.generate(["x"] * 32, list(range(32)), Conditions(labels=heart)).images[:, 5:11, 5:11]
    assert drawn[:16].mean() > drawn[16:].mean() + 30
    study_ids, _ = cohort_labels(tmp_path, "validate")
    conditions = study_conditions(tmp_path, study_ids[:3])
    batch = generator.generate(["x", "y", "z"], [4, 5, 6], conditions)
    assert batch.images.dtype == np.uint8 and batch.images.shape == (3, RESOLUTION, RESOLUTION)
    assert batch.provenance[1] == {"generator_id": generator_id, "seed": 5, "labels": conditions.labels[1].tolist()}
    assert np.array_equal(generator.generate(["x", "y", "z"], [4, 5, 6], conditions).images, batch.images)
    assert generator.output_id.startswith(generator_id + "-")
    with pytest.raises(ValueError, match="conditioned on labels"):
        generator.generate(["x"], [0])
    with pytest.raises(ValueError, match="rows of conditions"):
        generator.generate(["x"], [0], conditions)
