"""Text encoders (tasks.generators.text) and the impression embedding cache (tasks.generators.embeddings).

The cache tests use a tiny BERT in a local directory, saved the way CXR-BERT ships: a BertForMaskedLM subclass with a
[CLS] projection head, loaded through its own remote code (trust_remote_code), beside MiniLM's tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from transformers import AutoConfig, AutoModel

from tasks import layout
from tasks.data import catalog
from tasks.generators.embeddings import embed_cohort, EmbedCounts, EmbeddingStore
from tasks.generators.text import BUILTIN_MINILM, encoder_path, EncoderNotFoundError, load_text_encoder, TextEncoder

MAX_TOKENS = 256
IMPRESSIONS = {
    101: "No acute cardiopulmonary process.",
    102: "Moderate right pleural effusion with adjacent atelectasis; no pneumothorax.",
    103: "Cardiomegaly.",
    104: "Left lower lobe consolidation, concerning for pneumonia. Recommend follow-up radiographs in six weeks.",
    105: "Mild pulmonary edema.",
}
COHORT = pa.table({"study_id": list(IMPRESSIONS), "impression": list(IMPRESSIONS.values())})

CONFIGURATION_CODE = '''
from transformers import BertConfig


class TinyCXRBertConfig(BertConfig):
    model_type = "tiny-cxr-bert"
'''
MODELING_CODE = '''
from torch import nn
from transformers import BertForMaskedLM

from .configuration_tiny_cxr import TinyCXRBertConfig


class TinyCXRBertModel(BertForMaskedLM):
    config_class = TinyCXRBertConfig

    def __init__(self, config):
        super().__init__(config)
        self.cls_projection_head = nn.Linear(config.hidden_size, 8)
        self.post_init()
'''
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def save_tiny_cxr_bert(directory: Path, seed: int) -> torch.nn.Module:
    """Write a tiny CXR-BERT-style model (remote code, random weights from `seed`) to `directory`; return it."""
    directory.mkdir(parents=True)
    (directory / "configuration_tiny_cxr.py").write_text(CONFIGURATION_CODE)
    (directory / "modeling_tiny_cxr.py").write_text(MODELING_CODE)
    (directory / "config.json").write_text(json.dumps({
        "model_type": "tiny-cxr-bert",
        "auto_map": {"AutoConfig": "configuration_tiny_cxr.TinyCXRBertConfig",
                     "AutoModel": "modeling_tiny_cxr.TinyCXRBertModel"},
        "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 512,
    }))
    for name in TOKENIZER_FILES:
        shutil.copy(Path(encoder_path(BUILTIN_MINILM)) / name, directory / name)
    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.from_pretrained(directory, trust_remote_code=True),
                                  trust_remote_code=True)
    model.save_pretrained(directory)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module, TextEncoder]:
    directory = tmp_path_factory.mktemp("encoders") / "tiny-cxr-bert"
    model = save_tiny_cxr_bert(directory, seed=0)
    return directory, model, load_text_encoder(str(directory))


def count_embeds(monkeypatch, encoder: TextEncoder) -> list[int]:
    """Record the batch size of every embed call on `encoder`."""
    calls: list[int] = []
    embed = encoder.embed

    def counting(texts, max_tokens):
        calls.append(len(texts))
        return embed(texts, max_tokens)

    monkeypatch.setattr(encoder, "embed", counting)
    return calls


def test_remote_code_encoder_gives_the_per_token_states_of_its_base_bert(tiny, tmp_path):
    directory, model, encoder = tiny
    assert type(model).__name__ == "TinyCXRBertModel"
    assert encoder.dim == 32 and encoder.encoder_id.startswith("tiny-cxr-bert@")
    texts = list(IMPRESSIONS.values())
    hidden, mask = encoder.embed(texts, MAX_TOKENS)

    batch = encoder.tokenizer(texts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        expected = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert hidden.dtype == torch.float32 and hidden.shape == expected.shape
    torch.testing.assert_close(hidden, expected)
    assert torch.equal(mask, batch["attention_mask"].bool())

    short, short_mask = encoder.embed(texts, 8)
    assert short.shape == (5, 8, 32)
    assert short_mask.sum(1).tolist() == [min(length, 8) for length in mask.sum(1).tolist()]

    # The id names the weights, not where they lie; other weights get another id.
    shutil.copytree(directory, tmp_path / "copy" / "tiny-cxr-bert")
    assert load_text_encoder(str(tmp_path / "copy" / "tiny-cxr-bert")).encoder_id == encoder.encoder_id
    save_tiny_cxr_bert(tmp_path / "other" / "tiny-cxr-bert", seed=1)
    assert load_text_encoder(str(tmp_path / "other" / "tiny-cxr-bert")).encoder_id != encoder.encoder_id


def test_builtin_minilm_loads_offline():
    encoder = load_text_encoder(BUILTIN_MINILM)
    assert encoder.dim == 384 and encoder.encoder_id.startswith("builtin:minilm@")
    hidden, mask = encoder.embed(["Small left pleural effusion.", "No acute process."], MAX_TOKENS)
    assert hidden.shape == (2, mask.shape[1], 384) and mask[0].all() and not mask[1].all()


def test_unreachable_hub_id_says_how_to_use_a_local_copy():
    with pytest.raises(EncoderNotFoundError, match="set text.encoder to that directory"):
        load_text_encoder("nobody-here/no-such-encoder")


def test_cached_embeddings_match_a_direct_encoder_call(tiny, tmp_path):
    _, _, encoder = tiny
    counts = embed_cohort(tmp_path, encoder, COHORT, MAX_TOKENS, batch_size=2, unit_size=3, progress=False)
    assert counts == EmbedCounts(embedded=5, skipped=0)

    asked = [104, 101, 103]
    hidden, mask = EmbeddingStore(tmp_path, encoder.encoder_id).get_many(asked, MAX_TOKENS)
    expected, expected_mask = encoder.embed([IMPRESSIONS[study_id] for study_id in asked], MAX_TOKENS)
    assert hidden.dtype == torch.float32 and hidden.shape == expected.shape
    assert torch.equal(mask, expected_mask)
    assert mask.sum(1).tolist() == [len(encoder.tokenizer(IMPRESSIONS[s])["input_ids"]) for s in asked]
    torch.testing.assert_close(hidden[mask], expected[mask], atol=2e-3, rtol=2e-3)  # stored as float16
    assert not hidden[~mask].any()

    cut, cut_mask = EmbeddingStore(tmp_path, encoder.encoder_id).get_many(asked, 6)
    assert cut.shape == (3, 6, 32) and bool(cut_mask.all())
    with pytest.raises(KeyError, match="study 999: no embedding"):
        EmbeddingStore(tmp_path, encoder.encoder_id).get_many([999], MAX_TOKENS)


def test_cache_hit_does_no_work_and_another_encoder_recomputes(tiny, tmp_path, monkeypatch):
    _, _, encoder = tiny
    embed_cohort(tmp_path, encoder, COHORT.slice(0, 3), MAX_TOKENS, batch_size=2, unit_size=2, progress=False)
    calls = count_embeds(monkeypatch, encoder)

    assert embed_cohort(tmp_path, encoder, COHORT, MAX_TOKENS, batch_size=4, unit_size=8, progress=False) == \
        EmbedCounts(embedded=2, skipped=3)
    assert calls == [2]
    calls.clear()
    assert embed_cohort(tmp_path, encoder, COHORT, MAX_TOKENS, batch_size=4, unit_size=8, progress=False) == \
        EmbedCounts(embedded=0, skipped=5)
    assert calls == []

    other = TextEncoder("other@000000000000", encoder.tokenizer, tiny[1], "cpu")
    assert embed_cohort(tmp_path, other, COHORT, MAX_TOKENS, batch_size=4, unit_size=8, progress=False) == \
        EmbedCounts(embedded=5, skipped=0)
    assert len(EmbeddingStore(tmp_path, other.encoder_id)) == len(EmbeddingStore(tmp_path, encoder.encoder_id)) == 5
    assert layout.text_dir(tmp_path, other.encoder_id) != layout.text_dir(tmp_path, encoder.encoder_id)


def test_a_unit_killed_between_shard_and_part_is_redone_once(tiny, tmp_path, die_on_second_part):
    _, _, encoder = tiny
    written = die_on_second_part.arm("text_embeddings")
    with pytest.raises(RuntimeError, match="killed"):
        embed_cohort(tmp_path, encoder, COHORT, MAX_TOKENS, batch_size=2, unit_size=2, progress=False)
    die_on_second_part.disarm()
    shards = layout.text_dir(tmp_path, encoder.encoder_id)
    assert len(list(shards.glob("*.npy"))) == 2  # the second unit's shard, with no part to commit it

    # A cohort that no longer holds the killed unit's studies: its orphan shard is removed.
    assert embed_cohort(tmp_path, encoder, COHORT.slice(0, 2), MAX_TOKENS, batch_size=2, unit_size=2,
                        progress=False) == EmbedCounts(embedded=0, skipped=2)
    assert [path.stem for path in shards.glob("*.npy")] == written

    assert embed_cohort(tmp_path, encoder, COHORT, MAX_TOKENS, batch_size=2, unit_size=2, progress=False) == \
        EmbedCounts(embedded=3, skipped=2)
    with catalog.connect(tmp_path) as con:
        stored = con.table("text_embeddings").to_arrow_table()
    assert sorted(stored["study_id"].to_pylist()) == list(IMPRESSIONS)
    assert {path.stem for path in shards.glob("*.npy")} == set(stored["shard"].to_pylist())
    hidden, mask = EmbeddingStore(tmp_path, encoder.encoder_id).get_many(list(IMPRESSIONS), MAX_TOKENS)
    expected, _ = encoder.embed(list(IMPRESSIONS.values()), MAX_TOKENS)
    torch.testing.assert_close(hidden[mask], expected[mask], atol=2e-3, rtol=2e-3)
