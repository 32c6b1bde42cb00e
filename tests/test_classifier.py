import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from models.densenet import build_densenet, densenet_features, to_xrv
from tasks.config import ClassifierSection
from tasks.evaluation.classifier import (
    LabelledImages,
    load_classifier,
    masked_bce_loss,
    mixed_batches,
    predict,
    save_classifier,
    train_classifier,
)
from tasks.evaluation.metrics import auroc_per_class
from tasks.pathologies import PATHOLOGIES

C = len(PATHOLOGIES)
SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The test machines' cores are shared: two threads per process there are several times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def squares(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy dark 32 px images; class k is positive iff a bright square fills cell k of a 4x4 grid."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, C)) < 0.3).astype(np.float32)
    labels[:2] = [[1.0] * C, [0.0] * C]  # every class has both kinds, even in small sets
    images = rng.integers(0, 60, (n, SIZE, SIZE)).astype(np.uint8)
    cell = SIZE // 4
    for k in range(C):
        row, col = divmod(k, 4)
        images[labels[:, k] == 1, row * cell + 1:(row + 1) * cell - 1, col * cell + 1:(col + 1) * cell - 1] = 220
    return images, labels


def tiny_config(**overrides) -> ClassifierSection:
    values = {"steps": 4, "eval_every": 2, "batch_size": 16, "lr": 1e-3, "patience": 2, "image_size": SIZE}
    return ClassifierSection(**(values | overrides))


@pytest.fixture(scope="module")
def trained():
    return train_classifier(
        LabelledImages(*squares(32, 0)), LabelledImages(*squares(16, 1)), tiny_config(augment=True), seed=0,
        progress=False,
    )


def test_to_xrv_maps_uint8_onto_xrv_range_and_resizes():
    images = np.array([[[0, 255], [128, 0]]], dtype=np.uint8)

    x = to_xrv(images, 2)
    assert x.dtype == torch.float32 and x.shape == (1, 1, 2, 2)
    assert x[0, 0, 0, 0] == -1024 and x[0, 0, 0, 1] == 1024 and abs(float(x[0, 0, 1, 0])) < 5

    resized = to_xrv(torch.from_numpy(np.full((3, 40, 40), 255, dtype=np.uint8)), SIZE)
    assert resized.shape == (3, 1, SIZE, SIZE) and torch.allclose(resized, torch.tensor(1024.0))
    with pytest.raises(ValueError, match="uint8"):
        to_xrv(images.astype(np.float32) / 255, 2)


def test_masked_loss_ignores_nan_labels():
    logits = torch.randn(4, C, requires_grad=True)
    labels = (torch.rand(4, C) < 0.5).float()
    masked = labels.clone()
    masked[0, 3] = masked[2, 7] = float("nan")

    loss = masked_bce_loss(logits, masked)
    loss.backward()

    keep = ~torch.isnan(masked)
    expected = nn.functional.binary_cross_entropy_with_logits(logits[keep], labels[keep])
    assert loss.item() == pytest.approx(expected.item())
    assert logits.grad[0, 3] == 0 and logits.grad[2, 7] == 0
    # Whatever the masked entries' true labels were, loss and gradients are the same.
    flipped = labels.clone()
    flipped[0, 3], flipped[2, 7] = 1 - labels[0, 3], 1 - labels[2, 7]
    for other in (flipped, labels):
        other = torch.where(keep, other, torch.nan)
        repeat = logits.detach().clone().requires_grad_()
        masked_bce_loss(repeat, other).backward()
        assert torch.equal(repeat.grad, logits.grad)
    assert masked_bce_loss(logits, torch.full((4, C), torch.nan)).item() == 0.0


def test_predict_runs_in_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 6 * 6, C)
    )
    images, labels = squares(8, 2)
    data = LabelledImages(images[:, :8, :8], labels)
    with torch.no_grad():  # train-mode passes give batch norm running statistics that differ from one batch's
        for _ in range(30):
            train_mode = torch.sigmoid(model(to_xrv(images[:, :8, :8], 8))).numpy()

    first = predict(model, data, image_size=8, batch_size=4)
    assert model.training  # restored
    second = predict(model, data, image_size=8, batch_size=3)
    np.testing.assert_allclose(first, second, rtol=1e-6)  # no dropout, running BN statistics
    assert first.shape == (8, C) and ((first > 0) & (first < 1)).all()
    assert not np.allclose(first, train_mode, atol=1e-3)

    model.eval()
    predict(model, data, image_size=8)
    assert not model.training


def test_densenet_features_are_pooled_penultimate_activations_in_eval_mode():
    torch.manual_seed(0)
    model = build_densenet(C)
    images, _ = squares(5, 3)

    features = densenet_features(model, images, image_size=SIZE, batch_size=2)

    assert features.shape == (5, 1024) and model.training
    with torch.no_grad():
        logits = model.eval().classifier(torch.from_numpy(features))
        np.testing.assert_allclose(logits.numpy(), model(to_xrv(images, SIZE)).numpy(), rtol=1e-4, atol=1e-4)


def test_training_learns_a_synthetic_task_from_mixed_real_and_synthetic_sets():
    real, synthetic = LabelledImages(*squares(64, 10)), LabelledImages(*squares(64, 11))
    val = LabelledImages(*squares(64, 12))

    result = train_classifier(real, val, tiny_config(steps=32, eval_every=8, patience=4), seed=0, progress=False,
                              synthetic=synthetic, synthetic_share=0.5)

    assert result.history[-1].train_loss < result.history[0].train_loss
    assert max(record.val_macro_auroc for record in result.history) > 0.85
    test_images, test_labels = squares(64, 13)
    scores = predict(result.model, LabelledImages(test_images, test_labels), image_size=SIZE)
    assert auroc_per_class(test_labels, scores).macro > 0.8


def test_every_batch_has_the_share_of_synthetic_rows_and_each_source_cycles():
    batches = mixed_batches(n_real=10, n_synthetic=6, batch_size=4, synthetic_share=1 / 3, seed=0)
    drawn = [next(batches) for _ in range(15)]
    assert all(sum(index >= 10 for index in batch) == 1 for batch in drawn)  # round(4 / 3) synthetic a batch
    real = [index for batch in drawn for index in batch if index < 10]
    assert sorted(real[:10]) == list(range(10)) and sorted(real[10:20]) == list(range(10))  # whole passes
    synthetic = [index for batch in drawn for index in batch if index >= 10]
    assert sorted(synthetic[:6]) == list(range(10, 16))
    assert all(index < 10 for index in next(mixed_batches(10, 0, 4, 0.5, seed=0)))  # nothing to mix in
    with pytest.raises(ValueError, match="needs real rows"):
        mixed_batches(0, 6, 4, 0.5, seed=0).__next__()


def test_the_step_budget_is_the_same_whatever_the_share():
    real, synthetic = LabelledImages(*squares(32, 14)), LabelledImages(*squares(64, 15))
    val = LabelledImages(*squares(16, 16))
    config = tiny_config(steps=6, eval_every=3, patience=10)
    alone = train_classifier(real, val, config, seed=0, progress=False)
    mixed = train_classifier(real, val, config, seed=0, progress=False, synthetic=synthetic, synthetic_share=0.5)
    assert [record.step for record in alone.history] == [record.step for record in mixed.history] == [3, 6]


def test_early_stopping_restores_the_best_validation():
    images, labels = squares(48, 20)
    # Validation labels are the opposite of the training ones: learning the task makes validation worse.
    val_images, val_labels = squares(24, 21)
    val = LabelledImages(val_images, 1 - val_labels)

    result = train_classifier(LabelledImages(images, labels), val, tiny_config(steps=24, eval_every=3, patience=2),
                              seed=0, progress=False)

    aurocs = [record.val_macro_auroc for record in result.history]
    best = int(np.argmax(aurocs))
    assert result.best_step == result.history[best].step
    assert len(result.history) == best + 3 < 8  # stopped after `patience` validations without progress
    restored = auroc_per_class(val.labels, predict(result.model, val, image_size=SIZE)).macro
    assert restored == pytest.approx(aurocs[best], abs=1e-9)
    assert restored != pytest.approx(aurocs[-1], abs=1e-3)


def test_training_is_deterministic_for_a_seed(trained):
    again = train_classifier(
        LabelledImages(*squares(32, 0)), LabelledImages(*squares(16, 1)), tiny_config(augment=True), seed=0,
        progress=False,
    )
    assert again.history == trained.history
    for name, tensor in trained.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name


def test_save_and_load_round_trip_to_identical_predictions(trained, tmp_path):
    data = LabelledImages(*squares(10, 30))

    save_classifier(trained, tmp_path / "classifier")
    loaded = load_classifier(tmp_path / "classifier")

    assert loaded.config == trained.config and loaded.history == trained.history
    assert loaded.best_step == trained.best_step and not loaded.model.training
    assert np.array_equal(predict(loaded.model, data, SIZE), predict(trained.model, data, SIZE))


def test_training_refuses_a_validation_set_it_cannot_score():
    images, labels = squares(8, 40)
    with pytest.raises(ValueError, match="validation set"):
        train_classifier(LabelledImages(images, labels), LabelledImages(images, np.ones_like(labels)), tiny_config(), seed=0)


@pytest.mark.filterwarnings("error")
def test_read_only_images_and_labels_batch_without_torch_warnings():
    # Pixel shards are memory-mapped read-only and Arrow's label columns are read-only: torch warns on both.
    images = np.zeros((4, 8, 8), dtype=np.uint8)
    labels = np.zeros((4, len(PATHOLOGIES)), dtype=np.float32)
    images.setflags(write=False)
    labels.setflags(write=False)
    batch_images, batch_labels = next(iter(DataLoader(LabelledImages(images, labels), batch_size=4)))
    assert batch_images.shape == (4, 8, 8) and batch_labels.shape == (4, len(PATHOLOGIES))


def test_a_low_data_arm_keeps_whole_patients_and_the_same_ones_every_time():
    from tasks.evaluation.retrain import arm_subset, RealSplit

    subjects = np.repeat(np.arange(40), 3)  # 40 patients, 3 images each
    split = RealSplit(np.zeros((120, 4, 4), np.uint8), np.zeros((120, len(PATHOLOGIES)), np.float32), subjects)
    tenth = arm_subset(split, 0.1)
    assert len(np.unique(tenth.subject_ids)) == 4 and len(tenth.labels) == 12  # whole patients: all their images
    assert np.array_equal(arm_subset(split, 0.1).subject_ids, tenth.subject_ids)  # the same for every ratio and seed
    assert set(arm_subset(split, 0.25).subject_ids) != set(tenth.subject_ids)
    assert arm_subset(split, 1.0) is split
    assert len(np.unique(arm_subset(split, 0.001).subject_ids)) == 1  # never empty


class Recording(LabelledImages):
    """LabelledImages that notes which rows training reads, in order."""

    def __init__(self, images, labels, reads: list[str], name: str):
        super().__init__(images, labels)
        self.reads, self.name = reads, name

    def __getitem__(self, index: int):
        self.reads.append(self.name)
        return super().__getitem__(index)


def test_pretraining_reads_synthetic_rows_only_then_real_ones_and_validates_only_while_fine_tuning():
    reads: list[str] = []
    real = Recording(*squares(32, 50), reads, "real")
    synthetic = Recording(*squares(24, 51), reads, "synthetic")
    config = tiny_config(steps=7, eval_every=2, patience=10)

    result = train_classifier(real, LabelledImages(*squares(16, 52)), config, seed=0, progress=False,
                              synthetic=synthetic, pretrain_steps=3)

    batch = config.batch_size
    assert reads == ["synthetic"] * 3 * batch + ["real"] * 4 * batch  # the budget: 3 + 4 steps
    assert [record.step for record in result.history] == [5, 7]  # every eval_every fine-tune steps, and the last
    assert result.best_step in (5, 7)
    with pytest.raises(ValueError, match="needs synthetic images"):
        train_classifier(real, real, config, seed=0, progress=False, pretrain_steps=3)
    with pytest.raises(ValueError, match="at least one step after it"):
        train_classifier(real, real, config, seed=0, progress=False, synthetic=synthetic, pretrain_steps=7)


def test_pretraining_carries_over_into_fine_tuning():
    # Pretrained on the task, a single fine-tune step on real images whose labels say nothing still scores the task.
    real_images, real_labels = squares(32, 60)
    noise = LabelledImages(real_images, np.random.default_rng(0).permutation(real_labels))
    val, test = LabelledImages(*squares(32, 61)), LabelledImages(*squares(64, 62))
    config = tiny_config(steps=33, eval_every=1, lr=1e-3)

    pretrained = train_classifier(noise, val, config, seed=0, progress=False,
                                  synthetic=LabelledImages(*squares(64, 63)), pretrain_steps=32)
    scratch = train_classifier(noise, val, config.model_copy(update={"steps": 1}), seed=0, progress=False)

    scores = {name: auroc_per_class(test.labels, predict(run.model, test, SIZE)).macro
              for name, run in (("pretrained", pretrained), ("scratch", scratch))}
    assert scores["pretrained"] > 0.8 > scores["scratch"] + 0.2
