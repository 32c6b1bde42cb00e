import json
import math
from dataclasses import asdict, replace

import pytest
import torch

from models.raygen import (
    PAPER_SAMPLING,
    RayGen,
    RayGenConfig,
    cosine_token_mask,
    generate,
    guided_logits,
    masked_token_loss,
    planned_mask_counts,
)

CODEBOOK = 16
TEXT_DIM = 12


def tiny_config(**overrides) -> RayGenConfig:
    values = dict(codebook_size=CODEBOOK, grid_size=4, text_dim=TEXT_DIM, max_text_tokens=8, n_labels=0, views=[],
                  d_model=32, n_layers=2, n_heads=2, ffn_dim=64, dropout=0.0, cond_drop_prob=0.0)
    return RayGenConfig(**(values | overrides))


def tiny_model(seed: int = 0, **overrides) -> RayGen:
    torch.manual_seed(seed)
    return RayGen(tiny_config(**overrides)).eval()


def random_inputs(batch: int = 3, text_tokens: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CODEBOOK + 1, (batch, 16), generator=g)
    text = torch.randn(batch, text_tokens, TEXT_DIM, generator=g)
    text_mask = torch.arange(text_tokens) < torch.tensor([[5], [3], [1]])[:batch]
    return tokens, text, text_mask


def test_forward_shape_and_no_mask_logit():
    model = tiny_model()
    tokens, text, text_mask = random_inputs()
    assert model(tokens, text, text_mask).shape == (3, 16, CODEBOOK)


def test_config_dict_round_trip_and_validation():
    config = tiny_config(dropout=0.1)
    assert RayGenConfig.from_dict(config.to_dict()) == config
    assert tiny_config(grid_size=32).num_image_tokens == 1024
    with pytest.raises(ValueError):
        tiny_config(d_model=30, n_heads=4)


def test_text_longer_than_max_is_rejected():
    model = tiny_model()
    tokens, _, _ = random_inputs()
    with pytest.raises(ValueError, match="max_text_tokens"):
        model(tokens, torch.randn(3, 9, TEXT_DIM), torch.ones(3, 9, dtype=torch.bool))


def test_padded_text_positions_are_ignored_and_real_ones_are_used():
    model = tiny_model()
    tokens, text, text_mask = random_inputs()
    reference = model(tokens, text, text_mask)

    padded_changed = torch.where(text_mask[..., None], text, torch.randn_like(text) * 100)
    torch.testing.assert_close(model(tokens, padded_changed, text_mask), reference)

    real_changed = text.clone()
    real_changed[:, 0] += 1.0  # position 0 is real in every row
    changed = model(tokens, real_changed, text_mask)
    assert all(not torch.allclose(changed[i], reference[i]) for i in range(3))


def test_all_padding_text_is_finite_and_independent_of_text():
    model = tiny_model()
    tokens, text, _ = random_inputs()
    no_text = torch.zeros(3, 5, dtype=torch.bool)
    logits = model(tokens, text, no_text)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(model(tokens, torch.randn_like(text), no_text), logits)


def test_findings_tokens_ride_with_the_text(tmp_path):
    model = tiny_model(n_labels=3)
    tokens, text, text_mask = random_inputs()
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    other = labels.clone()
    other[:, 0] = 1 - other[:, 0]
    reference = model(tokens, text, text_mask, labels)
    changed = model(tokens, text, text_mask, other)
    assert all(not torch.allclose(changed[i], reference[i]) for i in range(3))  # "absent" is a finding too
    # Without text (the unconditional row) the findings are not attended: guidance contrasts with one null input.
    no_text = torch.zeros_like(text_mask)
    torch.testing.assert_close(model(tokens, text, no_text, other), model(tokens, text, no_text, labels))
    uncond = model(tokens, text, no_text, labels)
    torch.testing.assert_close(guided_logits(model, tokens, text, text_mask, 0.0, labels), uncond)
    torch.testing.assert_close(guided_logits(model, tokens, text, text_mask, 2.0, labels),
                               uncond + 2 * (reference - uncond))
    with pytest.raises(ValueError, match=r"labels have shape \(3, 0\), expected \(3, 3\)"):
        model(tokens, text, text_mask)
    with pytest.raises(ValueError, match="labels have shape"):
        tiny_model()(tokens, text, text_mask, labels)  # a text-only RayGen has no findings tokens
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(RayGen.from_pretrained(tmp_path).eval()(tokens, text, text_mask, labels), reference)


def test_the_view_token_is_attended_with_and_without_text(tmp_path):
    model = tiny_model(views=["AP", "PA"])
    tokens, text, text_mask = random_inputs()
    views = torch.tensor([[0], [1], [0]])
    reference = model(tokens, text, text_mask, views=views)
    assert all(not torch.allclose(model(tokens, text, text_mask, views=1 - views)[i], reference[i]) for i in range(3))
    # The unconditional row keeps its view: guidance contrasts the text with no text on a film of the same view.
    no_text = torch.zeros_like(text_mask)
    uncond = model(tokens, text, no_text, views=views)
    assert all(not torch.allclose(model(tokens, text, no_text, views=1 - views)[i], uncond[i]) for i in range(3))
    torch.testing.assert_close(guided_logits(model, tokens, text, text_mask, 0.0, views=views), uncond)
    torch.testing.assert_close(guided_logits(model, tokens, text, text_mask, 2.0, views=views),
                               uncond + 2 * (reference - uncond))
    with pytest.raises(ValueError, match=r"views have shape \(3, 0\), expected \(3, 1\)"):
        model(tokens, text, text_mask)
    with pytest.raises(ValueError, match="views have shape"):
        tiny_model()(tokens, text, text_mask, views=views)  # no view token
    with pytest.raises(ValueError, match="views must be distinct"):
        tiny_config(views=["AP", "AP"])
    model.save_pretrained(tmp_path)
    loaded = RayGen.from_pretrained(tmp_path).eval()
    assert loaded.config.views == ["AP", "PA"]
    torch.testing.assert_close(loaded(tokens, text, text_mask, views=views), reference)


def test_generation_follows_the_view_without_any_text():
    """Text always dropped, the view alone telling two token patterns apart: after brief training the image sampled
    without text follows its view, so the view reaches the unconditional prediction."""
    model = tiny_model(views=["AP", "PA"], cond_drop_prob=1.0).train()
    g = torch.Generator().manual_seed(0)
    positions = torch.arange(16)
    patterns = torch.stack([positions % CODEBOOK, (5 * positions + 3) % CODEBOOK])
    text, text_mask = torch.randn(16, 3, TEXT_DIM, generator=g), torch.ones(16, 3, dtype=torch.bool)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        views = torch.randint(0, 2, (16,), generator=g)
        loss, _ = masked_token_loss(model, patterns[views], text, text_mask, g, views=views[:, None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    views = torch.tensor([0, 1] * 4)
    out = generate(model, text[:8], torch.zeros_like(text_mask[:8]), views=views[:, None], guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(0))
    assert ((out == patterns[views]).float().mean(1) > 0.9).all()


def test_a_text_only_raygen_saved_before_findings_tokens_still_loads(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["n_labels"], saved["views"]  # the config.json of a RayGen saved before findings and view tokens
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = RayGen.from_pretrained(tmp_path).eval()
    tokens, text, text_mask = random_inputs()
    assert loaded.config.n_labels == 0 and loaded.config.views == []
    torch.testing.assert_close(loaded(tokens, text, text_mask), model(tokens, text, text_mask))


def test_cosine_token_mask_counts():
    mask, r = cosine_token_mask(2000, 16, torch.Generator().manual_seed(0))
    expected = torch.ceil(16 * torch.cos(math.pi * r / 2)).clamp(min=1)
    assert torch.equal(mask.sum(1), expected.long())
    counts = set(mask.sum(1).tolist())
    assert counts <= set(range(1, 17)) and {1, 16} <= counts


class Oracle(RayGen):
    """Knows the ground truth: confidently right on [MASK] inputs and confidently wrong elsewhere (or the
    reverse), so the loss reveals which positions it is computed on."""

    def __init__(self, config: RayGenConfig, targets: torch.Tensor, right_on_masked: bool) -> None:
        super().__init__(config)
        self.targets = targets
        self.right_on_masked = right_on_masked

    def forward(self, tokens, text, text_mask, labels=None, views=None):
        wrong = (self.targets + 1) % self.config.codebook_size
        right_here = (tokens == self.config.mask_token_id) == self.right_on_masked
        predicted = torch.where(right_here, self.targets, wrong)
        return 50.0 * torch.nn.functional.one_hot(predicted, self.config.codebook_size).float()


def test_loss_counts_masked_positions_only():
    tokens, text, text_mask = random_inputs()
    tokens = tokens.clamp(max=CODEBOOK - 1)
    right_on_masked = Oracle(tiny_config(), tokens, right_on_masked=True)
    loss, stats = masked_token_loss(right_on_masked, tokens, text, text_mask, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-6 and stats["accuracy"].item() == 1.0
    right_elsewhere = Oracle(tiny_config(), tokens, right_on_masked=False)
    loss, stats = masked_token_loss(right_elsewhere, tokens, text, text_mask, torch.Generator().manual_seed(0))
    assert loss.item() > 10 and stats["accuracy"].item() == 0.0


def test_conditioning_is_dropped_with_probability_one():
    model = tiny_model(cond_drop_prob=1.0)
    tokens, text, text_mask = random_inputs()
    tokens = tokens.clamp(max=CODEBOOK - 1)
    loss_a, _ = masked_token_loss(model, tokens, text, text_mask, torch.Generator().manual_seed(0))
    loss_b, _ = masked_token_loss(model, tokens, torch.randn_like(text), text_mask,
                                  torch.Generator().manual_seed(0))
    assert loss_a.item() == loss_b.item()
    model.config.cond_drop_prob = 0.0
    loss_c, _ = masked_token_loss(model, tokens, torch.randn_like(text), text_mask,
                                  torch.Generator().manual_seed(0))
    assert loss_c.item() != loss_a.item()


def test_overfits_one_batch():
    model = tiny_model().train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CODEBOOK, (4, 16), generator=g)
    text = torch.randn(4, 3, TEXT_DIM, generator=g)
    text_mask = torch.ones(4, 3, dtype=torch.bool)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss, _ = masked_token_loss(model, tokens, text, text_mask, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final = [masked_token_loss(model, tokens, text, text_mask, g) for _ in range(10)]
    assert max(loss.item() for loss, _ in final) < 0.05
    assert min(stats["accuracy"].item() for _, stats in final) == 1.0


def test_planned_mask_counts():
    # floor(16 cos(pi k / 8)) and floor(16 (1 - k / 4)) for k = 1..4, computed by hand.
    assert planned_mask_counts(16, 4, "cosine") == [14, 11, 6, 0]
    assert planned_mask_counts(16, 4, "linear") == [12, 8, 4, 0]
    assert planned_mask_counts(16, 1) == [0]
    # More steps than the schedule separates: every step still unmasks at least one token.
    assert planned_mask_counts(16, 16) == list(range(15, -1, -1))
    with pytest.raises(ValueError):
        planned_mask_counts(16, 17)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_every_step_unmasks_the_planned_count_and_never_remasks(schedule):
    model = tiny_model()
    _, text, text_mask = random_inputs()
    history = []
    out = generate(model, text, text_mask, steps=5, schedule=schedule, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(0), on_step=lambda k, t: history.append(t.clone()))
    mask_id = model.config.mask_token_id
    plan = planned_mask_counts(16, 5, schedule)
    assert [(t == mask_id).sum(1).tolist() for t in history] == [[n] * 3 for n in plan]
    for earlier, later in zip(history, history[1:]):
        decided = earlier != mask_id
        assert torch.equal(later[decided], earlier[decided])
    assert torch.equal(out, history[-1])
    assert out.dtype == torch.long and out.min() >= 0 and out.max() < CODEBOOK


def test_guidance_scale_interpolates_conditional_and_unconditional():
    model = tiny_model()
    tokens, text, text_mask = random_inputs()
    cond = model(tokens, text, text_mask)
    uncond = model(tokens, text, torch.zeros_like(text_mask))
    torch.testing.assert_close(guided_logits(model, tokens, text, text_mask, 1.0), cond)
    torch.testing.assert_close(guided_logits(model, tokens, text, text_mask, 0.0), uncond)
    torch.testing.assert_close(guided_logits(model, tokens, text, text_mask, 3.0), uncond + 3 * (cond - uncond))
    assert not torch.allclose(cond, uncond)


def test_sampling_is_seeded():
    model = tiny_model()
    _, text, text_mask = random_inputs()

    def sample(seed, **kwargs):
        return generate(model, text, text_mask, generator=torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    # Both temperatures 0 is greedy decoding with noiseless confidences: nothing left for the seed to change.
    greedy = {"temperature": 0.0, "confidence_temperature": 0.0}
    assert torch.equal(sample(7, **greedy), sample(8, **greedy))
    # Greedy tokens with noisy confidences: the seed still chooses the order in which tokens are decided.
    assert not torch.equal(sample(7, temperature=0.0, confidence_temperature=4.5),
                           sample(8, temperature=0.0, confidence_temperature=4.5))


def test_token_temperature_decays_only_when_asked():
    """The last step decides every token still masked after the second-to-last: with linear decay (T = 0 there)
    each is its logits' argmax; with a constant T = 3 some are not."""
    model = tiny_model()
    _, text, text_mask = random_inputs()

    def last_step_tokens_that_are_argmax(decay: str, seed: int) -> torch.Tensor:
        steps = []
        tokens = generate(model, text, text_mask, steps=4, temperature=3.0, temperature_decay=decay,
                          confidence_temperature=0.0, generator=torch.Generator().manual_seed(seed),
                          on_step=lambda k, t: steps.append(t.clone()))
        undecided = steps[-2] == model.config.mask_token_id
        greedy = guided_logits(model, steps[-2], text, text_mask, 1.0).argmax(-1)
        return tokens[undecided] == greedy[undecided]

    assert all(last_step_tokens_that_are_argmax("linear", seed).all() for seed in range(4))
    assert not all(last_step_tokens_that_are_argmax("constant", seed).all() for seed in range(4))


def test_linear_guidance_schedule_starts_conditional():
    """The linear guidance schedule uses w=1 at the first step: its first step equals an unguided one."""
    model = tiny_model()
    _, text, text_mask = random_inputs()

    def first_step(**kwargs):
        steps = []
        generate(model, text, text_mask, steps=4, generator=torch.Generator().manual_seed(3),
                 on_step=lambda k, t: steps.append(t.clone()), **kwargs)
        return steps

    unguided = first_step(guidance_scale=1.0)
    ramped = first_step(guidance_scale=4.0, guidance_schedule="linear")
    constant = first_step(guidance_scale=4.0)
    assert torch.equal(ramped[0], unguided[0])
    assert not torch.equal(constant[0], unguided[0])
    assert not torch.equal(ramped[-1], unguided[-1])


def test_paper_sampler_anneals_one_temperature_for_tokens_and_confidences():
    assert PAPER_SAMPLING.temperature == PAPER_SAMPLING.confidence_temperature == 1.3
    assert PAPER_SAMPLING.temperature_decay == "linear" and PAPER_SAMPLING.guidance_schedule == "constant"


def test_one_generator_per_row_makes_each_image_independent_of_its_batch():
    model = tiny_model()
    _, text, text_mask = random_inputs()

    def rows(seeds):
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    batch = generate(model, text, text_mask, generator=rows([11, 12, 13]), guidance_scale=2.0)
    alone = generate(model, text[1:2], text_mask[1:2], generator=rows([12]), guidance_scale=2.0)
    assert torch.equal(batch[1:2], alone)
    reseeded = generate(model, text, text_mask, generator=rows([11, 99, 13]), guidance_scale=2.0)
    assert torch.equal(reseeded[0], batch[0]) and torch.equal(reseeded[2], batch[2])
    assert not torch.equal(reseeded[1], batch[1])


def test_top_k_fraction_restricts_the_sampled_tokens():
    model = tiny_model()
    with torch.no_grad():
        # Logits 0.1 * id at every position: nearly uniform, token 15 the most likely.
        model.head.weight.zero_()
        model.head.bias.copy_(0.1 * torch.arange(CODEBOOK, dtype=torch.float))
    text = torch.randn(8, 2, TEXT_DIM)
    text_mask = torch.ones(8, 2, dtype=torch.bool)
    seed = torch.Generator().manual_seed(0)
    top_quarter = generate(model, text, text_mask, steps=4, temperature=2.0, top_k_frac=0.25, generator=seed)
    assert set(top_quarter.unique().tolist()) <= {12, 13, 14, 15}
    everything = generate(model, text, text_mask, steps=4, temperature=2.0, top_k_frac=1.0, generator=seed)
    assert everything.min() < 12


def test_save_load_round_trip(tmp_path):
    model = tiny_model(dropout=0.1)
    tokens, text, text_mask = random_inputs()
    model.save_pretrained(tmp_path / "raygen")
    loaded = RayGen.from_pretrained(tmp_path / "raygen").eval()
    assert loaded.config == model.config
    assert torch.equal(loaded(tokens, text, text_mask), model(tokens, text, text_mask))


def test_generation_follows_the_prompt():
    """Two prompts, each always paired with its own token pattern: after brief training, sampling from a
    prompt must reproduce that prompt's pattern, which only works if the text reaches the prediction."""
    model = tiny_model(cond_drop_prob=0.1).train()
    g = torch.Generator().manual_seed(0)
    positions = torch.arange(16)
    patterns = torch.stack([positions % CODEBOOK, (5 * positions + 3) % CODEBOOK])
    prompts = torch.randn(2, 3, TEXT_DIM, generator=g)
    prompt_mask = torch.tensor([[True, True, False], [True, True, True]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        labels = torch.randint(0, 2, (16,), generator=g)
        loss, _ = masked_token_loss(model, patterns[labels], prompts[labels], prompt_mask[labels], g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    labels = torch.tensor([0, 1] * 4)
    out = generate(model, prompts[labels], prompt_mask[labels], **asdict(replace(PAPER_SAMPLING, guidance_scale=2.0)),
                   generator=torch.Generator().manual_seed(0))
    match = (out == patterns[labels]).float().mean(1)
    assert (match > 0.9).all(), match
