"""The VQ-GAN tokens RayGen learns to generate, computed once per (dicom_id, VQ-GAN id) and read back in batches.

Tokens live in the "tokens" table, one part per work unit of images; a unit is named by hashing the VQ-GAN id and its
dicom ids, so a re-run after a kill redoes the same units. A part is written whole or not at all (write_part), so it
is its own commit marker.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from models.vqgan import VQGAN
from tasks.data import catalog
from tasks.data.catalog import chunk, unit_name
from tasks.data.pixels import PixelStore
from tasks.progress import ProgressBar

TABLE = "tokens"


class TokenCounts(NamedTuple):
    encoded: int  # images encoded by this call
    skipped: int  # images already holding tokens for the VQ-GAN id


def encode_cohort(data_root: Path, vqgan: VQGAN, vqgan_id: str, dicom_ids: Sequence[str], resolution: int,
                  batch_size: int, unit_size: int, progress: bool = True) -> TokenCounts:
    """Encode the images among `dicom_ids` that have no tokens yet for `vqgan_id`, from their pixels at `resolution`,
    `unit_size` images to a part, `batch_size` to a forward pass. Puts `vqgan` in eval mode."""
    if vqgan.config.n_embed > np.iinfo(np.int16).max + 1:
        raise ValueError(f"{vqgan_id}: a codebook of {vqgan.config.n_embed} codes does not fit the int16 tokens table")
    data_root = Path(data_root)
    with catalog.connect(data_root) as con:
        params = {"dicom_ids": list(dicom_ids), "vqgan_id": vqgan_id}
        pending = [row[0] for row in con.execute(catalog.read_sql("pending_tokens"), params).fetchall()]
    pixels = PixelStore(data_root, resolution)
    device = next(vqgan.parameters()).device
    vqgan.eval()
    with ProgressBar(total=len(pending), desc=f"tokens {vqgan_id}", unit="image", disable=not progress) as bar:
        for unit in chunk(pending, unit_size):
            tokens = []
            for batch in chunk(unit, batch_size):
                images = torch.from_numpy(pixels.get_many(batch)).to(device)[:, None].float() / 127.5 - 1.0
                with torch.no_grad():
                    tokens.append(vqgan.encode_to_indices(images).flatten(1).to(torch.int16).cpu().numpy())
                bar.update(len(batch))
            grid = np.concatenate(tokens)
            offsets = np.arange(0, grid.size + 1, grid.shape[1], dtype=np.int32)
            catalog.write_part(data_root, TABLE, unit_name("tokens", [vqgan_id, *unit]), pa.table({
                "dicom_id": unit, "vqgan_id": [vqgan_id] * len(unit),
                "tokens": pa.ListArray.from_arrays(offsets, grid.ravel()),
            }))
    return TokenCounts(encoded=len(pending), skipped=len(dicom_ids) - len(pending))


class TokenStore:
    """Read-only access to one VQ-GAN id's tokens by dicom_id, all held in memory (1024 tokens are 2 KiB an image)."""

    def __init__(self, data_root: Path, vqgan_id: str):
        self.vqgan_id = vqgan_id
        with catalog.connect(Path(data_root)) as con:
            table = con.sql(catalog.read_sql("vqgan_tokens"), params=[vqgan_id]).to_arrow_table()
        lengths = set(pc.list_value_length(table["tokens"]).to_pylist())
        if len(lengths) > 1:
            raise ValueError(f"{data_root}: tokens of {vqgan_id} have mixed lengths {sorted(lengths)}")
        values = table["tokens"].combine_chunks().flatten().to_numpy()
        self._tokens = values.reshape(table.num_rows, lengths.pop() if lengths else 0)
        self._rows: dict[str, int] = {dicom_id: row for row, dicom_id in enumerate(table["dicom_id"].to_pylist())}

    def __len__(self) -> int:
        return len(self._rows)

    def get_many(self, dicom_ids: Sequence[str]) -> Tensor:
        """LongTensor [n, V*V], in the order asked."""
        try:
            rows = [self._rows[dicom_id] for dicom_id in dicom_ids]
        except KeyError as err:
            raise KeyError(f"{err.args[0]}: no tokens for VQ-GAN {self.vqgan_id} (run encode_cohort first)") from None
        return torch.from_numpy(self._tokens[rows]).long()
