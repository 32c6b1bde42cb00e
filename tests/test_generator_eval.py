import socket

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
from PIL import Image, ImageOps
from pydantic import ValidationError
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from conftest import SHARED_DATA
from models.fid_features import DenseNetFeatures
from tasks.config import GeneratorEvalSection
from tasks.evaluation import fidelity
from tasks.evaluation.classifier import LabelledImages, save_classifier, train_classifier
from tasks.evaluation.fidelity import features
from tasks.evaluation.generator_eval import (
    DENSENET,
    INCEPTION,
    RAD_DINO,
    EvaluationSet,
    Studies,
    evaluate_generator,
    evaluation_set,
    training_studies,
    metrics,
    sampler_sweep,
    sweep_markdown,
    to_markdown,
    Extractor,
    fid,
    fid_extractors,
    label_faithfulness,
    macro_over,
    ms_ssim_diversity,
    own_study_retrieval,
    populated_classes,
    register_extractors,
)
from tasks.evaluation.metrics import MetricReport
from tasks.generators.interface import GeneratedBatch
from tasks.pathologies import PATHOLOGIES

# squares: the classifier tests' learnable task (class k = a bright square in cell k); one_thread: autouse, one
# torch thread per process on the shared cores.
from test_classifier import SIZE, one_thread, squares, tiny_config  # noqa: F401

XRAYS = SHARED_DATA / "covid_chestxray_ieee8023" / "images"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A DenseNet trained on the squares task and saved as save_classifier lays it out: (folder, trained)."""
    train = LabelledImages(*squares(128, 0))
    config = tiny_config(steps=32, eval_every=8, patience=4)
    trained = train_classifier(train, LabelledImages(*squares(64, 1)), config, seed=0, progress=False)
    folder = tmp_path_factory.mktemp("classifier")
    save_classifier(trained, folder)
    return folder, trained


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No socket may connect, and torch's hub folder (where torch-fidelity downloads) must stay empty."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    yield
    assert not list((tmp_path / "torch-home").rglob("*")), "something was downloaded into torch's hub folder"


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A weights file for torch-fidelity's Inception with random weights: the real file is a download."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity_inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(fidelity_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        model = fidelity_inception.FeatureExtractorInceptionV3(INCEPTION, ["2048"])
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(model.state_dict(), path)
    return path


def noise(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def test_registration_is_idempotent_and_refuses_a_foreign_class(monkeypatch):
    register_extractors()
    register_extractors()
    assert FEATURE_EXTRACTORS_REGISTRY[DENSENET] is DenseNetFeatures

    monkeypatch.setitem(FEATURE_EXTRACTORS_REGISTRY, DENSENET, fidelity_inception.FeatureExtractorInceptionV3)
    with pytest.raises(RuntimeError, match="different feature extractor"):
        register_extractors()


def test_inception_is_skipped_with_a_reason_unless_a_local_file_is_configured(classifier, tmp_path):
    folder, _ = classifier
    extractors, skipped = fid_extractors(folder, None, None)
    assert extractors == [Extractor(DENSENET, folder)]
    assert "inception_weights" in skipped[INCEPTION]

    weights = tmp_path / "inception.pth"
    weights.touch()
    extractors, skipped = fid_extractors(folder, weights, None)
    assert [extractor.name for extractor in extractors] == [DENSENET, INCEPTION] and set(skipped) == {RAD_DINO}

    assert GeneratorEvalSection(inception_weights=weights).inception_weights == weights
    with pytest.raises(ValidationError, match="does not exist"):
        GeneratorEvalSection(inception_weights=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        fid(noise(4, SIZE, 0), noise(4, SIZE, 1), Extractor(INCEPTION, tmp_path / "missing.pth"))


def test_densenet_fid_is_zero_for_a_set_against_itself_and_small_within_a_distribution(classifier, offline):
    folder, _ = classifier
    (extractor,), _ = fid_extractors(folder, None, None)
    real_a, real_b = squares(64, 20)[0], squares(64, 21)[0]

    to_itself, within, to_noise = (fid(real_a, other, extractor) for other in (real_a, real_b, noise(64, SIZE, 0)))

    assert abs(to_itself) < 1e-3 * to_noise
    assert within < 0.2 * to_noise


@pytest.mark.slow  # each Inception FID solves a 2048 x 2048 eigenproblem: 15-60 s on the 2-core box
def test_inception_fid_runs_from_a_local_weights_file_offline(classifier, random_inception_weights, offline):
    folder, _ = classifier
    _, inception = fid_extractors(folder, random_inception_weights, None)[0]
    real_a, real_b = squares(12, 20)[0], squares(12, 21)[0]

    assert fid(real_a, real_b, inception) < 0.5 * fid(real_a, noise(12, SIZE, 0), inception)


def test_rad_dino_features_come_from_a_local_folder_offline_as_its_processor_prepares_images(tiny_rad_dino, offline,
                                                                                             tmp_path):
    from transformers import AutoModel, BitImageProcessor

    images = noise(6, SIZE, 3)
    (_, extractor), skipped = fid_extractors(tmp_path, None, tiny_rad_dino)
    assert extractor == Extractor(RAD_DINO, tiny_rad_dino) and RAD_DINO not in skipped

    found = features(images, extractor, batch_size=4)

    model = AutoModel.from_pretrained(tiny_rad_dino, local_files_only=True).eval()
    prepared = BitImageProcessor.from_pretrained(tiny_rad_dino)(list(np.repeat(images[..., None], 3, axis=-1)),
                                                                 return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=prepared).pooler_output.double().numpy()
    assert found.shape == (6, 32)
    # The processor resizes with PIL, this extractor with torch: the same features up to resampling (without the
    # processor's mean and std, they would be off by more than 1).
    np.testing.assert_allclose(found, expected, atol=0.05)
    assert fidelity.fid(found, found) == pytest.approx(0.0, abs=1e-6)
    assert GeneratorEvalSection(rad_dino=tiny_rad_dino).rad_dino == tiny_rad_dino
    with pytest.raises(ValidationError, match="not a Hugging Face model folder"):
        GeneratorEvalSection(rad_dino=tmp_path)


def test_fid_rejects_images_it_cannot_use(classifier):
    (extractor,), _ = fid_extractors(classifier[0], None, None)
    with pytest.raises(ValueError, match="uint8"):
        fid(noise(4, SIZE, 0).astype(np.float32), noise(4, SIZE, 1), extractor)
    with pytest.raises(ValueError, match="n >= 2"):
        fid(noise(1, SIZE, 0), noise(4, SIZE, 1), extractor)


@pytest.mark.parametrize("side", [64, 176])  # a truncated 3-px window, and the standard 11-px one (over 160 px)
def test_ms_ssim_is_one_for_identical_images_and_low_for_independent_noise(side):
    image = np.asarray(Image.fromarray(squares(2, 0)[0][0]).resize((side, side)))
    identical = np.stack([image] * 3)
    independent = noise(6, side, 0)  # 15 pairs: one pair of noise images scores anywhere in 0-0.15

    assert ms_ssim_diversity([identical]) == pytest.approx(1.0, abs=1e-5)
    low = ms_ssim_diversity([independent])
    assert low < 0.2
    # Every pair weighs the same: three identical pairs and fifteen independent ones.
    assert ms_ssim_diversity([identical, independent]) == pytest.approx((3 + 15 * low) / 18, abs=1e-5)
    slightly_noisy = np.stack([image, np.clip(image.astype(int) + noise(1, side, 1)[0] // 16, 0, 255).astype(np.uint8)])
    assert low < ms_ssim_diversity([slightly_noisy]) < 1.0


def test_ms_ssim_rejects_groups_it_cannot_measure():
    with pytest.raises(ValueError, match="k >= 2"):
        ms_ssim_diversity([noise(1, 64, 0)])
    with pytest.raises(ValueError, match="group 1 has images"):
        ms_ssim_diversity([noise(2, 64, 0), noise(2, 96, 1)])
    with pytest.raises(ValueError, match="at least 33 px"):
        ms_ssim_diversity([noise(2, 32, 0)])


def test_label_faithfulness_is_high_on_the_learned_task_and_chance_on_noise(classifier):
    _, trained = classifier
    images, labels = squares(64, 30)

    faithful = label_faithfulness(trained.model, images, labels, SIZE)
    unrelated = label_faithfulness(trained.model, noise(64, SIZE, 0), labels, SIZE)

    assert faithful.macro > 0.8
    assert abs(unrelated.macro - 0.5) < 0.15
    labels[:, 0] = np.nan
    assert PATHOLOGIES[0] in label_faithfulness(trained.model, images, labels, SIZE).skipped


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(not XRAYS.is_dir(), reason=f"{XRAYS} is absent")
def test_real_xrays_are_closer_to_each_other_than_to_their_pixel_shuffles(classifier, offline):
    folder, _ = classifier
    (extractor,), _ = fid_extractors(folder, None, None)
    paths = sorted(XRAYS.glob("*.png"))[:200]
    xrays = np.stack([np.asarray(ImageOps.fit(Image.open(path).convert("L"), (64, 64))) for path in paths])
    first, second = xrays[:100], xrays[100:]
    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(image.ravel()).reshape(image.shape) for image in second])

    assert fid(first, second, extractor) < 0.25 * fid(first, shuffled, extractor)


def labelled_squares(labels: np.ndarray, seed: int) -> np.ndarray:
    """The squares task's images for given labels, at 64 px (MS-SSIM's five scales need more than 32)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (len(labels), SIZE, SIZE)).astype(np.uint8)
    cell = SIZE // 4
    for k in range(len(PATHOLOGIES)):
        row, col = divmod(k, 4)
        images[labels[:, k] == 1, row * cell + 1:(row + 1) * cell - 1, col * cell + 1:(col + 1) * cell - 1] = 220
    return np.kron(images, np.ones((2, 2), np.uint8))


def as_prompt(labels: np.ndarray) -> str:
    return "".join(str(int(value)) for value in labels)


class SquaresGenerator:
    """Draws what its prompt names, with fresh noise per seed: a faithful generator of the squares task."""

    generator_id = output_id = "squares"
    resolution, needs = 2 * SIZE, None

    def generate(self, prompts, seeds, conditions=None):
        labels = np.array([[float(ch) for ch in prompt] for prompt in prompts], np.float32)
        images = np.concatenate([labelled_squares(labels[i:i + 1], seed) for i, seed in enumerate(seeds)])
        return GeneratedBatch(images, [{"seed": seed} for seed in seeds])


class CopyingGenerator(SquaresGenerator):
    """Hands back training images whatever it is asked: memorisation at its plainest."""

    generator_id = output_id = "copies"

    def __init__(self, train_images):
        self.train_images = train_images

    def generate(self, prompts, seeds, conditions=None):
        return GeneratedBatch(self.train_images[[seed % len(self.train_images) for seed in seeds]],
                              [{"seed": seed} for seed in seeds])


def studies(n: int, seed: int, first_subject: int) -> Studies:
    labels = (np.random.default_rng(seed).random((n, len(PATHOLOGIES))) < 0.4).astype(np.float32)
    return Studies(labelled_squares(labels, seed), [as_prompt(row) for row in labels], labels,
                   np.arange(first_subject, first_subject + n))


@pytest.fixture(scope="module")
def evaluation(classifier):
    held_out = EvaluationSet(reference=studies(48, 10, 0), prompted=studies(48, 11, 1000))
    train = studies(96, 12, 2000)
    section = GeneratorEvalSection(images=96, diversity_prompts=4, images_per_prompt=3, min_per_class=8)
    folder, _ = classifier
    faithful = evaluate_generator(SquaresGenerator(), held_out, train, folder, section, seed=0)
    copying = evaluate_generator(CopyingGenerator(train.images), held_out, train, folder, section, seed=0)
    return faithful, copying


def test_a_faithful_generator_is_close_to_the_floor_and_copies_nothing(evaluation):
    faithful, copying = evaluation
    ours, floor = faithful.generated[DENSENET], faithful.real_reference[DENSENET]
    # Images of the same task: as close to the reference as other real images are (fidelity cannot tell a copier
    # from a generator, since copies are real images too: that is what memorisation is for).
    assert ours["fid"] < 1.5 * floor["fid"] and ours["kid"] < floor["kid"] + 3 * floor["kid_std"]
    assert ours["precision"] > 0.5 and ours["recall"] > 0.5 and ours["coverage"] > 0.5
    # Copies ignore the prompt; the judge reads real images of the task as well as the faithful generator's.
    assert faithful.faithfulness.generated.macro > 0.8 and copying.faithfulness.generated.macro < 0.7
    assert faithful.faithfulness.real.macro > 0.8
    # No tokenizer: nothing to refit the decoded-domain judge on, and no reconstructions to score.
    assert faithful.faithfulness.reconstructed is faithful.faithfulness.decoded_generated is None
    assert faithful.memorisation["share_closer_than_held_out_p1"] < 0.1
    assert copying.memorisation["share_closer_than_held_out_p1"] > 0.9  # a copy is at distance 0
    assert copying.closest_pairs[0][2] == pytest.approx(0.0, abs=1e-6)
    # Drawn from its own impression, an image finds its study among 48; a copy of a training image finds none.
    assert faithful.retrieval["top1"] > 0.8 and faithful.retrieval["top1_chance"] == 1 / 48
    assert copying.retrieval["top5"] < 3 * copying.retrieval["top5_chance"]
    np.testing.assert_array_equal(copying.closest_pairs[0][0], copying.closest_pairs[0][1])


def test_diversity_within_and_across_prompts_and_classes_with_too_few_positives(evaluation):
    faithful, _ = evaluation
    assert 0 < faithful.ms_ssim < 1 and 0 < faithful.ms_ssim_across_prompts < 1
    assert faithful.kid_by_class and all(count >= 8 for _, _, count in faithful.kid_by_class.values())
    # Per-class FID where KID is computed, each beside half B's real positives of the class at the same counts.
    assert faithful.fid_by_class.keys() == faithful.kid_by_class.keys()
    assert all(generated > 0 and real > 0 for generated, real in faithful.fid_by_class.values())
    assert "tokenizer" in faithful.skipped and not faithful.tokenizer  # it has no tokenizer to reconstruct with
    logged = metrics(faithful)
    assert {f"generator/fid/{DENSENET}", f"generator/fid_real_reference/{DENSENET}", "generator/ms_ssim",
            "generator/ms_ssim_across_prompts", "generator/memorisation/share_closer_than_held_out_p1",
            "generator/faithfulness/auroc/macro"} <= set(logged)
    table = to_markdown(faithful)
    assert "| densenet121-xrv | fid |" in table and "Memorisation:" in table
    assert {"generator/retrieval/top1", "generator/retrieval/top5_chance"} <= set(logged)
    some_class = next(iter(faithful.fid_by_class))
    assert {f"generator/fid_by_class/{some_class}", f"generator/fid_by_class/{some_class}/real"} <= set(logged)
    assert "| FID (in-domain) | real FID |" in table
    assert f"{100 * faithful.retrieval['top1']:.1f}% of generated images have their own study's" in table


def test_retrieval_finds_each_generated_images_own_study_where_the_answer_is_known():
    real = np.arange(20, dtype=float)[:, None] * np.array([[1.0, 0.0]])  # 20 studies on a line, 1 apart
    near = real + 0.1  # each generated image next to its own study's real image
    shifted = real + 1.4  # nearest is the next study's, its own among the 5 nearest (but the last one's: k=1 off)
    far = np.full_like(real, 100.0) + real  # all nearest the last study

    assert own_study_retrieval(near, real) == {"top1": 1.0, "top1_chance": 0.05, "top5": 1.0, "top5_chance": 0.25}
    assert own_study_retrieval(shifted, real)["top1"] == pytest.approx(1 / 20)  # only the last one: no next study
    assert own_study_retrieval(shifted, real)["top5"] == 1.0
    found = own_study_retrieval(far, real)
    assert found["top1"] == pytest.approx(1 / 20) and found["top5"] == pytest.approx(5 / 20)  # the 5 last ones
    with pytest.raises(ValueError, match="pairs each generated row"):
        own_study_retrieval(near[:5], real)


class BlankGenerator(SquaresGenerator):
    """The same dark noise for every prompt and seed: a collapsed generator that ignores its text."""

    def generate(self, prompts, seeds, conditions=None):
        blank = labelled_squares(np.zeros((1, len(PATHOLOGIES)), np.float32), 0)
        return GeneratedBatch(np.repeat(blank, len(prompts), axis=0), [{"seed": seed} for seed in seeds])


def test_the_sampler_sweep_ranks_a_faithful_sampler_above_a_collapsed_one(classifier):
    held_out = EvaluationSet(reference=studies(40, 30, 0), prompted=studies(40, 31, 1000))
    section = GeneratorEvalSection(images=80, images_per_prompt=2, sweep_prompts=24)
    points = sampler_sweep({"faithful": SquaresGenerator(), "collapsed": BlankGenerator()}, held_out, classifier[0],
                           section, seed=0)
    floor, faithful, collapsed = points
    assert [point.label for point in points] == ["real (floor)", "faithful", "collapsed"]
    assert floor.faithfulness is None and 0 < floor.ms_ssim < 1  # real images of different studies
    assert faithful.fid < collapsed.fid and faithful.recall > collapsed.recall
    assert collapsed.ms_ssim == pytest.approx(1.0) and faithful.ms_ssim < 0.9  # one image whatever the seed
    # One image for every prompt: the judge's scores tie (up to float rounding between batch positions), AUROC ~0.5.
    assert faithful.faithfulness > 0.8 and collapsed.faithfulness == pytest.approx(0.5, abs=0.02)
    assert faithful.faithfulness_populated > 0.8 and floor.faithfulness_populated is None
    table = sweep_markdown(points)
    assert table.count("\n") == 4 and "| collapsed |" in table


def test_the_populated_macro_leaves_out_classes_with_few_positive_prompts(evaluation):
    labels = np.zeros((30, len(PATHOLOGIES)), np.float32)
    labels[:12, 1], labels[:3, 2], labels[:10, 3] = 1, 1, 1  # 12, 3 and 10 positives; class 4 has one, masked
    labels[0, 4], labels[1:, 4] = 1, np.nan
    assert populated_classes(labels, 10) == (PATHOLOGIES[1], PATHOLOGIES[3])
    report = MetricReport({name: 0.5 for name in PATHOLOGIES} | {PATHOLOGIES[1]: 0.9, PATHOLOGIES[3]: None}, 0.5, {})
    assert macro_over(report, (PATHOLOGIES[1], PATHOLOGIES[3])) == pytest.approx(0.9)  # the scored ones only
    assert macro_over(report, (PATHOLOGIES[3],)) is None
    # In the evaluation: the classes with min_per_class (8) positive prompts, a macro beside each macro.
    faithful, _ = evaluation
    faithfulness = faithful.faithfulness
    assert faithfulness.populated == populated_classes(studies(48, 11, 1000).labels, 8)
    expected = np.mean([faithfulness.generated.per_class[name] for name in faithfulness.populated])
    assert metrics(faithful)["generator/faithfulness/auroc/macro_populated"] == pytest.approx(expected)
    assert f"positives ({', '.join(faithfulness.populated)}) | {expected:.3f} |" in to_markdown(faithful)


def test_a_generator_with_a_tokenizer_is_measured_against_its_reconstructions(classifier):
    class Reconstructing(SquaresGenerator):
        def reconstruct(self, images):
            return images  # a perfect tokenizer: its ceiling is the floor

    held_out = EvaluationSet(reference=studies(24, 20, 0), prompted=studies(24, 21, 1000))
    section = GeneratorEvalSection(images=48, diversity_prompts=2, images_per_prompt=2)
    result = evaluate_generator(Reconstructing(), held_out, studies(24, 22, 2000), classifier[0], section, 0)
    assert result.tokenizer[DENSENET] == result.real_reference[DENSENET]
    faithfulness = result.faithfulness
    assert faithfulness.reconstructed.per_class == faithfulness.real.per_class  # the same images


def inverted(images: np.ndarray) -> np.ndarray:
    return 255 - images


class InvertingTokenizer(SquaresGenerator):
    """Draws what its prompt names, but every image it makes or reconstructs comes out of its decoder inverted:
    a latent generator whose decoded images lie off the real images' domain."""

    def generate(self, prompts, seeds, conditions=None):
        batch = super().generate(prompts, seeds, conditions)
        return GeneratedBatch(inverted(batch.images), batch.provenance)

    def reconstruct(self, images):
        return inverted(images)


def test_the_decoded_domain_judge_reads_what_a_decoder_drew_where_the_real_trained_judge_cannot(classifier):
    held_out = EvaluationSet(reference=studies(48, 40, 0), prompted=studies(48, 41, 1000))
    section = GeneratorEvalSection(images=96, diversity_prompts=2, images_per_prompt=2)
    result = evaluate_generator(InvertingTokenizer(), held_out, studies(160, 42, 2000), classifier[0], section, 0)
    faithfulness = result.faithfulness
    # The real-trained judge reads the real images, not their inverted reconstructions nor the inverted drawings.
    assert faithfulness.real.macro > 0.8
    assert faithfulness.reconstructed.macro < faithfulness.real.macro - 0.15
    assert faithfulness.generated.macro < faithfulness.real.macro - 0.15
    # Refitted on inverted training images, the judge reads held-out reconstructions and the drawings alike.
    assert faithfulness.decoded_ceiling.macro > 0.8 and faithfulness.decoded_generated.macro > 0.8
    logged, table = metrics(result), to_markdown(result)
    assert {"generator/faithfulness_decoded_judge/auroc/macro", "generator/faithfulness_tokenizer/auroc/macro",
            "generator/faithfulness_decoded_judge_tokenizer/auroc/macro",
            "generator/faithfulness_real_reference/auroc/macro"} <= set(logged)
    assert "| decoded-domain: generated |" in table
    assert f"| macro | {faithfulness.real.macro:.3f} |" in table


def test_a_configured_rad_dino_is_a_feature_space_of_the_evaluation(classifier, tiny_rad_dino):
    held_out = EvaluationSet(reference=studies(24, 20, 0), prompted=studies(24, 21, 1000))
    section = GeneratorEvalSection(images=48, diversity_prompts=2, images_per_prompt=2, rad_dino=tiny_rad_dino)
    result = evaluate_generator(SquaresGenerator(), held_out, studies(24, 22, 2000), classifier[0], section, 0)
    assert set(result.generated) == set(result.real_reference) == {DENSENET, RAD_DINO}
    assert set(result.generated[RAD_DINO]) == {"fid", "kid", "kid_std", "precision", "recall", "density", "coverage"}
    assert f"generator/fid/{RAD_DINO}" in metrics(result) and f"| {RAD_DINO} | fid |" in to_markdown(result)


def test_the_evaluation_set_is_held_out_and_patient_disjoint(tmp_path):
    import pandas as pd

    from tasks.data import catalog
    from tasks.data.curate import LABEL_COLUMNS
    from tasks.data.pixels import PixelStore, write_shard

    n = 60
    cohort = pd.DataFrame({"dicom_id": [f"d{i:02d}" for i in range(n)], "subject_id": [i // 3 for i in range(n)],
                           "study_id": range(n), "split": ["train", "validate", "test"] * (n // 3),
                           "view_position": ["AP", "PA"] * (n // 2),
                           "impression": [f"impression {i}" for i in range(n)]})
    labels = pd.DataFrame({"dicom_id": cohort["dicom_id"], **{col: 1.0 for col in LABEL_COLUMNS}}).iloc[:50]
    write_shard(tmp_path, 16, "all", np.arange(n, dtype=np.uint8)[:, None, None].repeat(16, 1).repeat(16, 2))
    catalog.write_part(tmp_path, "pixels", "all", [{"dicom_id": f"d{i:02d}", "resolution": 16, "shard": "all",
                                                    "shard_row": i} for i in range(n)])
    drawn = evaluation_set(cohort, labels, PixelStore(tmp_path, 16), size=30, seed=0)
    a, b = drawn.reference, drawn.prompted
    assert len(a.prompts) + len(b.prompts) == 30 and abs(len(a.prompts) - len(b.prompts)) <= 2
    assert not set(a.subject_ids) & set(b.subject_ids)
    drawn_ids = [int(p.split()[1]) for p in a.prompts + b.prompts]
    assert all(cohort.loc[i, "split"] != "train" for i in drawn_ids)
    assert all(image[0, 0] == i for image, i in zip(np.concatenate([a.images, b.images]), drawn_ids))
    assert list(np.concatenate([a.views, b.views])) == [("AP", "PA")[i % 2] for i in drawn_ids]  # each own view
    assert list(b.conditions.views) == list(b.views)  # what a RayGen with a view token draws from
    labelled = np.concatenate([a.labels, b.labels])
    assert np.isnan(labelled[[i >= 50 for i in drawn_ids]]).all() and (labelled[[i < 50 for i in drawn_ids]] == 1).all()
    train = training_studies(cohort, labels, PixelStore(tmp_path, 16))
    train_ids = [int(p.split()[1]) for p in train.prompts]
    assert train_ids == [i for i in range(n) if i % 3 == 0]  # the train rows, in dicom_id order
    assert (train.labels[[i < 50 for i in train_ids]] == 1).all() and np.isnan(train.labels[-1]).all()
    assert [int(image[0, 0]) for image in train.images] == train_ids
    assert list(train.views) == [("AP", "PA")[i % 2] for i in train_ids]


def test_too_few_held_out_studies_is_a_clear_error(tmp_path):
    import pandas as pd

    from tasks.data.pixels import PixelStore

    cohort = pd.DataFrame({"dicom_id": ["a", "b", "c"], "subject_id": [1, 2, 3], "study_id": [1, 2, 3],
                           "split": ["train", "test", "validate"], "view_position": ["AP"] * 3,
                           "impression": ["x", "y", "z"]})
    with pytest.raises(ValueError, match="2 held-out studies; the evaluation needs 4"):
        evaluation_set(cohort, pd.DataFrame({"dicom_id": []}), PixelStore(tmp_path, 16), size=10, seed=0)
