import copy
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ddp import run_two_ranks
from family_cohort import cohort_labels, fit_inputs, MAX_TOKENS, RESOLUTION, WordEncoder, write_family_cohort
from models.raygen import generate, masked_token_loss, RayGen, RayGenConfig
from tasks import layout
from tasks.browse.generators import findings_conditions, generate_grid
from tasks.config import RayGenSection
from tasks.generators import families
from tasks.generators.checkpoints import final_dir, latest_checkpoint
from tasks.generators.conditions import study_conditions
from tasks.generators.interface import Conditions
from tasks.generators.raygen.generator import load_raygen_generator
from tasks.generators.raygen.training import TokenTextDataset, ema_decay, train_raygen, train_step
from tasks.generators.tokens import encode_cohort
from tasks.generators.training import lr_factor, shard_generator
from tasks.pathologies import PATHOLOGIES

CODEBOOK, GRID, TEXT_DIM, TEXT_TOKENS, CLASSES = 16, 4, 8, 4, 4
SIZES = dict(codebook_size=CODEBOOK, grid_size=GRID, text_dim=TEXT_DIM, max_text_tokens=TEXT_TOKENS, n_labels=0)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models run fastest on one thread, and the DDP test compares against 1-thread workers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic(rows: int, seed: int) -> TokenTextDataset:
    """Each row belongs to one of 4 classes: a fixed token pattern (10% of tokens replaced at random) and a
    report whose text vectors name the class, padded to a random length."""
    fixed = torch.Generator().manual_seed(1234)
    patterns = torch.randint(0, CODEBOOK, (CLASSES, GRID * GRID), generator=fixed)
    class_text = torch.randn(CLASSES, TEXT_TOKENS, TEXT_DIM, generator=fixed)
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, CLASSES, (rows,), generator=g)
    noise = torch.rand(rows, GRID * GRID, generator=g) < 0.1
    tokens = torch.where(noise, torch.randint(0, CODEBOOK, (rows, GRID * GRID), generator=g), patterns[classes])
    text = class_text[classes] + 0.1 * torch.randn(rows, TEXT_TOKENS, TEXT_DIM, generator=g)
    lengths = torch.randint(2, TEXT_TOKENS + 1, (rows, 1), generator=g)
    return TokenTextDataset(tokens, text.half(), torch.arange(TEXT_TOKENS) < lengths)


def tiny(**overrides) -> RayGenSection:
    values = dict(d_model=32, n_layers=2, n_heads=2, ffn_dim=64, cond_drop_prob=0.1, steps=12, batch_size=8,
                  lr=3e-3, warmup_steps=3, checkpoint_every=4, eval_every=100, sample_every=100, device="cpu")
    return RayGenSection(**(values | overrides))


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return RayGen.from_pretrained(out_dir / "final").state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_dataset_rejects_misaligned_tensors():
    data = synthetic(10, 0)
    with pytest.raises(ValueError, match="disagree"):
        TokenTextDataset(data.tokens, data.text[:9], data.text_mask)
    with pytest.raises(ValueError, match="disagree"):
        TokenTextDataset(data.tokens, data.text, data.text_mask, torch.zeros(9, 10))
    with pytest.raises(ValueError, match="disagree"):
        TokenTextDataset(data.tokens, data.text, data.text_mask, views=torch.zeros(9, 1, dtype=torch.long))
    tokens, text, mask, labels, views = data[torch.tensor([3, 1])]
    assert tokens.dtype == torch.long and text.dtype == torch.float32 and mask.dtype == torch.bool
    assert text.shape == (2, TEXT_TOKENS, TEXT_DIM) and labels.shape == (2, 0)  # no findings given: none held
    assert views.shape == (2, 0)  # no view token


def test_loss_falls_and_accuracy_rises(tmp_path):
    evals = {}
    result = train_raygen(tiny(steps=100, batch_size=16, eval_every=10), synthetic(320, 0), synthetic(64, 1),
                          tmp_path, on_eval=lambda step, metrics: evals.update({step: metrics}), **SIZES)
    assert sorted(evals) == list(range(10, 101, 10))
    first, last = evals[10], evals[100]
    assert last["val/loss"] < 0.6 * first["val/loss"]
    assert last["val/accuracy"] > first["val/accuracy"] + 0.3
    assert last["train/loss"] < first["train/loss"]
    # The patterns follow the text: with the null text the model can only guess the class, which costs loss.
    assert last["val/text_gain"] > 0.5 and last["val/loss_null_text"] > last["val/loss"]
    assert result.step == 100 and result.metrics == last
    assert result.final_dir == tmp_path / "final"


def test_lr_schedule_warmup_then_cosine():
    assert [lr_factor(s, 4, 12) for s in (0, 1, 3)] == [0.25, 0.5, 1.0]
    assert lr_factor(4, 4, 12) == 1.0
    assert lr_factor(8, 4, 12) == pytest.approx(0.5)
    assert lr_factor(10, 4, 12) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(0.75 * torch.pi)).item()))
    assert lr_factor(12, 4, 12) == pytest.approx(0.0)
    assert lr_factor(0, 0, 10) == 1.0


def test_resume_is_bit_identical_and_ignores_partial_checkpoints(tmp_path):
    # Dropout on, so the resumed run also depends on the restored torch RNG state.
    config = tiny(dropout=0.1, grad_accum=2)
    train, val = synthetic(40, 0), synthetic(8, 1)  # 5 steps per epoch: the resume lands mid-epoch
    whole = train_raygen(config, train, val, tmp_path / "whole", **SIZES)

    first = train_raygen(config, train, val, tmp_path / "split", max_steps=6, **SIZES)
    assert (first.step, first.final_dir) == (6, None)
    assert first.checkpoint.name == "step-00000006.pt"
    # What a write killed midway leaves behind: a temp file, newer by name, that is not a checkpoint.
    (tmp_path / "split/checkpoints/.step-00000010.pt.0123abcd.tmp").write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path / "split") == first.checkpoint
    second = train_raygen(config, train, val, tmp_path / "split", **SIZES)

    assert second.step == whole.step == 12
    assert_same_weights(weights(tmp_path / "split"), weights(tmp_path / "whole"))
    # keep_checkpoints=2: only the newest two are left.
    assert [p.name for p in sorted((tmp_path / "whole/checkpoints").glob("step-*.pt"))] == \
        ["step-00000008.pt", "step-00000012.pt"]


def test_ema_decay_rises_from_a_tenth_to_its_limit():
    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 90) == pytest.approx(0.91)
    assert ema_decay(0.999, 100_000) == 0.999
    assert ema_decay(0.0, 50) == 0.0


def test_final_weights_are_the_moving_average_of_the_trained_ones(tmp_path):
    train, val = synthetic(40, 0), synthetic(8, 1)
    train_raygen(tiny(ema_decay=0.0), train, val, tmp_path / "plain", **SIZES)
    state = torch.load(tmp_path / "plain/checkpoints/step-00000012.pt", weights_only=True)
    assert_same_weights(weights(tmp_path / "plain"), state["model"])  # decay 0: the average is the last step

    train_raygen(tiny(ema_decay=0.9), train, val, tmp_path / "ema", **SIZES)
    state = torch.load(tmp_path / "ema/checkpoints/step-00000012.pt", weights_only=True)
    final = weights(tmp_path / "ema")
    averaged = {name.removeprefix("module."): value for name, value in state["ema"].items() if name != "n_averaged"}
    assert_same_weights(final, averaged)
    assert int(state["ema"]["n_averaged"]) == 12
    # The trained weights moved on after the average last took them in: they differ from it.
    assert any(not torch.equal(final[name], state["model"][name]) for name in final)


def test_resume_refuses_another_data_order(tmp_path):
    train, val = synthetic(40, 0), synthetic(8, 1)
    train_raygen(tiny(), train, val, tmp_path, max_steps=4, **SIZES)
    with pytest.raises(ValueError, match="data order"):
        train_raygen(tiny(batch_size=4), train, val, tmp_path, **SIZES)


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch():
    # Masks are drawn per shard, so "the whole batch" is the mean of the shard losses in one backward pass;
    # the DDP test below shows the same shards give the same update when spread over processes.
    torch.manual_seed(0)
    model = RayGen(RayGenConfig(**SIZES, views=[], d_model=32, n_layers=2, n_heads=2,
                                ffn_dim=64, dropout=0.0, cond_drop_prob=0.3))
    reference = copy.deepcopy(model)
    batch = synthetic(8, 0)[torch.arange(8)]
    micro = [tuple(t[m::2] for t in batch) for m in range(2)]
    gens = [shard_generator(0, 5, m, torch.device("cpu")) for m in range(2)]

    # lr 0 leaves the weights as they were, so the accumulated gradients can be read after the step.
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    train_step(model, optimizer, micro, gens, grad_clip=1e9, autocast=torch.autocast("cpu", enabled=False))

    gens = [shard_generator(0, 5, m, torch.device("cpu")) for m in range(2)]
    whole = sum(masked_token_loss(reference, tokens, text, mask, g, labels=labels, views=views)[0]
                for (tokens, text, mask, labels, views), g in zip(micro, gens)) / 2
    whole.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_callbacks_at_their_steps_with_fixed_prompts(tmp_path):
    config = tiny(steps=6, eval_every=2, sample_every=4, sample_prompts=3, warmup_steps=2)
    evals, samples = {}, {}
    val = synthetic(8, 1)
    train_raygen(config, synthetic(40, 0), val, tmp_path, on_eval=lambda s, m: evals.update({s: m}),
                 on_samples=lambda s, t: samples.update({s: t}), **SIZES)
    assert sorted(evals) == [2, 4, 6] and sorted(samples) == [4, 6]
    for step, metrics in evals.items():
        assert set(metrics) == {"val/loss", "val/accuracy", "val/loss_null_text", "val/text_gain", "train/loss", "lr"}
        assert metrics["lr"] == pytest.approx(config.lr * lr_factor(step - 1, 2, 6))
    assert samples[6].shape == (3, GRID, GRID) and samples[6].dtype == torch.long
    assert int(samples[6].min()) >= 0 and int(samples[6].max()) < CODEBOOK
    # The last grid is what the final model draws from the first validation rows with the run's seed.
    _, text, mask, _, _ = val[torch.arange(3)]
    expected = generate(RayGen.from_pretrained(tmp_path / "final"), text, mask,
                        **config.sampling.model_dump(), generator=torch.Generator().manual_seed(config.seed))
    assert torch.equal(samples[6], expected.view(3, GRID, GRID))


def _ddp_worker(rank: int, out_dir: str) -> None:
    calls = []
    train_raygen(tiny(steps=6, eval_every=3), synthetic(40, 0), synthetic(8, 1), Path(out_dir),
                 on_eval=lambda step, metrics: calls.append(step), **SIZES)
    # Only rank 0 evaluates and calls back.
    assert calls == ([3, 6] if rank == 0 else [])


def test_ddp_two_processes_equal_one_process_with_two_micro_batches(tmp_path):
    run_two_ranks(_ddp_worker, str(tmp_path / "ddp"))

    train_raygen(tiny(steps=6, eval_every=3, grad_accum=2), synthetic(40, 0), synthetic(8, 1), tmp_path / "single",
                 **SIZES)
    assert_same_weights(weights(tmp_path / "ddp"), weights(tmp_path / "single"))


def tokenized_family_cohort(root: Path):
    """The family cohort with its images tokenized: what RayGen's fit reads."""
    write_family_cohort(root)
    inputs = fit_inputs(root)
    cohort = pq.read_table(layout.cohort_file(root, "generator")).to_pandas()
    encode_cohort(root, inputs.vqgan, inputs.vqgan_id, cohort["dicom_id"].tolist(), RESOLUTION, batch_size=16,
                  unit_size=64, progress=False)
    return inputs


def tiny_fit(**overrides) -> RayGenSection:
    return RayGenSection(**dict(d_model=32, n_layers=1, n_heads=2, ffn_dim=64, steps=4, batch_size=8, warmup_steps=1,
                                checkpoint_every=4, eval_every=2, sampling={"steps": 2}) | overrides)


def test_findings_tokens_are_learned_from_the_studys_labels_and_drawn_from_them(tmp_path):
    inputs = tokenized_family_cohort(tmp_path)
    settings = tiny_fit(findings_tokens=True)
    generator_id, result = families.fit("raygen", settings, inputs)
    text_only_id, _ = families.fit("raygen", settings.model_copy(update={"findings_tokens": False}), inputs)
    assert result.step == 4 and generator_id != text_only_id

    model_dir = final_dir(layout.model_dir(tmp_path, "raygen", generator_id))
    generator = load_raygen_generator(tmp_path, generator_id, inputs.vqgan, WordEncoder(),
                                      settings.sampling.params(), MAX_TOKENS)
    assert RayGen.from_pretrained(model_dir).config.n_labels == len(PATHOLOGIES) and generator.needs == "labels"
    study_ids, _ = cohort_labels(tmp_path, "validate")
    conditions = study_conditions(tmp_path, study_ids[:4])
    prompts, seeds = ["cardiomegaly"] * 4, [0, 0, 0, 0]
    batch = generator.generate(prompts, seeds, conditions)
    np.testing.assert_array_equal(generator.generate(prompts, seeds, conditions).images, batch.images)
    assert [record["labels"] for record in batch.provenance] == conditions.labels.tolist()
    cardiomegaly = PATHOLOGIES.index("Cardiomegaly")
    with torch.no_grad():  # four steps barely move the embeddings: make "present" loud, so the draw must show it
        generator.raygen.label_emb.weight[2 * cardiomegaly + 1].normal_(std=10.0)
    batch = generator.generate(prompts, seeds, conditions)
    other = conditions.labels.copy()
    other[:, cardiomegaly] = 1 - other[:, cardiomegaly]
    assert not np.array_equal(generator.generate(prompts, seeds, Conditions(other)).images, batch.images)
    with pytest.raises(ValueError, match="conditioned on labels"):
        generator.generate(prompts, seeds)
    # The app draws it from the findings picked, as it does a label family.
    images, _ = generate_grid(generator, "Cardiomegaly.", [0, 1], findings_conditions(["Cardiomegaly"]))
    assert images.shape == (2, RESOLUTION, RESOLUTION)


def test_a_view_token_is_learned_from_each_images_view_and_drawn_from_the_studys(tmp_path):
    inputs = tokenized_family_cohort(tmp_path)
    settings = tiny_fit(view_token=True)
    generator_id, _ = families.fit("raygen", settings, inputs)
    generator = load_raygen_generator(tmp_path, generator_id, inputs.vqgan, WordEncoder(),
                                      settings.sampling.params(), MAX_TOKENS)
    assert generator.views == ["AP", "PA"] and generator.needs is None  # the text, and the view beside it
    cohort = pq.read_table(layout.cohort_file(tmp_path, "generator")).to_pandas().set_index("study_id")
    study_ids, _ = cohort_labels(tmp_path, "validate")
    conditions = study_conditions(tmp_path, study_ids[:4])
    assert list(conditions.views) == cohort.loc[study_ids[:4], "view_position"].tolist() == ["AP", "PA"] * 2
    prompts, seeds = ["cardiomegaly"] * 4, [0, 0, 0, 0]
    with torch.no_grad():  # four steps barely move the embeddings: make the views far apart, so the draw must show it
        generator.raygen.view_emb.weight.normal_(std=10.0)
    batch = generator.generate(prompts, seeds, conditions)
    assert [record["view"] for record in batch.provenance] == ["AP", "PA"] * 2
    assert not np.array_equal(batch.images[0], batch.images[1])  # one prompt and seed, two views
    flipped = Conditions(conditions.labels, views=conditions.views[::-1].copy())
    np.testing.assert_array_equal(generator.generate(prompts, seeds, flipped).images[[1, 0]], batch.images[[0, 1]])
    with pytest.raises(ValueError, match="has a view token"):
        generator.generate(prompts, seeds)
    with pytest.raises(ValueError, match=r"learned the views \['AP', 'PA'\], not \['LATERAL'\]"):
        generator.generate(prompts[:1], seeds[:1], findings_conditions([], "LATERAL"))
    # The app's view picker: the same prompt and seed in the view picked.
    images, provenance = generate_grid(generator, "cardiomegaly", [0], findings_conditions([], "PA"))
    np.testing.assert_array_equal(images[0], batch.images[1])
    assert provenance[0]["view"] == "PA"


def test_a_validation_image_of_a_view_not_trained_on_is_refused_by_name(tmp_path):
    inputs = tokenized_family_cohort(tmp_path)
    path = layout.cohort_file(tmp_path, "generator")
    cohort = pq.read_table(path).to_pandas()
    cohort.loc[cohort.index[cohort["split"] == "validate"][0], "view_position"] = "LATERAL"  # one validation row
    cohort.to_parquet(path, index=False)
    with pytest.raises(ValueError, match=r"generator.parquet's train split learned the views \['AP', 'PA'\], "
                                         r"not \['LATERAL'\]"):
        families.fit("raygen", tiny_fit(view_token=True), inputs)
