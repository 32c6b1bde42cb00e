"""Latent diffusion: the model (diffusers' UNet + condition projector), its training with exact resume, and the
family behind ImageGenerator on a tiny cohort, in pixel and VQ-GAN latent space; the families registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ddp import run_two_ranks
from family_cohort import cohort_labels, fit_inputs as inputs, RESOLUTION, TEXT_DIM, WordEncoder, write_family_cohort
from models.densenet import build_densenet, save_densenet
from models.latent_diffusion import diffusion_loss, LatentDiffusion, LatentDiffusionConfig, noise_scheduler, sample
from tasks.browse import BadInput
from tasks.browse.generators import findings_conditions, generate_grid, open_generator
from tasks.config import Config, DiffusionSection
from tasks.generators import families
from tasks.generators.conditions import ImageEncoder, study_conditions
from tasks.generators.diffusion.generator import Conditioner, DiffusionImageGenerator, fit_diffusion
from tasks.generators.diffusion.training import train_diffusion
from tasks.generators.interface import Conditions
from tasks.generators.training import TensorRows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENS = {"text": 5, "image": 2, "labels": 10}
COND_DIM = {"text": TEXT_DIM, "image": 12, "labels": 10}


def tiny_config(conditioning: str = "labels", **overrides) -> LatentDiffusionConfig:
    values = dict(conditioning=conditioning, sample_size=8, channels=1, cond_dim=COND_DIM[conditioning],
                  max_cond_tokens=TOKENS[conditioning], block_channels=(16, 32), layers_per_block=1, cross_dim=16,
                  head_dim=8, train_timesteps=50, prediction="epsilon", latent_scale=1.0, clip_sample=True)
    return LatentDiffusionConfig(**(values | overrides))


def condition(conditioning: str, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if conditioning == "labels":
        values = (torch.rand(batch, 10, generator=g) > 0.5).float()
    elif conditioning == "text":
        values = torch.randn(batch, TOKENS["text"], TEXT_DIM, generator=g)
    else:
        values = torch.randn(batch, COND_DIM["image"], generator=g)
    mask = torch.ones(batch, TOKENS[conditioning], dtype=torch.bool)
    if conditioning == "text":
        mask[1, 3:] = False  # a shorter text
    return values, mask


def section(**overrides) -> DiffusionSection:
    values = dict(conditioning="labels", latent="pixels", block_channels=[16, 32], cross_dim=16, head_dim=8,
                  train_timesteps=50, steps=8, batch_size=8, lr=2e-3, warmup_steps=2, checkpoint_every=4,
                  device="cpu", sampling={"scheduler": "ddim", "steps": 5, "guidance_scale": 2.0, "eta": 1.0})
    return DiffusionSection(**(values | overrides))


def seeds(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in range(n)]


@pytest.mark.parametrize("conditioning", ["text", "image", "labels"])
def test_shapes_and_save_load_round_trip(tmp_path, conditioning):
    torch.manual_seed(0)
    model = LatentDiffusion(tiny_config(conditioning)).eval()
    values, mask = condition(conditioning)
    noisy, timesteps = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 49])
    out = model(noisy, timesteps, values, mask)
    assert out.shape == (3, 1, 8, 8)
    model.save_pretrained(tmp_path)
    loaded = LatentDiffusion.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(noisy, timesteps, values, mask), out, rtol=0, atol=0)


def test_config_checks_its_shape():
    with pytest.raises(ValueError, match="head_dim"):
        tiny_config(block_channels=(12, 32))
    with pytest.raises(ValueError, match="halve"):
        tiny_config(sample_size=7)


def test_sampling_is_deterministic_per_seed_and_independent_of_the_batch():
    torch.manual_seed(0)
    model = LatentDiffusion(tiny_config()).eval()
    values, mask = condition("labels")
    kwargs = dict(scheduler="ddim", steps=5, guidance_scale=2.0, eta=1.0)  # eta 1: noise drawn at every step
    first = sample(model, values, mask, seeds(3), **kwargs)
    assert first.shape == (3, 1, 8, 8)
    torch.testing.assert_close(sample(model, values, mask, seeds(3), **kwargs), first, rtol=0, atol=0)
    alone = sample(model, values[2:], mask[2:], [torch.Generator().manual_seed(2)], **kwargs)
    torch.testing.assert_close(alone[0], first[2], rtol=0, atol=1e-4)
    other_seeds = sample(model, values, mask, [torch.Generator().manual_seed(s) for s in (7, 8, 9)], **kwargs)
    assert not torch.allclose(other_seeds, first)


def test_guidance_and_the_condition_change_the_output():
    torch.manual_seed(0)
    model = LatentDiffusion(tiny_config()).eval()
    values, mask = condition("labels")
    kwargs = dict(scheduler="ddim", steps=4, eta=0.0)
    conditional = sample(model, values, mask, seeds(3), guidance_scale=1.0, **kwargs)
    guided = sample(model, values, mask, seeds(3), guidance_scale=3.0, **kwargs)
    unconditional = sample(model, values, mask, seeds(3), guidance_scale=0.0, **kwargs)
    assert not torch.allclose(guided, conditional) and not torch.allclose(conditional, unconditional)
    # Guidance 0 is the null condition: whatever the labels say.
    torch.testing.assert_close(sample(model, 1 - values, mask, seeds(3), guidance_scale=0.0, **kwargs),
                               unconditional, rtol=0, atol=1e-5)


class Oracle(torch.nn.Module):
    """A denoiser that knows the clean sample x0: it returns the exact noise or v of its input, as its config's
    prediction asks."""

    def __init__(self, config: LatentDiffusionConfig, x0: torch.Tensor):
        super().__init__()
        self.config, self.x0 = config, x0
        self.alphas = noise_scheduler(config).alphas_cumprod

    def forward(self, noisy, timesteps, values, mask):
        a = self.alphas[timesteps.long()].view(-1, 1, 1, 1)
        x0 = self.x0.repeat(len(noisy) // len(self.x0), 1, 1, 1)  # guidance stacks the batch twice
        noise = (noisy - a.sqrt() * x0) / (1 - a).sqrt()
        return noise if self.config.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_loss_and_the_sampler_agree_on_what_is_predicted(prediction):
    config = tiny_config(prediction=prediction, clip_sample=False, latent_scale=2.0)
    x0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    oracle = Oracle(config, x0)
    values, mask = condition("labels")
    # The exact prediction has no loss, and DDIM without noise walks from pure noise to the clean sample.
    assert diffusion_loss(oracle, noise_scheduler(config), x0, values, mask, torch.Generator().manual_seed(1),
                          0.0).item() < 1e-8
    drawn = sample(oracle, values, mask, seeds(3), scheduler="ddim", steps=10, guidance_scale=2.0, eta=0.0)
    torch.testing.assert_close(drawn, x0 / config.latent_scale, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="prediction"):
        tiny_config(prediction="sample")


def test_ddpm_walks_every_training_timestep(monkeypatch):
    torch.manual_seed(0)
    model = LatentDiffusion(tiny_config()).eval()
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *args: calls.append(1) or forward(*args))
    values, mask = condition("labels", batch=1)
    sample(model, values, mask, seeds(1), scheduler="ddpm", steps=5, guidance_scale=1.0, eta=0.0)
    assert len(calls) == 50


def synthetic_rows(rows: int, seed: int) -> TensorRows:
    """Images whose brightness follows label 0, so a model learns something in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(rows, 10, generator=g) > 0.5).float()
    x0 = (labels[:, :1, None, None] * 1.2 - 0.6) + 0.1 * torch.randn(rows, 1, 8, 8, generator=g)
    return TensorRows(x0, labels, torch.ones(rows, 10, dtype=torch.bool))


def test_resume_is_bit_identical(tmp_path):
    config, train, val = tiny_config(), synthetic_rows(24, 0), synthetic_rows(8, 1)  # 3 steps an epoch
    whole = train_diffusion(section(), config, train, val, tmp_path / "whole")
    first = train_diffusion(section(), config, train, val, tmp_path / "split", max_steps=5)
    assert (first.step, first.final_dir) == (5, None) and first.checkpoint.name == "step-00000005.pt"
    second = train_diffusion(section(), config, train, val, tmp_path / "split")
    assert second.step == whole.step == 8 and second.metrics["val/loss"] == whole.metrics["val/loss"]
    a = LatentDiffusion.from_pretrained(tmp_path / "whole/final").state_dict()
    b = LatentDiffusion.from_pretrained(tmp_path / "split/final").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    with pytest.raises(ValueError, match="data order"):
        train_diffusion(section(batch_size=4), config, train, val, tmp_path / "split")


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_training_lowers_the_loss_and_learns_from_the_condition(tmp_path, prediction):
    evals = {}
    train_diffusion(section(steps=60, checkpoint_every=10, batch_size=16, prediction=prediction),
                    tiny_config(prediction=prediction), synthetic_rows(64, 0),
                    synthetic_rows(16, 1), tmp_path, on_eval=lambda step, metrics: evals.update({step: metrics}))
    assert sorted(evals) == [10, 20, 30, 40, 50, 60]
    losses = [evals[step]["val/loss"] for step in sorted(evals)]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))  # it falls at every evaluation
    if prediction == "epsilon":  # v's loss starts lower (its high-noise targets are easy) and falls less
        assert losses[-1] < 0.8 * losses[0]
    assert evals[60]["train/loss"] < evals[10]["train/loss"]
    assert set(evals[60]) == {"val/loss", "val/loss_null_condition", "val/condition_gain", "train/loss", "lr"}


def test_the_loss_sees_the_null_condition_at_the_dropout_rate():
    torch.manual_seed(0)
    model = LatentDiffusion(tiny_config())
    values, mask = condition("labels", batch=4)
    x0, scheduler = torch.randn(4, 1, 8, 8), noise_scheduler(model.config)
    losses = [diffusion_loss(model, scheduler, x0, v, mask, torch.Generator().manual_seed(0), 1.0).item()
              for v in (values, 1 - values)]
    assert losses[0] == losses[1]  # every condition dropped: the labels cannot matter


@pytest.fixture
def root(tmp_path) -> Path:
    write_family_cohort(tmp_path)
    return tmp_path


def test_labels_in_pixel_space_fit_load_and_generate(root):
    settings = section(block_channels=[16, 32, 32], steps=12, checkpoint_every=6)
    evals = {}
    generator_id, result = families.fit("diffusion", settings, inputs(root),
                                        on_eval=lambda step, metrics: evals.update({step: metrics}))
    assert generator_id.startswith("diffusion-") and families.family_of(generator_id) == "diffusion"
    assert result.step == 12 and sorted(evals) == [6, 12]
    assert families.fit("diffusion", settings, inputs(root))[0] == generator_id  # trained: kept, same id

    config = Config.model_validate({"run": {"name": "t", "data_root": str(root)}, "source": {"kind": "demo",
                                    "studies": 4}, "ingest": {"resolution": RESOLUTION}, "diffusion": settings})
    generator = families.load("diffusion", root, generator_id, families.section(config, "diffusion"), RESOLUTION,
                              config.vqgan, config.text)
    study_ids, labels = cohort_labels(root, "validate")
    conditions = study_conditions(root, study_ids[:4])
    batch = generator.generate(["a", "b", "c", "d"], [0, 1, 2, 3], conditions)
    assert batch.images.dtype == np.uint8 and batch.images.shape == (4, RESOLUTION, RESOLUTION)
    assert [record["seed"] for record in batch.provenance] == [0, 1, 2, 3]
    assert batch.provenance[0]["generator_id"] == generator_id and batch.provenance[0]["conditioning"] == "labels"
    assert np.array_equal(generator.generate(["a", "b", "c", "d"], [0, 1, 2, 3], conditions).images, batch.images)
    assert getattr(generator, "reconstruct", None) is None  # no tokenizer in pixel space
    assert generator.output_id.startswith(generator_id + "-")
    with pytest.raises(ValueError, match="conditioned on labels"):
        generator.generate(["a"], [0])

    # The app opens it as synthesis does and draws a grid from the labels of the findings picked.
    opened = open_generator(config, root, "diffusion", generator_id, families.section(config, "diffusion"))
    picked = findings_conditions(["Cardiomegaly"])
    assert opened.needs == "labels" and picked.labels.sum() == 1
    images, provenance = generate_grid(opened, "Cardiomegaly.", [0, 1], picked)
    both = Conditions(labels=np.repeat(picked.labels, 2, axis=0))
    np.testing.assert_array_equal(images, generator.generate(["Cardiomegaly."] * 2, [0, 1], both).images)
    assert [record["prompt"] for record in provenance] == ["Cardiomegaly."] * 2
    with pytest.raises(BadInput, match="draws from labels, not from the prompt's text: pick findings"):
        generate_grid(opened, "Cardiomegaly.", [0])
    with pytest.raises(BadInput, match="unknown findings"):
        findings_conditions(["Cardiomegally"])


def test_text_on_vqgan_latents_and_image_variations(root, tmp_path):
    vq_inputs = inputs(root)
    text_id, result = fit_diffusion(section(conditioning="text", latent="vqgan", steps=4), vq_inputs)
    assert result.final_dir is not None
    model = LatentDiffusion.from_pretrained(result.final_dir)
    assert (model.config.channels, model.config.sample_size, model.config.clip_sample) == (4, 8, False)
    assert model.config.latent_scale != 1.0
    generator = DiffusionImageGenerator(text_id, model, Conditioner(model.config, text_encoder=WordEncoder()),
                                        section().sampling, vq_inputs.vqgan, RESOLUTION)
    batch = generator.generate(["cardiomegaly", "no acute findings"], [5, 5])
    assert batch.images.shape == (2, RESOLUTION, RESOLUTION)
    assert not np.array_equal(batch.images[0], batch.images[1])  # same seed, other text
    real = study_conditions(root, cohort_labels(root, "validate")[0][:2], RESOLUTION).references
    assert generator.reconstruct(real).shape == real.shape

    encoder_dir = tmp_path / "classifier"
    save_densenet(build_densenet(10), encoder_dir, {"config": {"image_size": 32}})
    image_id, _ = fit_diffusion(section(conditioning="image", image_encoder=encoder_dir, steps=2,
                                        checkpoint_every=2), vq_inputs)
    assert image_id.startswith("diffusion-") and image_id != text_id
    with pytest.raises(ValidationError, match="image_encoder"):
        section(conditioning="image")


def test_image_variations_from_a_local_vision_backbone(root, tiny_rad_dino, tmp_path):
    """Image mode with a pretrained backbone given as a local Hugging Face folder (a tiny DINOv2 standing in for
    RAD-DINO): its pooled output embeds the reference, prepared as the folder's processor prepares images."""
    from transformers import AutoModel, BitImageProcessor

    encoder = ImageEncoder(tiny_rad_dino)
    assert encoder.dim == 32 and encoder.encoder_id.startswith("dinov2@")
    study_ids, _ = cohort_labels(root, "validate")
    references = study_conditions(root, study_ids[:3], RESOLUTION).references
    model = AutoModel.from_pretrained(tiny_rad_dino, local_files_only=True).eval()
    prepared = BitImageProcessor.from_pretrained(tiny_rad_dino)(list(np.repeat(references[..., None], 3, axis=-1)),
                                                                 return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=prepared).pooler_output
    # The processor resizes with PIL, the encoder with torch: equal up to resampling.
    torch.testing.assert_close(encoder.embed(references), expected, atol=0.05, rtol=0)

    settings = section(conditioning="image", image_encoder=tiny_rad_dino, steps=2, checkpoint_every=2)
    generator_id, result = fit_diffusion(settings, inputs(root))
    trained = LatentDiffusion.from_pretrained(result.final_dir)
    assert trained.config.cond_dim == 32
    generator = DiffusionImageGenerator(generator_id, trained, Conditioner(trained.config, image_encoder=encoder),
                                        settings.sampling, None, RESOLUTION)
    batch = generator.generate(["a", "b"], [3, 3], Conditions(labels=np.zeros((2, 10), np.float32),
                                                             references=references[:2]))
    assert batch.images.shape == (2, RESOLUTION, RESOLUTION)
    assert not np.array_equal(batch.images[0], batch.images[1])  # same seed, other reference

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a classifier folder"):
        ImageEncoder(tmp_path / "empty")
    with pytest.raises(ValidationError, match="neither a classifier folder"):
        section(conditioning="image", image_encoder=tmp_path / "empty")


def test_config_lists_families_with_their_sections():
    base = {"run": {"name": "t", "data_root": "/tmp/x"}, "source": {"kind": "demo", "studies": 4},
            "ingest": {"resolution": 16}}
    assert Config.model_validate(base).generators == ["raygen"]
    with pytest.raises(ValidationError, match="without a section"):
        Config.model_validate(base | {"generators": ["raygen", "gan"]})
    config = Config.model_validate(base | {"generators": ["raygen", "diffusion"], "diffusion": {}})
    assert families.section(config, "diffusion") == DiffusionSection()
    assert "sampling" not in config.diffusion.weights_identity()
    with pytest.raises(ValueError, match="unknown generator family"):
        families.family_of("vae-123")


def _ddp_worker(rank: int, out_dir: str) -> None:
    calls = []
    train_diffusion(section(steps=4), tiny_config(), synthetic_rows(24, 0), synthetic_rows(8, 1), Path(out_dir),
                    on_eval=lambda step, metrics: calls.append(step))
    assert calls == ([4] if rank == 0 else [])  # only rank 0 evaluates, calls back and writes
    torch.save(LatentDiffusion.from_pretrained(Path(out_dir) / "final").state_dict(),
               Path(out_dir) / f"rank-{rank}.pt")


def test_ddp_trains_one_model_over_two_processes(tmp_path):
    run_two_ranks(_ddp_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank-{rank}.pt", weights_only=True) for rank in range(2)]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*.pt")] == ["step-00000004.pt"]
