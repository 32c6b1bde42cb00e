"""The impression embeddings RayGen cross-attends to, computed once per (study_id, encoder id) and read back in batches.

Storage: the studies of a work unit share one ragged shard, <data_root>/text/<encoder slug>/<unit>.npy, [tokens, D]
float16, their token states one after another; a part of the "text_embeddings" table says where each study's rows
are. The part is written after the shard and is the unit's commit marker. A unit is named by hashing the encoder id
and its study ids, so a re-run after a kill cuts and names the same units and overwrites what a killed one left.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from tasks import layout
from tasks.data import catalog
from tasks.data.catalog import chunk, unit_name
from tasks.generators.text import TextEncoder
from tasks.progress import ProgressBar

TABLE = "text_embeddings"


class EmbedCounts(NamedTuple):
    embedded: int  # studies embedded by this call
    skipped: int  # studies already cached for the encoder id


def embed_cohort(data_root: Path, encoder: TextEncoder, cohort_rows: pa.Table, max_tokens: int, batch_size: int,
                 unit_size: int, progress: bool = True) -> EmbedCounts:
    """Embed the impressions of the cohort's studies (columns study_id, impression; one row per study) that have no
    embedding yet for `encoder.encoder_id`, `unit_size` studies to a shard, `batch_size` to a forward pass."""
    data_root = Path(data_root)
    _remove_uncommitted_shards(data_root, encoder.encoder_id)
    with catalog.connect(data_root) as con:
        con.register("cohort", cohort_rows.select(["study_id", "impression"]))
        query = catalog.read_sql("pending_text_embeddings")
        pending_rows = con.sql(query, params=[encoder.encoder_id]).to_arrow_table().to_pylist()
    with ProgressBar(total=len(pending_rows), desc=f"embed {encoder.encoder_id}", unit="study",
                     disable=not progress) as bar:
        for unit in chunk(pending_rows, unit_size):
            study_ids = [row["study_id"] for row in unit]
            name = unit_name("text", [encoder.encoder_id, *map(str, study_ids)])
            states: list[Tensor] = []
            for batch in chunk(unit, batch_size):
                hidden, mask = encoder.embed([row["impression"] for row in batch], max_tokens)
                states += [text_hidden[text_mask] for text_hidden, text_mask in zip(hidden.cpu(), mask.cpu())]
                bar.update(len(batch))
            with catalog.atomic_output(layout.text_dir(data_root, encoder.encoder_id) / f"{name}.npy") as tmp:
                with open(tmp, "wb") as handle:  # a handle, or np.save would append ".npy" to the temporary name
                    np.save(handle, torch.cat(states).numpy().astype(np.float16))
            lengths = [len(study_states) for study_states in states]
            starts = np.cumsum([0, *lengths[:-1]]).tolist()
            catalog.write_part(data_root, TABLE, name, [
                {"study_id": study_id, "encoder_id": encoder.encoder_id, "shard": name, "start": start,
                 "length": length}
                for study_id, start, length in zip(study_ids, starts, lengths)
            ])
    return EmbedCounts(embedded=len(pending_rows), skipped=cohort_rows.num_rows - len(pending_rows))


def _remove_uncommitted_shards(data_root: Path, encoder_id: str) -> None:
    """Delete shards (and temp files) of units killed before their part was written: a re-run redoes those units,
    but the cohort may have changed since, and then nothing else would ever overwrite them."""
    directory = layout.text_dir(data_root, encoder_id)
    catalog.remove_stale_temp_files(directory)
    for shard in directory.glob("*.npy"):
        if not catalog.part_exists(data_root, TABLE, shard.stem):
            shard.unlink()


def pad_states(states: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Texts' hidden states ([T_i, D] each) as one batch: (hidden [B, T, D], mask [B, T] bool), T the longest;
    positions past a text's length are zero and masked out. Stored and freshly encoded prompts meet RayGen alike."""
    hidden = states[0].new_zeros(len(states), max(len(text) for text in states), states[0].shape[1])
    mask = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    for row, text in enumerate(states):
        hidden[row, :len(text)] = text
        mask[row, :len(text)] = True
    return hidden, mask


def embed_prompts(encoder: TextEncoder, prompts: Sequence[str], max_tokens: int) -> tuple[Tensor, Tensor]:
    """Fresh prompts as pad_states gives stored ones, on the encoder's device. One prompt at a time: a prompt's
    states must not depend on how much padding its batch needed."""
    encoded = [encoder.embed([prompt], max_tokens) for prompt in prompts]
    return pad_states([hidden[0, mask[0]] for hidden, mask in encoded])


class EmbeddingStore:
    """Read-only access to one encoder id's cached embeddings by study_id; shards are memory-mapped on first use."""

    def __init__(self, data_root: Path, encoder_id: str):
        self.data_root = Path(data_root)
        self.encoder_id = encoder_id
        with catalog.connect(self.data_root) as con:
            rows = con.execute(catalog.read_sql("text_embedding_locations"), [encoder_id]).fetchall()
        self._locations: dict[int, tuple[str, int, int]] = {
            study_id: (shard, start, length) for study_id, shard, start, length in rows
        }
        self._shards: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._locations)

    def get(self, study_id: int) -> np.ndarray:
        """One study's token states, [length, D] float16 (a read-only view into the memory-mapped shard)."""
        try:
            shard, start, length = self._locations[study_id]
        except KeyError:
            raise KeyError(f"study {study_id}: no embedding for encoder {self.encoder_id} under {self.data_root} "
                           f"(run embed_cohort first)") from None
        return self._shard(shard)[start:start + length]

    def get_many(self, study_ids: Sequence[int], max_tokens: int) -> tuple[Tensor, Tensor]:
        """(hidden [B, T, D] float32, mask [B, T] bool), in the order asked: T is the longest study's length, at
        most max_tokens (longer ones are cut); positions past a study's length are zero and masked out."""
        return pad_states([torch.from_numpy(self.get(study_id)[:max_tokens].astype(np.float32))
                           for study_id in study_ids])

    def _shard(self, shard: str) -> np.ndarray:
        if shard not in self._shards:
            path = layout.text_dir(self.data_root, self.encoder_id) / f"{shard}.npy"
            try:
                states = np.load(path, mmap_mode="r")
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: shard listed in the text_embeddings table is missing") from None
            if states.ndim != 2:
                raise ValueError(f"{path}: shape {list(states.shape)} is not [tokens, D]")
            self._shards[shard] = states
        return self._shards[shard]
